"""A minimal Qwen2-VL processor: a tokenizer plus ``Qwen2VLImageProcessorPil``, nothing else.

``Qwen2VLProcessor`` also wants a video processor, which needs torchvision; torchvision does not import
beside the pinned torch, so ``AutoProcessor`` cannot build one here. The TRL trainers only need a
``ProcessorMixin`` whose ``__call__`` and ``apply_chat_template`` behave like Qwen's, so this class
subclasses ``ProcessorMixin`` with two attributes (image processor, tokenizer). The base class does
the batching, kwargs routing and assistant masks; this class tells it how many ``<|image_pad|>`` tokens
each image's patch grid becomes, and returns ``mm_token_type_ids`` (Qwen2-VL's M-RoPE needs them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from training.tokenizer import IMAGE_PAD, QWEN2VL_CHAT_TEMPLATE, VIDEO_PAD

PROCESSOR_MARKER = "radchain_processor.json"  # written beside the tokenizer files by save_processor


class RadchainVLProcessor(ProcessorMixin):
    """Tokenizer + Qwen2-VL image processor, callable like ``Qwen2VLProcessor`` for images and text."""

    # Qwen2-VL's M-RoPE needs to know which positions are image tokens.
    return_mm_token_type_ids = True

    def __init__(
        self,
        image_processor: Qwen2VLImageProcessorPil | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
    ) -> None:
        # The attributes the base class manages are read from this signature: image_processor, tokenizer.
        self.image_token = IMAGE_PAD
        self.video_token = VIDEO_PAD
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)
        super().__init__(image_processor, tokenizer, chat_template=chat_template or QWEN2VL_CHAT_TEMPLATE)
        # The tokenizer renders the same conversations as the processor (generate(), prompt-length estimates).
        self.tokenizer.chat_template = self.chat_template

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        """One image's placeholder becomes one token per merged patch: t*h*w patches / merge_size**2."""
        merge_length = self.image_processor.merge_size**2
        num_image_tokens = int(image_inputs["image_grid_thw"][image_idx].prod()) // merge_length
        return self.image_token * num_image_tokens

    def image_token_count(self, height: int, width: int) -> int:
        """Tokens one image of this size becomes, without processing pixels (used to bound prompt lengths)."""
        patches = self.image_processor.get_number_of_image_patches(height, width, {})
        return patches // self.image_processor.merge_size**2

    def post_process_image_text_to_text(
        self, generated_outputs: Any, skip_special_tokens: bool = True, **kwargs: Any
    ) -> list[str]:
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return [*super().model_input_names, "mm_token_type_ids"]

    def save_pretrained(self, save_directory: str | Path, push_to_hub: bool = False, **kwargs: Any) -> list[str]:
        """Trainer checkpoints call this: the same files as ``save_processor``, so ``load_processor`` reads them."""
        if push_to_hub:
            raise ValueError("radchain never pushes to the Hub")
        save_processor(self, save_directory)
        return [str(save_directory)]


def build_image_processor(min_pixels: int | None = None, max_pixels: int | None = None) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL's image processor; pixel bounds fix the number of image tokens (448x448 -> 256 tokens)."""
    bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    return Qwen2VLImageProcessorPil(**bounds)


def save_processor(processor: RadchainVLProcessor, directory: str | Path) -> Path:
    """Save tokenizer and image processor in the usual Hugging Face files, plus a marker naming our class."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    processor.tokenizer.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)
    (directory / PROCESSOR_MARKER).write_text(
        json.dumps({"processor_class": type(processor).__name__, "chat_template": processor.chat_template}, indent=2)
    )
    return directory


def load_processor(
    directory: str | Path, min_pixels: int | None = None, max_pixels: int | None = None
) -> RadchainVLProcessor:
    """Load a processor from a local checkpoint folder: ours, or a real Qwen2-VL/Qwen2.5-VL download.

    A real checkpoint's own chat template is replaced by ours, which renders Qwen2-VL's format and adds
    the generation markers assistant-only SFT needs. Nothing is fetched from the network.
    """
    directory = Path(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    if (directory / "preprocessor_config.json").exists():
        bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(directory), local_files_only=True, **bounds)
    elif (directory / "processor_config.json").exists() and "image_processor" in (
        saved := json.loads((directory / "processor_config.json").read_text())
    ):
        # ProcessorMixin.save_pretrained nests the image processor's settings in processor_config.json.
        image_processor = Qwen2VLImageProcessorPil.from_dict(saved["image_processor"])
        if min_pixels is not None or max_pixels is not None:
            image_processor = build_image_processor(
                min_pixels or image_processor.size["shortest_edge"], max_pixels or image_processor.size["longest_edge"]
            )
    else:
        image_processor = build_image_processor(min_pixels, max_pixels)
    chat_template = None
    marker = directory / PROCESSOR_MARKER
    if marker.exists():
        chat_template = json.loads(marker.read_text()).get("chat_template")
    return RadchainVLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)
