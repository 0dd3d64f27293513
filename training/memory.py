"""A per-GPU memory estimate of a training config's SFT and GRPO steps (``bench/gpu_train.py --estimate``).

What is counted, per GPU, in GiB (2**30 bytes):

* ``weights``, ``gradients``, ``optimizer`` -- mixed precision with AdamW: bf16 weights (2 bytes per
  parameter) and bf16 gradients (2), fp32 master weights + two Adam moments (12) = 16 bytes per trained
  parameter. DeepSpeed ZeRO shards them over the world: stage 1 the optimizer, stage 2 also the
  gradients, stage 3 also the weights. Without DeepSpeed (``launch.mode: in_process``, or accelerate
  without a DeepSpeed config) every GPU holds all 16 bytes: fp32 weights (4), fp32 gradients (4), Adam (8);
  with ``model.dtype: bfloat16`` (pure bf16, as bench/gpu_train.py runs) 8 bytes: 2 + 2 + 4.
* ``activations`` -- one micro-batch (per_device_train_batch_size sequences of max_prompt_length +
  max_completion_length tokens; images at max_pixels): per layer and token, ~(17 h + 8 f) bytes in bf16
  for a SwiGLU block with flash/SDPA attention (no s^2 term; after Korthikanti et al. 2022). With
  gradient checkpointing only each layer's input (2 h bytes per token) is kept, plus one layer
  recomputed at a time. The vision tower is counted the same way over its patches.
* ``logits`` -- the LM head's output for the micro-batch: bf16 logits plus the fp32 copy the loss takes
  (6 bytes x vocab per token; SFT: every token, GRPO: the completion's); at a 152k vocabulary this is
  often the largest activation.
* GRPO only: ``reference`` -- the frozen KL reference model in bf16 (beta > 0; sharded under ZeRO-3),
  and ``kv_cache`` -- the rollouts of one generate() call per GPU (per_device_train_batch_size x
  steps_per_generation, TRL's default being the whole step's gradient accumulation) x (prompt +
  completion) tokens x 2 (K and V) x layers x kv_heads x head_dim x 2 bytes. With vLLM colocate the
  KV cache lives in vLLM's share of the card instead (``vllm_gpu_memory_utilization``).

Not counted: CUDA context and allocator fragmentation (~1-3 GB), DeepSpeed communication buckets, and
dataloader memory. The estimate is a plan for a card size, to be checked against the measured peak
(``bench/gpu_train.py`` prints peak_gpu_memory_gb).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from training.config import Architecture, TrainingConfig

GIB = 2**30


@dataclass
class MemoryEstimate:
    config: str
    job: str  # sft | grpo
    world_size: int
    zero_stage: int  # 0: no DeepSpeed
    parameters_b: float  # billions of parameters (vision tower included)
    weights_gb: float
    gradients_gb: float
    optimizer_gb: float
    activations_gb: float
    logits_gb: float
    reference_gb: float = 0.0
    kv_cache_gb: float = 0.0
    rollouts_per_generate: int = 0

    @property
    def total_gb(self) -> float:
        return (self.weights_gb + self.gradients_gb + self.optimizer_gb + self.activations_gb + self.logits_gb
                + self.reference_gb + self.kv_cache_gb)

    def as_dict(self) -> dict[str, Any]:
        return dict(asdict(self), total_gb=self.total_gb)


class _TokenIds:
    """Just enough of a tokenizer for qwen2vl_config: special-token ids and a length."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def convert_tokens_to_ids(self, token: str) -> int:
        return hash(token) % self.vocab_size

    def __len__(self) -> int:
        return self.vocab_size


def parameter_count(architecture: Architecture, vocab_size: int | None = None) -> int:
    """Exact parameter count of a Qwen2-VL of these sizes, built on the meta device (no memory, no weights)."""
    import torch
    from transformers.models.qwen2_vl import Qwen2VLForConditionalGeneration

    from training.model_factory import qwen2vl_config

    vocab = architecture.text.vocab_size or vocab_size
    if vocab is None:
        raise ValueError("the architecture has no vocab_size: pass the tokenizer's")
    config = qwen2vl_config(architecture, _TokenIds(vocab))  # type: ignore[arg-type]
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration._from_config(config)
    return sum(p.numel() for p in model.parameters())


