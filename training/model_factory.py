"""Build or load the policy model and its processor.

Two sources, chosen by the config:
- a real checkpoint (Qwen2-VL or Qwen2.5-VL) by Hub id or folder, loaded with ``local_files_only`` so a
  missing download fails instead of reaching the network;
- an architecture given as numbers (``configs/*.yaml``), built with random weights: a 200k-parameter
  model for tests, or the 2B/7B shapes for GPU benchmarks without downloading anything.
LoRA (peft) wraps either one when the config asks for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.qwen2_vl import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from training.config import Architecture, LoraSettings, ModelSettings
from training.processor import RadchainVLProcessor, build_image_processor, load_processor
from training.tokenizer import (
    ENDOFTEXT,
    IM_END,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    load_tokenizer,
    train_bpe_tokenizer,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model and the processor that feeds it; ``source`` says where the weights came from."""

    model: PreTrainedModel
    processor: RadchainVLProcessor
    source: str

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def resolve_dtype(setting: str, device: str | torch.device | None = None) -> torch.dtype:
    """``auto``: bfloat16 where CUDA trains (or the target device is CUDA), float32 on CPU."""
    if setting != "auto":
        return _DTYPES[setting]
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return torch.bfloat16 if on_cuda else torch.float32


def build_tokenizer(settings: ModelSettings, corpus: Iterable[str] = ()) -> PreTrainedTokenizerBase:
    if settings.tokenizer.path:
        return load_tokenizer(settings.tokenizer.path)
    return train_bpe_tokenizer(corpus, vocab_size=settings.tokenizer.vocab_size)


def qwen2vl_config(architecture: Architecture, tokenizer: PreTrainedTokenizerBase) -> Qwen2VLConfig:
    """A Qwen2-VL config from sizes, with the special-token ids of *this* tokenizer."""
    text, vision = architecture.text, architecture.vision
    token_id = tokenizer.convert_tokens_to_ids
    vocab_size = text.vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": text.rope_theta,
                         "mrope_section": text.resolved_mrope_section()},
        bos_token_id=None,
        eos_token_id=token_id(IM_END),
        pad_token_id=token_id(ENDOFTEXT),
        tie_word_embeddings=text.tie_word_embeddings,
    )
    vision_config = dict(
        depth=vision.depth,
        embed_dim=vision.embed_dim,
        hidden_size=text.hidden_size,  # the patch merger projects vision features into the text width
        num_heads=vision.num_heads,
        mlp_ratio=vision.mlp_ratio,
        patch_size=vision.patch_size,
        spatial_merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
    )
    return Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=token_id(IMAGE_PAD),
        video_token_id=token_id(VIDEO_PAD),
        vision_start_token_id=token_id(VISION_START),
        vision_end_token_id=token_id(VISION_END),
        tie_word_embeddings=text.tie_word_embeddings,
    )


def build_model_from_architecture(
    architecture: Architecture,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    seed: int = 13,
) -> Qwen2VLForConditionalGeneration:
    """Random weights in the given shapes. On CUDA the weights are created on the GPU directly: a 7B model
    initialised on the CPU in float32 would need 33 GB of host memory and minutes of init."""
    config = qwen2vl_config(architecture, tokenizer)
    torch.manual_seed(seed)
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with torch.device(device or "cpu"):
        model = Qwen2VLForConditionalGeneration._from_config(config, **kwargs)
    _set_generation_tokens(model, tokenizer)
    return model


def load_checkpoint_model(
    name_or_path: str | Path,
    dtype: torch.dtype,
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """Qwen2-VL / Qwen2.5-VL weights from a folder or the local Hub cache; never downloads."""
    kwargs = {"dtype": dtype, "local_files_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device is not None:
        kwargs["device_map"] = str(device)
    return AutoModelForImageTextToText.from_pretrained(str(name_or_path), **kwargs)


def _set_generation_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    # Qwen2-VL-Instruct stops on <|im_end|> or <|endoftext|> and pads with <|endoftext|>.
    stop_ids = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    model.generation_config.eos_token_id = stop_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None


def apply_lora(model: PreTrainedModel, lora: LoraSettings) -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def freeze_vision_tower(model: PreTrainedModel) -> None:
    inner = getattr(model, "model", model)
    visual = getattr(inner, "visual", None)
    if visual is None:
        raise ValueError(f"{type(model).__name__} has no vision tower to freeze")
    for parameter in visual.parameters():
        parameter.requires_grad_(False)


def load_model(
    settings: ModelSettings,
    corpus: Iterable[str] = (),
    device: str | torch.device | None = None,
    init_checkpoint: str | Path | None = None,
) -> LoadedModel:
    """The policy and its processor, as the config describes.

    ``init_checkpoint`` (a folder written by ``run_sft``) overrides the config's source: GRPO starts
    from the SFT weights and reuses the SFT tokenizer. ``corpus`` feeds the locally trained tokenizer
    of architecture-built models (e.g. the training texts).
    """
    dtype = resolve_dtype(settings.dtype, device)
    images = settings.images
    if init_checkpoint is not None or settings.name_or_path is not None:
        path = init_checkpoint if init_checkpoint is not None else settings.name_or_path
        model = load_checkpoint_model(path, dtype, settings.attn_implementation, device)
        processor = load_processor(_local_dir(path), images.min_pixels, images.max_pixels)
        _set_generation_tokens(model, processor.tokenizer)
        source = f"checkpoint:{path}"
    else:
        tokenizer = build_tokenizer(settings, corpus)
        processor = RadchainVLProcessor(build_image_processor(images.min_pixels, images.max_pixels), tokenizer)
        model = build_model_from_architecture(
            settings.architecture, tokenizer, dtype, device, settings.attn_implementation, settings.seed
        )
        source = "architecture"
    if settings.freeze_vision:
        freeze_vision_tower(model)
    if settings.lora is not None:
        model = apply_lora(model, settings.lora)
    return LoadedModel(model=model, processor=processor, source=source)


def load_trained(
    checkpoint: str | Path, dtype: str = "auto", device: str | torch.device | None = None
) -> LoadedModel:
    """A checkpoint written by run_sft/run_grpo (full weights + processor files), for generation or further training."""
    model = load_checkpoint_model(checkpoint, resolve_dtype(dtype, device), device=device)
    processor = load_processor(checkpoint)
    _set_generation_tokens(model, processor.tokenizer)
    return LoadedModel(model=model, processor=processor, source=f"checkpoint:{checkpoint}")


def _local_dir(name_or_path: str | Path) -> Path:
    """The folder holding a checkpoint's tokenizer files: the path itself, or the Hub cache snapshot of an id."""
    path = Path(name_or_path)
    if path.exists():
        return path
    from huggingface_hub import snapshot_download

    # local_files_only: resolve the cached snapshot, raise if the model was never downloaded.
    return Path(snapshot_download(str(name_or_path), local_files_only=True))
