"""Training configuration: pydantic models loaded from YAML (``configs/*.yaml``).

One file describes a whole recipe: the model (a real checkpoint by name, or an architecture built from
numbers with random weights), the image budget, and the SFT and GRPO hyperparameters. The trainers turn
these into TRL's ``SFTConfig``/``GRPOConfig`` (see ``training/sft.py`` and ``training/grpo.py``), so
every value a user may want to change lives here, with the release's numbers in
``configs/qwen2vl-7b-release.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class _Strict(BaseModel):
    # A misspelt key in a YAML recipe must fail loudly, not silently fall back to a default.
    model_config = ConfigDict(extra="forbid")


class TextArchitecture(_Strict):
    """Sizes of the Qwen2-VL language model (the numbers of a public ``config.json``)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int | None = None  # None: the tokenizer's length (tiny models)
    rope_theta: float = 1_000_000.0
    # M-RoPE splits head_dim/2 rotary frequencies over (time, height, width); None: Qwen's 1:1.5:1.5 split.
    mrope_section: list[int] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def resolved_mrope_section(self) -> list[int]:
        if self.mrope_section is not None:
            if sum(self.mrope_section) * 2 != self.head_dim:
                raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}")
            return list(self.mrope_section)
        half = self.head_dim // 2
        if half % 4:
            raise ValueError(f"head_dim/2 = {half} must be divisible by 4 to split M-RoPE 1:1.5:1.5; set mrope_section")
        return [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]


class VisionArchitecture(_Strict):
    """Sizes of the Qwen2-VL vision tower (ViT with 14 px patches, 2x2 patch merger)."""

    depth: int
    embed_dim: int
    num_heads: int
    mlp_ratio: int = 4
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2


class Architecture(_Strict):
    text: TextArchitecture
    vision: VisionArchitecture


class TokenizerSettings(_Strict):
    """For models built from an architecture: a BPE trained locally, or an existing tokenizer folder."""

    path: str | None = None
    vocab_size: int = 512


class LoraSettings(_Strict):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Language-model projections only: these names do not occur in the vision tower (qkv/proj/fc1/fc2),
    # and TRL refuses an adapter on lm_head.
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class ImageSettings(_Strict):
    """Pixel budget per image. The release trains on 448x448 images: 448*448 pixels -> at most 256 tokens."""

    min_pixels: int = 56 * 56
    max_pixels: int = 448 * 448


