"""Reinforcement learning with GRPO (TRL's GRPOTrainer), started from the SFT checkpoint.

Row contract (one dict per prompt):
    {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
     "images": [PIL.Image or local path, ...],
     "solution": "B", "task": "binary", "gold_steps": ..., "gold_labels": "...json...", "sample_id": "..."}
``prompt_json`` (the mart's JSON column) is accepted in place of ``prompt``. Every other column reaches
each reward function as a keyword argument holding one value per completion, in TRL's signature
``fn(completions, **kwargs) -> list[float]`` with conversational completions
(``[[{"role": "assistant", "content": text}], ...]``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from accelerate.utils import is_peft_model
from datasets import Dataset
from PIL import Image as PILImage

from training.config import TrainingConfig, accumulation_steps
from training.model_factory import LoadedModel, load_model
from training.processor import RadchainVLProcessor
from training.datasets import task_counts
from training.sft import (
    StepTimer,
    apply_task_mixture,
    TrainResult,
    conversation_texts,
    count_image_placeholders,
    finish,
    normalize_messages,
    timed_train,
    trainer_arguments,
    with_images,
)

RewardFunc = Callable[..., list[float | None]]
INIT_DIR = "init"  # where a policy built in memory is saved so TRL can load the reference model from disk


def _image_size(image: Any) -> tuple[int, int]:
    """(height, width) without decoding pixels: PIL reads only the header of a file."""
    if isinstance(image, (str, Path)):
        with PILImage.open(image) as opened:
            width, height = opened.size
    else:
        width, height = image.size
    return height, width


def prompt_length(processor: RadchainVLProcessor, prompt: list[dict[str, Any]], images: Sequence[Any]) -> int:
    """Tokens of the rendered prompt with each image expanded to its patch-grid tokens."""
    text = processor.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    text_tokens = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    image_tokens = sum(processor.image_token_count(*_image_size(image)) for image in images)
    return text_tokens - len(images) + image_tokens  # each <|image_pad|> placeholder becomes image_tokens


def grpo_dataset(
    rows: Iterable[Mapping[str, Any]],
    processor: RadchainVLProcessor | None = None,
    max_prompt_length: int | None = None,
) -> tuple[Dataset, int]:
    """The prompts as a Dataset (images decoded lazily), and how many were dropped as too long."""
    records, images, dropped = [], [], 0
    for index, row in enumerate(rows):
        prompt = normalize_messages(row["prompt"] if "prompt" in row else row["prompt_json"])
        row_images = [str(i) if isinstance(i, Path) else i for i in (row.get("images") or [])]
        if count_image_placeholders(prompt) != len(row_images):
            raise ValueError(
                f"GRPO row {index}: {count_image_placeholders(prompt)} image placeholders but {len(row_images)} images"
            )
        if processor is not None and max_prompt_length is not None:
            if prompt_length(processor, prompt, row_images) > max_prompt_length:
                dropped += 1
                continue
        extra = {k: v for k, v in row.items() if k not in ("prompt", "prompt_json", "images", "image")}
        records.append({"prompt": prompt, **extra})
        images.append(row_images)
    if not records:
        raise ValueError(f"no GRPO prompts left ({dropped} longer than max_prompt_length={max_prompt_length})")
    return with_images(records, images), dropped


def _ensure_on_disk(loaded: LoadedModel, out_dir: Path) -> None:
    """TRL builds the KL reference model with from_pretrained(config._name_or_path); a policy built in
    memory has no path, so save it once (main process first, the others then find it) and point the
    config there."""
    from accelerate import PartialState

    name = loaded.model.config._name_or_path
    if name and Path(name).exists():
        return
    init = out_dir / INIT_DIR
    state = PartialState()
    with state.main_process_first():
        if state.is_main_process:
            loaded.model.save_pretrained(init)
            loaded.processor.save_pretrained(init)
    loaded.model.config._name_or_path = str(init)


def run_grpo(
    cfg: TrainingConfig,
    prompt_rows: Iterable[Mapping[str, Any]],
    reward_funcs: Sequence[RewardFunc],
    reward_weights: Sequence[float] | None = None,
    out_dir: str | Path = "out/grpo",
    init_checkpoint: str | Path | None = None,
    loaded: LoadedModel | None = None,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Optimise the policy on the prompts with the weighted sum of ``reward_funcs``; save to ``out_dir/final``.

    ``init_checkpoint``: the SFT output folder (``TrainResult.checkpoint``); without it the config's
    model is used. ``loaded`` passes a model already in memory (benchmarks).
    """
    from trl import GRPOConfig, GRPOTrainer

    reward_funcs = list(reward_funcs)
    if not reward_funcs:
        raise ValueError("GRPO needs at least one reward function")
    if reward_weights is not None and len(reward_weights) != len(reward_funcs):
        raise ValueError(f"{len(reward_weights)} reward weights for {len(reward_funcs)} reward functions")
    out_dir = Path(out_dir)
    prompt_rows = list(prompt_rows)
    g = cfg.grpo
    if loaded is None:
        corpus = conversation_texts(prompt_rows, "prompt")
        loaded = load_model(cfg.model, corpus=corpus, init_checkpoint=init_checkpoint)
    # With LoRA the reference is the base model with the adapter disabled: nothing to load from disk.
    if g.beta > 0 and not is_peft_model(loaded.model):
        _ensure_on_disk(loaded, out_dir)
    drawn = apply_task_mixture(prompt_rows, g)
    train_dataset, dropped = grpo_dataset(drawn, loaded.processor, g.max_prompt_length)

    completions_per_step = g.prompts_per_step * g.num_generations if g.prompts_per_step else None
    accumulation = accumulation_steps(
        completions_per_step, g.per_device_train_batch_size, g.gradient_accumulation_steps
    )
    generation_kwargs = {"min_new_tokens": g.min_new_tokens} if g.min_new_tokens else None
    args = GRPOConfig(
        **trainer_arguments(g, out_dir, accumulation),
        num_generations=g.num_generations,
        max_completion_length=g.max_completion_length,
        beta=g.beta,
        temperature=g.temperature,
        top_p=g.top_p,
        num_iterations=g.num_iterations,
        epsilon=g.epsilon,
        loss_type=g.loss_type,
        scale_rewards=g.scale_rewards,
        reward_weights=list(reward_weights) if reward_weights is not None else None,
        steps_per_generation=g.steps_per_generation,
        generation_batch_size=g.generation_batch_size,
        use_vllm=g.use_vllm,
        vllm_mode=g.vllm_mode,
        vllm_gpu_memory_utilization=g.vllm_gpu_memory_utilization,
        vllm_enable_sleep_mode=g.vllm_enable_sleep_mode,
        log_completions=g.log_completions,
        generation_kwargs=generation_kwargs,
        # Reward functions read the extra columns (solution, gold_steps, ...): keep them.
        remove_unused_columns=False,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=loaded.model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=train_dataset,
        processing_class=loaded.processor,
        callbacks=[timer, *callbacks],
    )
    metrics = timed_train(trainer, timer)
    rewards = [entry["reward"] for entry in trainer.state.log_history if entry.get("reward") is not None]
    metrics.update(
        gradient_accumulation_steps=accumulation,
        prompts=len(train_dataset),
        prompts_per_task=task_counts(drawn),
        task_mixture=drawn is not prompt_rows,
        prompts_dropped_too_long=dropped,
        mean_reward=sum(rewards) / len(rewards) if rewards else None,
        reward_names=list(trainer.reward_func_names),
        num_parameters=loaded.num_parameters,
        model_source=loaded.source,
    )
    return finish(trainer, loaded, out_dir, metrics)


