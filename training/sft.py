"""Supervised fine-tuning on mined reasoning chains with TRL's SFTTrainer.

Row contract (one dict per conversation, TRL's conversational vision format):
    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "<think>…</think><answer>B</answer>"}]}],
     "images": [PIL.Image or local path, ...]}          # one entry per {"type": "image"}, in order
``messages_json`` (the mart's JSON-encoded column) is accepted in place of ``messages``; string contents
are wrapped into text blocks; other columns are ignored. Images are decoded lazily from paths.

This module also holds what GRPO shares with SFT: the result record, the TrainingArguments common to
both, dataset building and the throughput callback.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, Image, List
from transformers import TrainerCallback

from training.config import ScheduleSettings, TrainingConfig, accumulation_steps
from training.model_factory import LoadedModel, load_model
from training.processor import save_processor

FINAL_DIR = "final"  # the checkpoint folder inside out_dir that generate() and GRPO load
# Logged values kept per logging step in TrainResult.metrics["curve"] (SFT: loss, token accuracy;
# GRPO: reward and its per-function parts, completion length, KL).
CURVE_KEYS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "mean_token_accuracy", "entropy", "reward",
              "reward_std", "completions/mean_length", "completions/clipped_ratio", "kl",
              "rewards/outcome_reward/mean", "rewards/format_reward/mean", "rewards/process_reward/mean")


@dataclass
class TrainResult:
    """What a training job leaves behind: where the weights are, how it went, and how fast."""

    checkpoint: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    status: str = "completed"  # "completed", or "diverged" when the loss is not finite

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (for GRPO: generation + scoring + update)."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._started: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - Trainer callback signature
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self._started is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.durations.append(time.perf_counter() - self._started)
            self._started = None


def trainer_arguments(schedule: ScheduleSettings, out_dir: Path, gradient_accumulation_steps: int) -> dict[str, Any]:
    """TrainingArguments shared by SFT and GRPO. Precision follows the hardware: bf16 only on CUDA,
    and TRL on CPU needs bf16=False explicitly (its default is True)."""
    on_cuda = torch.cuda.is_available()
    return dict(
        output_dir=str(out_dir),
        learning_rate=schedule.learning_rate,
        lr_scheduler_type=schedule.lr_scheduler_type,
        warmup_steps=schedule.warmup_ratio,  # transformers 5 reads a float < 1 as a ratio of total steps
        num_train_epochs=schedule.num_train_epochs,
        max_steps=schedule.max_steps,
        weight_decay=schedule.weight_decay,
        max_grad_norm=schedule.max_grad_norm,
        per_device_train_batch_size=schedule.per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        bf16=bool(on_cuda and schedule.bf16),
        fp16=False,
        use_cpu=not on_cuda,
        # transformers 5.24's name for gradient checkpointing (the old one is a deprecated alias).
        activation_checkpointing=schedule.gradient_checkpointing,
        logging_steps=schedule.logging_steps,
        save_strategy=schedule.save_strategy,
        save_steps=schedule.save_steps,
        save_total_limit=schedule.save_total_limit,
        dataloader_num_workers=schedule.dataloader_num_workers,
        seed=schedule.seed,
        deepspeed=schedule.deepspeed,
        report_to="none",
        disable_tqdm=True,
    )


def normalize_messages(messages: Sequence[Mapping[str, Any]] | str) -> list[dict[str, Any]]:
    """Structured content blocks everywhere: Arrow needs one type per column, and TRL's image
    placeholders live in block lists. A JSON string (the marts' *_json columns) is decoded first."""
    if isinstance(messages, str):
        messages = json.loads(messages)
    normalized = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        blocks = [
            {"type": "image"} if block["type"] == "image" else {"type": block["type"], "text": block.get("text")}
            for block in content or []
        ]
        normalized.append({"role": message["role"], "content": blocks})
    return normalized


def count_image_placeholders(messages: Sequence[Mapping[str, Any]]) -> int:
    return sum(1 for m in messages for block in m["content"] if block["type"] == "image")


def _images_of(row: Mapping[str, Any]) -> list[Any]:
    images = row.get("images")
    if images is None and row.get("image") is not None:
        images = [row["image"]]
    return [str(image) if isinstance(image, Path) else image for image in images or []]


def with_images(records: list[dict[str, Any]], images: list[list[Any]]) -> Dataset:
    """A Dataset whose ``images`` column decodes PIL images on access (paths stay paths until then)."""
    dataset = Dataset.from_list(records)
    # Encoded as {"path", "bytes"}: a path is stored as is and opened when a batch needs it.
    image_feature = Image()
    encoded = [[image_feature.encode_example(image) for image in row_images] for row_images in images]
    return dataset.add_column("images", encoded, feature=List(image_feature))


def apply_task_mixture(rows: list[Mapping[str, Any]], schedule: ScheduleSettings) -> list[Mapping[str, Any]]:
    """The rows a trainer sees: drawn by task mixture weight when the config asks for it, with the
    config's ``task_weights`` or else the rows' own ``weight`` (mart rows carry one), else as given."""
    if not schedule.task_mixture or not rows:
        return rows
    from training.datasets import mixture_sample

    if schedule.task_weights is not None:
        weights = schedule.task_weights
        rows = [dict(r, weight=float(weights.get(str(r.get("task")), 0.0))) for r in rows]
    elif not all("weight" in r for r in rows):
        return rows
    return mixture_sample(rows, len(rows), schedule.seed)


def sft_dataset(rows: Iterable[Mapping[str, Any]]) -> Dataset:
    records, images = [], []
    for index, row in enumerate(rows):
        messages = normalize_messages(row["messages"] if "messages" in row else row["messages_json"])
        row_images = _images_of(row)
        if count_image_placeholders(messages) != len(row_images):
            raise ValueError(
                f"SFT row {index}: {count_image_placeholders(messages)} image placeholders but {len(row_images)} images"
            )
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"SFT row {index}: no assistant turn to learn from")
        records.append({"messages": messages})
        images.append(row_images)
    if not records:
        raise ValueError("no SFT rows")
    return with_images(records, images)


