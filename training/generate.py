"""Batched generation with a trained checkpoint (transformers ``generate``), for evaluation.

Accepts the GRPO/benchmark rows (``prompt`` or ``prompt_json`` + ``images``) or SFT rows (``messages``;
the assistant turns are dropped so the model answers the question itself). Greedy by default, so an
evaluation is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from trl.data_utils import prepare_multimodal_messages

from training.model_factory import LoadedModel, load_trained
from training.sft import normalize_messages


def prompt_messages(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The conversation up to the model's turn: a prompt, or a full conversation minus its answers."""
    for key in ("prompt", "prompt_json", "messages", "messages_json"):
        if key in row:
            messages = normalize_messages(row[key])
            break
    else:
        raise KeyError(f"row has none of prompt, prompt_json, messages, messages_json: {sorted(row)}")
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    return messages


def _row_images(row: Mapping[str, Any]) -> list[Any]:
    return [str(i) if isinstance(i, Path) else i for i in (row.get("images") or [])]


def generate(
    checkpoint_or_model: str | Path | LoadedModel,
    rows: Iterable[Mapping[str, Any]],
    max_new_tokens: int = 512,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    device: str | torch.device | None = None,
    seed: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """One decoded completion per row (special tokens removed), in row order. ``progress(n)`` is
    called after each batch with the rows it answered (the evaluation job's progress artifact).

    ``seed`` (sampling only) reseeds torch before each batch with ``seed + batch index``: two models
    sampled with the same seed on the same rows draw the same random numbers at every decoding step
    (common random numbers), so where their next-token distributions are close they pick the same
    token, and the difference of their rewards measures the models, not the dice. It reseeds torch's
    global generator (transformers' sampling takes no generator of its own)."""
    if isinstance(checkpoint_or_model, LoadedModel):
        loaded = checkpoint_or_model
    else:
        device = device or ("cuda" if torch.cuda.is_available() else None)
        loaded = load_trained(checkpoint_or_model, device=device)
    model, processor = loaded.model, loaded.processor
    was_training = model.training
    model.eval()
    rows = list(rows)
    outputs: list[str] = []
    try:
        for start in range(0, len(rows), batch_size):
            if do_sample and seed is not None:
                torch.manual_seed(seed + start // batch_size)
            batch = rows[start : start + batch_size]
            conversations = [prepare_multimodal_messages(prompt_messages(r), images=_row_images(r)) for r in batch]
            inputs = processor.apply_chat_template(
                conversations,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                # Left padding keeps every prompt's last token next to its first generated token.
                processor_kwargs={"padding": True, "padding_side": "left"},
            ).to(model.device)
            # Sampling draws from the whole distribution, as GRPO's rollouts do (TRL's top_k 0, top_p 1),
            # not from transformers' default top 50.
            sampling = ({"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if do_sample
                        else {"do_sample": False})
            with torch.inference_mode():
                generated = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=processor.tokenizer.pad_token_id,
                    **sampling,
                )
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]
            outputs.extend(processor.batch_decode(new_tokens, skip_special_tokens=True))
            if progress is not None:
                progress(len(batch))
    finally:
        model.train(was_training)
    return outputs
