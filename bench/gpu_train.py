"""Throughput and memory of radchain's SFT and GRPO steps at the release's sizes, without downloads.

Builds Qwen2-VL models with random weights in the shapes of the public 2B and 7B configs (the numbers
in configs/qwen2vl-2b.yaml and configs/qwen2vl-7b-release.yaml), then runs the real training code
(training.sft.run_sft, training.grpo.run_grpo) for a few steps on synthetic conversations of the
release's lengths: 2048-token prompts (one 448x448 image = 256 tokens, plus text) and 2048-token
answers. Prints, per size: SFT tokens/s, GRPO step time, model FLOPs utilisation (MFU: the step's model
FLOPs per second, training/flops.py, over the device's peak dense bf16 FLOPs) and peak GPU memory.

    python bench/gpu_train.py                       # on a GPU: 2B and 7B, bf16
    python bench/gpu_train.py --sizes 2b --sft-steps 5
    python bench/gpu_train.py --cpu-size            # tiny shapes, CPU, short sequences (tests)
    python bench/gpu_train.py --estimate            # per-GPU memory plan of every GPU config (no GPU needed)

One GPU, pure bf16 weights (no fp32 master copy) so that a 7B full fine-tune with AdamW and the GRPO
reference model fit in one H200; gradient checkpointing as in the configs. Random weights rarely emit
<|im_end|>, and rollouts are forced to full length (min_new_tokens), so the GRPO step time is that of
2048-token completions. Each result line starts with RESULT; --json writes them all.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Runnable as a plain script from a checkout: the repository root holds the training package.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from training.config import ImageSettings, TrainingConfig, load_config  # noqa: E402
from training.flops import grpo_step_flops, mfu, model_shape, peak_tflops, sft_step_flops  # noqa: E402
from training.grpo import run_grpo  # noqa: E402
from training.model_factory import LoadedModel, build_model_from_architecture, load_model  # noqa: E402
from training.processor import RadchainVLProcessor, build_image_processor  # noqa: E402
from training.sft import run_sft  # noqa: E402
from training.tokenizer import train_bpe_tokenizer  # noqa: E402

SIZES = {"2b": "qwen2vl-2b", "7b": "qwen2vl-7b-release", "tiny": "tiny-cpu"}
WORDS = (
    "the lungs are clear there is no focal consolidation pleural effusion or pneumothorax heart size "
    "normal mediastinal contour unchanged mild pulmonary edema small left basilar atelectasis right "
    "internal jugular catheter terminates in the superior vena cava compared with the prior study"
).split()


def synthetic_text(tokenizer: Any, target_tokens: int, seed: int) -> str:
    """Radiology-like words until the text is about ``target_tokens`` tokens long."""
    rng = random.Random(seed)
    words: list[str] = []
    while True:
        words.extend(rng.choice(WORDS) for _ in range(max(8, target_tokens // 4)))
        text = " ".join(words)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= target_tokens:
            return tokenizer.decode(ids[:target_tokens])


def synthetic_rows(
    processor: RadchainVLProcessor, n: int, prompt_tokens: int, completion_tokens: int, image_px: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """SFT conversations and GRPO prompts whose rendered prompt is ~prompt_tokens (image included)."""
    image_tokens = processor.image_token_count(image_px, image_px)
    template_overhead = 30  # system turn, role headers, vision markers
    question_tokens = max(8, prompt_tokens - image_tokens - template_overhead)
    sft_rows, grpo_rows = [], []
    for i in range(n):
        image = Image.new("L", (image_px, image_px), color=(i * 37) % 255)
        question = synthetic_text(processor.tokenizer, question_tokens, seed=i)
        answer = synthetic_text(processor.tokenizer, completion_tokens, seed=1000 + i)
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        sft_rows.append({
            "messages": [user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "images": [image],
        })
        grpo_rows.append({"prompt": [user], "images": [image], "solution": "A", "task": "binary", "sample_id": f"b{i}"})
    return sft_rows, grpo_rows


def length_reward(completions: list[list[dict[str, str]]], **kwargs: Any) -> list[float]:
    """Any non-constant reward: GRPO needs reward differences within a group to produce a gradient."""
    return [float(len(c[0]["content"]) % 7) for c in completions]


def bench_config(name: str, cpu: bool, args: argparse.Namespace) -> TrainingConfig:
    cfg = load_config(SIZES[name])
    sft = cfg.sft.model_copy(update=dict(
        max_steps=args.sft_steps, num_train_epochs=1, global_batch_size=None, gradient_accumulation_steps=1,
        per_device_train_batch_size=args.batch, logging_steps=1, save_strategy="no", warmup_ratio=0.0,
        dataloader_num_workers=0, deepspeed=None,
    ))
    generations = 2 if cpu else args.generations
    grpo = cfg.grpo.model_copy(update=dict(
        max_steps=args.grpo_steps, num_train_epochs=1, num_generations=generations, prompts_per_step=1,
        per_device_train_batch_size=generations, gradient_accumulation_steps=1, logging_steps=1,
        save_strategy="no", max_prompt_length=None, max_completion_length=args.completion_tokens,
        min_new_tokens=args.completion_tokens, use_vllm=False, dataloader_num_workers=0, deepspeed=None,
        steps_per_generation=None, generation_batch_size=None,  # one prompt group per step: one generate()
    ))
    model = cfg.model.model_copy(update=dict(
        name_or_path=None,  # random weights of the checkpoint's shape
        dtype="float32" if cpu else "bfloat16",
        attn_implementation=None if cpu else cfg.model.attn_implementation,
        lora=None,
        # The same pixel budget for the SFT model and the GRPO model reloaded from its checkpoint.
        images=ImageSettings(min_pixels=56 * 56, max_pixels=args.image_px * args.image_px),
    ))
    return cfg.model_copy(update=dict(sft=sft, grpo=grpo, model=model))


def build_loaded(cfg: TrainingConfig, device: str | None) -> LoadedModel:
    tokenizer = train_bpe_tokenizer(WORDS, vocab_size=cfg.model.tokenizer.vocab_size)
    images = cfg.model.images
    image_processor = build_image_processor(min_pixels=images.min_pixels, max_pixels=images.max_pixels)
    processor = RadchainVLProcessor(image_processor, tokenizer)
    dtype = torch.float32 if cfg.model.dtype == "float32" else torch.bfloat16
    model = build_model_from_architecture(
        cfg.model.architecture, tokenizer, dtype=dtype, device=device,
        attn_implementation=cfg.model.attn_implementation, seed=cfg.model.seed,
    )
    return LoadedModel(model=model, processor=processor, source="architecture")


def steady_mean(values: list[float]) -> float | None:
    """Mean step time without the first step (CUDA kernel selection, allocator warm-up)."""
    steady = values[1:] or values
    return sum(steady) / len(steady) if steady else None


def peak_host_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def reset_gpu_peak() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def gpu_peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def bench_size(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    cpu = args.cpu_size
    device = None if cpu else "cuda"
    cfg = bench_config(name, cpu, args)
    device_name = "cpu" if cpu else torch.cuda.get_device_name(0)
    # MFU's denominator: --peak-tflops, else the device's datasheet figure (none for a CPU or an unknown card)
    peak = args.peak_tflops or (None if cpu else peak_tflops(device_name))
    result: dict[str, Any] = {"size": name, "device": device_name, "peak_tflops": peak,
                              "dtype": cfg.model.dtype, "prompt_tokens": args.prompt_tokens,
                              "completion_tokens": args.completion_tokens, "image_px": args.image_px}

    if not cpu:  # the plan for this very run (in process, one GPU, pure bf16), beside the measured peaks
        from training.memory import estimate

        planned = cfg.model_copy(update={
            "launch": cfg.launch.model_copy(update={"mode": "in_process"}),
            "grpo": cfg.grpo.model_copy(update={"max_prompt_length": args.prompt_tokens}),
        })
        for job in ("sft", "grpo"):
            result[f"{job}_estimate_gb"] = estimate(planned, job, world_size=1).total_gb
    reset_gpu_peak()
    started = time.perf_counter()
    loaded = build_loaded(cfg, device)
    result["build_s"] = time.perf_counter() - started
    result["parameters_m"] = loaded.num_parameters / 1e6
    shape = model_shape(loaded.model)
    patches = loaded.processor.image_token_count(args.image_px, args.image_px) * shape.vision.merge
    rows_needed = max(args.sft_steps * args.batch, 1)
    sft_rows, grpo_rows = synthetic_rows(
        loaded.processor, rows_needed, args.prompt_tokens, args.completion_tokens, args.image_px
    )

    # SFT: sequences of prompt + completion tokens; tokens/s over steady-state steps.
    sft = run_sft(cfg, sft_rows, out_dir=work / name / "sft", loaded=loaded)
    steps = sft.metrics["steps"]
    tokens_per_step = sft.metrics["tokens"] / steps if steps else 0
    step_s = steady_mean(sft.metrics.get("step_times_s") or [])
    result.update(
        sft_steps=steps,
        sft_loss=sft.metrics["train_loss"],
        sft_tokens_per_step=tokens_per_step,
        sft_step_s=step_s,
        sft_tokens_per_s=tokens_per_step / step_s if step_s else None,
        sft_peak_gpu_gb=gpu_peak_gb(),
    )
    # Every row holds one image; its sequence length is what the trainer counted, image tokens included.
    sequence_tokens = round(tokens_per_step / args.batch) if steps else 0
    flops = sft_step_flops(shape, args.batch, sequence_tokens, 1, patches)
    result.update(sft_step_tflop=flops / 1e12, sft_mfu=mfu(flops, step_s, peak))
    del loaded, sft_rows
    reset_gpu_peak()

    # GRPO from the SFT checkpoint (as in the pipeline): generation of full-length rollouts, scoring,
    # reference log-probs and one policy update per step.
    grpo_loaded = load_model(cfg.model, device=device, init_checkpoint=sft.checkpoint)
    grpo = run_grpo(cfg, grpo_rows[:1], [length_reward], out_dir=work / name / "grpo", loaded=grpo_loaded)
    result.update(
        grpo_steps=grpo.metrics["steps"],
        grpo_generations=cfg.grpo.num_generations,
        grpo_step_s=steady_mean(grpo.metrics.get("step_times_s") or []),
        grpo_peak_gpu_gb=gpu_peak_gb(),
        peak_host_rss_gb=peak_host_rss_gb(),
    )
    flops = grpo_step_flops(shape, cfg.grpo.num_generations, args.prompt_tokens, args.completion_tokens, 1,
                            patches, reference=cfg.grpo.beta > 0)
    result.update(grpo_step_tflop=flops / 1e12, grpo_mfu=mfu(flops, result["grpo_step_s"], peak))
    del grpo_loaded
    reset_gpu_peak()
    for job in ("sft", "grpo"):  # the plan checked against what the card held (it leaves out the CUDA context)
        peak_gb, planned_gb = result.get(f"{job}_peak_gpu_gb"), result.get(f"{job}_estimate_gb")
        result[f"{job}_peak_over_estimate"] = peak_gb / planned_gb if peak_gb and planned_gb else None
    if not args.keep:
        shutil.rmtree(work / name, ignore_errors=True)  # a 7B checkpoint is 16 GB
    return result


def format_result(result: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        if value is None:
            return "n/a"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    keys = ("size", "parameters_m", "sft_tokens_per_s", "sft_step_s", "sft_mfu", "sft_peak_gpu_gb",
            "sft_estimate_gb", "sft_peak_over_estimate", "grpo_step_s", "grpo_mfu", "grpo_peak_gpu_gb",
            "grpo_estimate_gb", "grpo_peak_over_estimate", "peak_tflops",
            "peak_host_rss_gb", "sft_loss")
    return "RESULT " + " ".join(f"{k}={fmt(result.get(k))}" for k in keys)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2b,7b", help="comma-separated: 2b, 7b")
    parser.add_argument("--cpu-size", action="store_true", help="tiny shapes on CPU with short sequences")
    parser.add_argument("--sft-steps", type=int, default=3)
    parser.add_argument("--grpo-steps", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1, help="SFT sequences per step")
    parser.add_argument("--generations", type=int, default=8, help="GRPO rollouts per prompt (one prompt per step)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="default 2048 (64 with --cpu-size)")
    parser.add_argument("--completion-tokens", type=int, default=None, help="default 2048 (8 with --cpu-size)")
    parser.add_argument("--image-px", type=int, default=None, help="default 448 (56 with --cpu-size)")
    parser.add_argument("--json", type=Path, default=None, help="write all results to this file")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak dense bf16 TFLOPS for MFU (default: the datasheet figure of a "
                             "known GPU, training/flops.py; none on a CPU)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints written in the workdir")
    parser.add_argument("--estimate", action="store_true", help="print the per-GPU memory estimate of each "
                                                                "config (training/memory.py) and exit")
    parser.add_argument("--gpus", default="1,8", help="--estimate: world sizes to estimate for")
    args = parser.parse_args(argv)
    small = args.cpu_size
    args.prompt_tokens = args.prompt_tokens or (64 if small else 2048)
    args.completion_tokens = args.completion_tokens or (8 if small else 2048)
    args.image_px = args.image_px or (56 if small else 448)
    return args


def print_estimates(args: argparse.Namespace) -> list[dict[str, Any]]:
    """ESTIMATE lines: weights, gradients, optimizer, activations, logits, reference, KV cache per GPU."""
    from training.memory import estimate, format_estimate

    rows = []
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        cfg = load_config(SIZES[size])
        for gpus in [int(g) for g in args.gpus.split(",")]:
            for job in ("sft", "grpo"):
                e = estimate(cfg, job, world_size=gpus)
                print(format_estimate(e), flush=True)
                rows.append(e.as_dict())
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.estimate:
        rows = print_estimates(args)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return 0
    if not args.cpu_size and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --cpu-size", file=sys.stderr)
        return 2
    sizes = ["tiny"] if args.cpu_size else [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        print(f"unknown sizes {unknown}; choose from 2b, 7b", file=sys.stderr)
        return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="radchain-bench-"))
    results = []
    for size in sizes:
        result = bench_size(size, args, work)
        results.append(result)
        print(format_result(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