class ModelSettings(_Strict):
    # A real checkpoint (Hub id already in the local cache, or a folder) and/or its sizes. With a
    # checkpoint, the sizes only document its shape (bench/gpu_train.py builds random weights from them);
    # without one, a model of these sizes is built with random weights (tests, smoke runs).
    name_or_path: str | None = None
    architecture: Architecture | None = None
    tokenizer: TokenizerSettings = Field(default_factory=TokenizerSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    # "auto": bfloat16 on CUDA, float32 on CPU (CPU autocast in bf16 is slow and TRL needs bf16=False there).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = None  # "sdpa", "flash_attention_2", "eager"; None: transformers' default
    lora: LoraSettings | None = None
    freeze_vision: bool = False  # keep the vision tower fixed (common for small data)
    seed: int = 13

    @model_validator(mode="after")
    def _one_source(self) -> ModelSettings:
        if self.name_or_path is None and self.architecture is None:
            raise ValueError("model: set name_or_path (a checkpoint) or architecture (sizes), or both")
        return self


class ScheduleSettings(_Strict):
    learning_rate: float
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.0
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1  # used when the global batch is not set
    bf16: bool = True  # applied on CUDA only; CPU always trains in float32
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    save_strategy: Literal["no", "steps", "epoch"] = "no"
    save_steps: int = 500
    save_total_limit: int | None = None
    dataloader_num_workers: int = 0
    seed: int = 13
    # A DeepSpeed JSON for Trainer (alternative to `accelerate launch --config_file configs/accelerate/zero2.yaml`).
    deepspeed: str | None = None
    # Draw the training rows by task mixture weight (the marts' `weight` column, from the dataset's
    # mixture): each task gets weight / sum(weights) of the rows, drawn with replacement, as many rows
    # as the input holds (training.datasets.mixture_sample). False: every row once, as given.
    task_mixture: bool = True
    # Task -> weight for that draw instead of the marts' (a task left out gets none). None: the dataset's mixture.
    task_weights: dict[str, float] | None = None


class SFTSettings(ScheduleSettings):
    learning_rate: float = 2e-6
    warmup_ratio: float = 0.1
    num_train_epochs: float = 5.0
    # Sequences per optimizer step over all devices (the release: 128). Gradient accumulation is derived
    # from it and the world size at launch, so the same recipe runs on 1 or 64 GPUs.
    global_batch_size: int | None = None
    # None: no truncation. TRL truncates image conversations from the end, which would cut answers, and
    # refuses keep_end truncation for images; the datasets keep conversations short instead.
    max_length: int | None = None
    assistant_only_loss: bool = True  # loss on the assistant turn only (its text and <|im_end|>)
    # Which mart_sft_examples variants to train on: "chain" (<think>chain</think><answer>X</answer>) and/or
    # "answer_only" (<answer>X</answer> to the same prompt, which still asks for reasoning).
    variants: list[Literal["chain", "answer_only"]] = Field(default_factory=lambda: ["chain", "answer_only"])


class GRPOSettings(ScheduleSettings):
    learning_rate: float = 5e-7
    lr_scheduler_type: str = "constant"
    num_train_epochs: float = 3.0
    num_generations: int = 8  # rollouts per prompt
    # Prompts per optimizer step over all devices (the release's RL batch, 256, read as verl's
    # train_batch_size: prompts, each with num_generations rollouts). Completions per step =
    # prompts_per_step * num_generations; gradient accumulation is derived from it at launch.
    prompts_per_step: int | None = None
    per_device_train_batch_size: int = 8  # completions per device per micro-step
    # Rollouts per generate() call. TRL's default generates a whole optimizer step's completions at once
    # (per_device_train_batch_size x gradient accumulation per process: 256 per GPU for the release on 8
    # GPUs), whose KV cache alone outgrows an 80 GB card at 7B. steps_per_generation = k generates
    # per_device_train_batch_size x k completions per process per call, k micro-steps at a time; set at
    # most one of the two (TRL: generation_batch_size = per_device x processes x steps_per_generation,
    # and it must hold whole groups of num_generations). None for both: TRL's default.
    steps_per_generation: int | None = None
    generation_batch_size: int | None = None
    beta: float = 0.001  # KL coefficient against the frozen reference (the release's "KL loss 0.001")
    # TRL 1.16 has no prompt truncation (it would cut image tokens); prompts longer than this are dropped
    # before training and counted in the result's metrics.
    max_prompt_length: int | None = 2048
    max_completion_length: int = 2048
    temperature: float = 1.0
    top_p: float = 1.0
    num_iterations: int = 1
    epsilon: float = 0.2
    # "dapo" normalises the loss over all tokens of the batch (verl/EasyR1's token-mean default).
    loss_type: str = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    gradient_checkpointing: bool = True
    # vLLM rollouts (needs `pip install vllm` on the GPU workers). "colocate" runs vLLM inside each
    # training process, taking vllm_gpu_memory_utilization of the card; sleep mode frees it between
    # generations. "server" talks to `trl vllm-serve` on other GPUs.
    use_vllm: bool = False
    vllm_mode: Literal["colocate", "server"] = "colocate"
    vllm_gpu_memory_utilization: float = 0.3
    vllm_enable_sleep_mode: bool = False
    log_completions: bool = False
    # Force every rollout to the full length (benchmarks only: random weights rarely emit <|im_end|>).
    min_new_tokens: int | None = None


    @model_validator(mode="after")
    def _one_generation_batch(self) -> GRPOSettings:
        if self.steps_per_generation is not None and self.generation_batch_size is not None:
            raise ValueError("grpo: set steps_per_generation or generation_batch_size, not both")
        return self


class SelectionSettings(_Strict):
    """After GRPO, which checkpoint evaluation gets (training/selection.py): both the GRPO checkpoint and
    the SFT checkpoint it started from answer the validate split of mart_rl_prompts greedily, GRPO's
    reward scores them, and the higher mean is evaluated. Off: evaluation always gets GRPO's."""

    enabled: bool = True
    max_per_task: int | None = None  # validate prompts per task (None: all); two greedy passes over them


class LaunchSettings(_Strict):
    """How the sft/grpo jobs run. ``in_process``: inside the flow's own process (one device; tests, the
    demo). ``accelerate``: the job starts ``accelerate launch -m training.sft|grpo`` with one process per
    GPU of the worker (DeepSpeed through ``accelerate_config``), then records what the launched job wrote
    (training/launch.py)."""

    mode: Literal["in_process", "accelerate"] = "in_process"
    # An accelerate config (configs/accelerate/zero2.yaml or zero3.yaml; relative paths are read from the
    # repository root). None: accelerate's defaults (multi-GPU data parallel without DeepSpeed).
    accelerate_config: str | None = None
    num_processes: int | None = None  # None: every GPU the worker sees (1 on a CPU-only worker)
    cpu: bool = False  # pass --cpu to accelerate (CPU smoke runs of the launch path)


class TrainingConfig(_Strict):
    name: str
    description: str = ""
    model: ModelSettings
    sft: SFTSettings = Field(default_factory=SFTSettings)
    grpo: GRPOSettings = Field(default_factory=GRPOSettings)
    # Reward name -> weight; the caller resolves a name to training.rewards.<name>_reward. GRPO sums them.
    rewards: dict[str, float] = Field(default_factory=dict)
    selection: SelectionSettings = Field(default_factory=SelectionSettings)
    launch: LaunchSettings = Field(default_factory=LaunchSettings)


def world_size() -> int:
    """Processes in the launch (accelerate/torchrun set WORLD_SIZE); 1 for a plain python run."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def accumulation_steps(global_items: int | None, per_device: int, fallback: int, processes: int | None = None) -> int:
    """Gradient accumulation that makes per_device * processes * steps == global_items."""
    if global_items is None:
        return fallback
    processes = processes or world_size()
    per_step = per_device * processes
    if global_items % per_step:
        raise ValueError(
            f"global batch {global_items} is not a multiple of per-device batch {per_device} x {processes} processes"
        )
    return global_items // per_step


def load_config(path_or_name: str | Path) -> TrainingConfig:
    """Load a YAML recipe by path, or by name from the repository's configs/ folder ("tiny-cpu")."""
    path = Path(path_or_name)
    if not path.exists():
        candidate = REPO_CONFIGS / f"{path_or_name}.yaml"
        if not candidate.exists():
            raise FileNotFoundError(f"no training config at {path_or_name} or {candidate}")
        path = candidate
    data = yaml.safe_load(path.read_text())
    return TrainingConfig.model_validate(data)