def zero_stage_of(accelerate_config: str | None) -> int:
    """The DeepSpeed stage of an accelerate config file (0 when it has none)."""
    if accelerate_config is None:
        return 0
    import yaml

    from training.launch import REPO_DIR

    path = Path(accelerate_config)
    data = yaml.safe_load((path if path.is_absolute() else REPO_DIR / path).read_text())
    if data.get("distributed_type") != "DEEPSPEED":
        return 0
    return int((data.get("deepspeed_config") or {}).get("zero_stage", 0))


def _layer_activation_bytes(tokens: int, hidden: int, ffn: int, layers: int, checkpointing: bool) -> float:
    per_layer = tokens * (17 * hidden + 8 * ffn)
    if checkpointing:
        return layers * tokens * 2 * hidden + per_layer
    return layers * per_layer


def estimate(cfg: TrainingConfig, job: str, world_size: int | None = None, zero_stage: int | None = None,
             vocab_size: int | None = None) -> MemoryEstimate:
    """Per-GPU memory of one ``job`` ("sft" or "grpo") step of ``cfg`` on ``world_size`` GPUs."""
    if cfg.model.architecture is None:
        raise ValueError(f"config {cfg.name} has no architecture sizes to estimate from")
    if job not in ("sft", "grpo"):
        raise ValueError("job must be sft or grpo")
    arch = cfg.model.architecture
    text, vision = arch.text, arch.vision
    world = world_size or cfg.launch.num_processes or 1
    stage = zero_stage_of(cfg.launch.accelerate_config) if zero_stage is None else zero_stage
    if cfg.launch.mode == "in_process":
        stage = 0
    params = parameter_count(arch, vocab_size)
    vocab = text.vocab_size or vocab_size or 0

    if stage == 0 and cfg.model.dtype == "bfloat16":
        weights, grads, optim = 2 * params, 2 * params, 4 * params  # pure bf16 (bench/gpu_train.py), replicated
    elif stage == 0:
        weights, grads, optim = 4 * params, 4 * params, 8 * params  # fp32 everything, replicated
    else:
        weights, grads, optim = 2 * params, 2 * params, 12 * params
        optim /= world
        if stage >= 2:
            grads /= world
        if stage >= 3:
            weights /= world

    schedule = cfg.sft if job == "sft" else cfg.grpo
    g = cfg.grpo
    seq = (g.max_prompt_length or 0) + g.max_completion_length
    batch = schedule.per_device_train_batch_size
    tokens = batch * seq
    activations = _layer_activation_bytes(tokens, text.hidden_size, text.intermediate_size, text.num_hidden_layers,
                                          schedule.gradient_checkpointing)
    patches = cfg.model.images.max_pixels // (vision.patch_size**2)
    activations += _layer_activation_bytes(batch * patches, vision.embed_dim, vision.embed_dim * vision.mlp_ratio,
                                           vision.depth, schedule.gradient_checkpointing)
    # SFT scores every token; GRPO only the completion's (TRL slices the logits to the completion).
    logits = (tokens if job == "sft" else batch * g.max_completion_length) * vocab * 6

    result = MemoryEstimate(
        config=cfg.name, job=job, world_size=world, zero_stage=stage, parameters_b=params / 1e9,
        weights_gb=weights / GIB, gradients_gb=grads / GIB, optimizer_gb=optim / GIB,
        activations_gb=activations / GIB, logits_gb=logits / GIB,
    )
    if job == "grpo":
        if g.beta > 0:
            result.reference_gb = 2 * params / (world if stage >= 3 else 1) / GIB
        completions = (g.prompts_per_step or 1) * g.num_generations
        accumulation = max(1, completions // (g.per_device_train_batch_size * world))
        if g.generation_batch_size is not None:
            per_call = g.generation_batch_size // world
        else:
            per_call = g.per_device_train_batch_size * (g.steps_per_generation or accumulation)
        result.rollouts_per_generate = per_call
        if not g.use_vllm:
            head_dim = text.hidden_size // text.num_attention_heads
            kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2
            result.kv_cache_gb = per_call * seq * kv_per_token / GIB
    return result


def format_estimate(e: MemoryEstimate) -> str:
    parts = ("weights", "gradients", "optimizer", "activations", "logits", "reference", "kv_cache")
    body = " ".join(f"{p}={getattr(e, p + '_gb'):.1f}" for p in parts)
    extra = f" rollouts_per_generate={e.rollouts_per_generate}" if e.job == "grpo" else ""
    return (f"ESTIMATE config={e.config} job={e.job} gpus={e.world_size} zero={e.zero_stage} "
            f"params_b={e.parameters_b:.2f} {body} total_gb_per_gpu={e.total_gb:.1f}{extra}")