def conversation_texts(rows: Iterable[Mapping[str, Any]], key: str) -> list[str]:
    """Every text block of the rows: the corpus a locally trained tokenizer learns from."""
    texts = []
    for row in rows:
        raw = row.get(key, row.get(f"{key}_json"))
        if raw is None:
            continue
        for message in normalize_messages(raw):
            texts.extend(block["text"] for block in message["content"] if block.get("text"))
    return texts


def peak_gpu_memory_gb() -> float | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**30


def summarize(trainer: Any, train_output: Any, timer: StepTimer, wall_s: float) -> dict[str, Any]:
    """Loss, steps and throughput from a finished trainer; num_tokens is TRL's running count of
    non-padding tokens, logged with every logging step."""
    history = trainer.state.log_history
    tokens = max((entry.get("num_tokens", 0) for entry in history), default=0)
    losses = [entry["loss"] for entry in history if "loss" in entry]
    step_times = timer.durations
    # The training curve (one entry per logging step): what fct_training_runs keeps for plotting.
    curve = [{k: entry[k] for k in CURVE_KEYS if k in entry} for entry in history
             if "loss" in entry or "reward" in entry]
    metrics: dict[str, Any] = {
        "train_loss": float(train_output.training_loss),
        "last_logged_loss": float(losses[-1]) if losses else None,
        "steps": int(trainer.state.global_step),
        "wall_time_s": wall_s,
        "train_runtime_s": float(train_output.metrics.get("train_runtime", wall_s)),
        "tokens": int(tokens),
        # Over the optimizer steps' own time (data loading included, trainer setup and saving excluded).
        "tokens_per_s": tokens / sum(step_times) if step_times and sum(step_times) > 0 else None,
        "mean_step_time_s": sum(step_times) / len(step_times) if step_times else None,
        "step_times_s": list(step_times),
        "peak_gpu_memory_gb": peak_gpu_memory_gb(),
        "curve": curve,
    }
    return metrics


def save_final(trainer: Any, loaded: LoadedModel, out_dir: Path) -> Path:
    """Full weights + processor in out_dir/final. A LoRA run is merged first, so generate() and the
    next stage load one plain checkpoint. Under a multi-process launch only the main process writes
    files; ``trainer.save_model`` itself is collective (DeepSpeed gathers the weights)."""
    from accelerate.utils import is_peft_model

    final = out_dir / FINAL_DIR
    is_main = trainer.accelerator.is_main_process
    if is_peft_model(trainer.model):
        if is_main:
            trainer.model.merge_and_unload().save_pretrained(final)
    else:
        trainer.save_model(str(final))
    if is_main:
        save_processor(loaded.processor, final)
    trainer.accelerator.wait_for_everyone()
    return final