def resolve_reward(spec: str) -> tuple[RewardFunc, float]:
    """``package.module:function=weight`` (weight defaults to 1) to the function and its weight."""
    import importlib

    target, _, weight = spec.partition("=")
    module_name, _, attribute = target.partition(":")
    if not attribute:
        raise ValueError(f"reward spec {spec!r} must look like package.module:function=weight")
    return getattr(importlib.import_module(module_name), attribute), float(weight or 1.0)


def main(argv: Sequence[str] | None = None) -> int:
    """``accelerate launch -m training.grpo --config ... --prompts rl.jsonl --init runs/sft/final
    --reward training.rewards:accuracy_reward=1 --reward ...``"""
    import argparse

    from training.config import load_config
    from training.sft import read_rows

    parser = argparse.ArgumentParser(description="GRPO on a mart export (JSONL or Parquet)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--init", default=None, help="the SFT checkpoint folder")
    parser.add_argument("--reward", action="append", required=True, help="module:function=weight (repeatable)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    funcs, weights = zip(*(resolve_reward(spec) for spec in args.reward), strict=True)
    result = run_grpo(load_config(args.config), read_rows(args.prompts), list(funcs), list(weights),
                      out_dir=args.out, init_checkpoint=args.init)
    print(result.to_json())
    return 0 if result.status == "completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
