"""Model FLOPs of SFT and GRPO steps, for model FLOPs utilisation (MFU) in bench/gpu_train.py.

MFU is the model FLOPs a step needs per second over the device's peak dense bf16 FLOPs (Chowdhery et
al., PaLM, 2022, appendix B). Per token of a T-token sequence, training (forward + backward) costs
6N + 12·L·W·T FLOPs: N the parameters that multiply activations (an embedding lookup does not), L
layers, W the attention width (heads × head dim). A forward pass alone is a third of it,
2N + 4·L·W·T. Like PaLM, the count ignores what an implementation adds, such as recomputing
activations for gradient checkpointing: that would be hardware FLOPs utilisation, not MFU.

Qwen2-VL has two transformers: the text decoder, and the vision tower, which attends over all
patches of one image (``patches`` before the 2×2 merger) and whose merger MLP runs on merged tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stack:
    """One transformer's sizes for counting: parameters in matrix multiplies, layers, attention width."""

    matmul_params: int
    layers: int
    width: int

    def forward(self, tokens: int, context: int) -> float:
        """FLOPs of a forward pass over ``tokens`` tokens that each attend over ``context`` tokens."""
        return tokens * (2 * self.matmul_params + 4 * self.layers * self.width * context)

    def training(self, tokens: int, context: int) -> float:
        """Forward and backward: three forward passes' worth (PaLM's 6N + 12·L·W·T per token)."""
        return 3 * self.forward(tokens, context)


@dataclass(frozen=True)
class VisionTower:
    """The vision tower: patch embedding and blocks run per patch, the merger per merged token."""

    per_patch: Stack
    merger_params: int
    merge: int = 4  # patches per merged token (spatial_merge_size 2 x 2)

    def forward(self, patches: int) -> float:
        """One image of ``patches`` patches, every patch attending over all of them."""
        return self.per_patch.forward(patches, patches) + 2 * self.merger_params * patches / self.merge

    def training(self, patches: int) -> float:
        return 3 * self.forward(patches)


@dataclass(frozen=True)
class ModelShape:
    text: Stack
    vision: VisionTower


def model_shape(model: Any) -> ModelShape:
    """Counts of a transformers Qwen2-VL model (``model.model.language_model``, ``model.model.visual``,
    ``model.lm_head``): the input embedding is left out, the output projection counted even when tied."""
    inner = model.model
    text_config = getattr(model.config, "text_config", model.config)
    vision_config = model.config.vision_config

    def count(module: Any) -> int:
        return sum(p.numel() for p in module.parameters())

    text = Stack(matmul_params=count(inner.language_model.layers) + model.lm_head.weight.numel(),
                 layers=text_config.num_hidden_layers, width=text_config.hidden_size)
    visual = inner.visual
    per_patch = Stack(matmul_params=count(visual.patch_embed) + count(visual.blocks), layers=vision_config.depth,
                      width=vision_config.embed_dim)
    merge = vision_config.spatial_merge_size ** 2
    return ModelShape(text=text, vision=VisionTower(per_patch, count(visual.merger), merge))


def sft_step_flops(shape: ModelShape, sequences: int, sequence_tokens: int, images_per_sequence: int,
                   patches_per_image: int) -> float:
    """One SFT optimizer step: forward and backward over every token of every sequence (image tokens
    included) and through the vision tower for every image."""
    text = shape.text.training(sequences * sequence_tokens, sequence_tokens)
    return text + sequences * images_per_sequence * shape.vision.training(patches_per_image)


def grpo_step_flops(shape: ModelShape, completions: int, prompt_tokens: int, completion_tokens: int,
                    images_per_prompt: int, patches_per_image: int, reference: bool) -> float:
    """One GRPO step of ``completions`` rollouts: generation (prefill of each prompt, then one forward per
    new token attending over the prompt and the tokens so far, on average half the completion), the
    policy's forward and backward over prompt + completion, and the reference model's forward when the
    KL term is on (beta > 0). Each pass re-encodes the images."""
    total = prompt_tokens + completion_tokens
    images = completions * images_per_prompt
    vision = images * shape.vision.forward(patches_per_image)
    generation = (shape.text.forward(completions * prompt_tokens, prompt_tokens)
                  + shape.text.forward(completions * completion_tokens, prompt_tokens + completion_tokens // 2)
                  + vision)
    policy = shape.text.training(completions * total, total) + images * shape.vision.training(patches_per_image)
    ref = shape.text.forward(completions * total, total) + vision if reference else 0.0
    return generation + policy + ref


# Peak dense bf16 tensor FLOPs (no sparsity), TFLOPS, from NVIDIA's datasheets; first match wins.
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200",), 989.4),
    (("H100", "PCIE"), 756.5),
    (("H100", "NVL"), 835.5),
    (("H100",), 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    (("A100",), 312.0),
    (("L40S",), 362.1),
)


def peak_tflops(device_name: str) -> float | None:
    """The device's peak dense bf16 TFLOPS by its CUDA name, or None when the table does not know it."""
    name = device_name.upper()
    for words, tflops in PEAK_BF16_TFLOPS:
        if all(w in name for w in words):
            return tflops
    return None


def mfu(flops: float, seconds: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOPs per second over ``peak`` TFLOPS."""
    if not seconds or not peak:
        return None
    return flops / seconds / (peak * 1e12)