def write_result(trainer: Any, result: TrainResult, out_dir: Path) -> None:
    if trainer.accelerator.is_main_process:
        (out_dir / "train_result.json").write_text(result.to_json())


def reset_gpu_peak_memory() -> None:
    """So that peak_gpu_memory_gb describes this job, not what the process did before it."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def run_sft(
    cfg: TrainingConfig,
    train_rows: Iterable[Mapping[str, Any]],
    eval_rows: Iterable[Mapping[str, Any]] | None = None,
    out_dir: str | Path = "out/sft",
    loaded: LoadedModel | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Fine-tune the config's model on ``train_rows`` and save it to ``out_dir/final``.

    ``loaded`` lets a caller pass a model it already built (benchmarks); otherwise the config decides.
    """
    from trl import SFTConfig, SFTTrainer

    from training.datasets import task_counts

    out_dir = Path(out_dir)
    train_rows = list(train_rows)
    s = cfg.sft
    drawn = apply_task_mixture(train_rows, s)
    train_dataset = sft_dataset(drawn)
    eval_dataset = sft_dataset(eval_rows) if eval_rows is not None else None
    if loaded is None:
        loaded = load_model(cfg.model, corpus=conversation_texts(train_rows, "messages"))

    accumulation = accumulation_steps(s.global_batch_size, s.per_device_train_batch_size, s.gradient_accumulation_steps)
    args = SFTConfig(
        **trainer_arguments(s, out_dir, accumulation),
        max_length=s.max_length,
        assistant_only_loss=s.assistant_only_loss,
        eval_strategy="epoch" if eval_dataset is not None else "no",
        per_device_eval_batch_size=s.per_device_train_batch_size,
    )
    timer = StepTimer()
    trainer = SFTTrainer(
        model=loaded.model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=loaded.processor,
        callbacks=[timer, *callbacks],
    )
    metrics = timed_train(trainer, timer)
    metrics.update(gradient_accumulation_steps=accumulation, train_rows=len(train_dataset),
                   rows_per_task=task_counts(drawn), task_mixture=drawn is not train_rows,
                   num_parameters=loaded.num_parameters, model_source=loaded.source)
    if eval_dataset is not None:
        metrics["eval_loss"] = float(trainer.evaluate()["eval_loss"])
    return finish(trainer, loaded, out_dir, metrics)


def timed_train(trainer: Any, timer: "StepTimer") -> dict[str, Any]:
    """Train, timing the whole run (and resetting the GPU memory peak first); the summary metrics."""
    reset_gpu_peak_memory()
    started = time.perf_counter()
    train_output = trainer.train()
    return summarize(trainer, train_output, timer, time.perf_counter() - started)


def finish(trainer: Any, loaded: LoadedModel, out_dir: Path, metrics: dict[str, Any]) -> TrainResult:
    """Save the final checkpoint and the result record; a non-finite loss marks the run diverged."""
    status = "completed" if math.isfinite(metrics["train_loss"]) else "diverged"
    final = save_final(trainer, loaded, out_dir)
    result = TrainResult(checkpoint=str(final), metrics=metrics, status=status)
    write_result(trainer, result, out_dir)
    return result


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows from a JSONL or Parquet export of a mart (the launch scripts' input)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """``accelerate launch [--config_file configs/accelerate/zero2.yaml] -m training.sft --config ... --train ...``"""
    import argparse

    from training.config import load_config

    parser = argparse.ArgumentParser(description="SFT on a mart export (JSONL or Parquet)")
    parser.add_argument("--config", required=True, help="a YAML path or a name in configs/")
    parser.add_argument("--train", required=True)
    parser.add_argument("--eval", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    result = run_sft(
        load_config(args.config),
        read_rows(args.train),
        read_rows(args.eval) if args.eval else None,
        out_dir=args.out,
    )
    print(result.to_json())
    return 0 if result.status == "completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
