"""The training core on a tiny random Qwen2-VL: real TRL trainers, real checkpoints, no network.

One SFT run and one GRPO run (from the SFT checkpoint) are shared by the tests of this module; each
takes a few seconds on CPU.
"""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from training.config import LoraSettings, TrainingConfig, accumulation_steps, load_config
from training.generate import generate
from training.grpo import grpo_dataset, prompt_length, run_grpo
from training.model_factory import build_model_from_architecture, load_model, load_trained
from training.processor import RadchainVLProcessor, build_image_processor, load_processor, save_processor
from training.sft import apply_task_mixture, conversation_texts, run_sft, sft_dataset
from training.tokenizer import (
    IM_END,
    IMAGE_PAD,
    SPECIAL_TOKENS,
    load_tokenizer,
    save_tokenizer,
    train_bpe_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
QUESTION = "Does this chest X-ray show pleural effusion? Options: A) Yes B) No"
ANSWER = "<think>The costophrenic angles are sharp. No pleural effusion.</think><answer>B</answer>"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a non-loopback connection fails the test: training must run offline."""
    real_connect = socket.socket.connect

    def guarded(self, address):  # noqa: ANN001
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"network access attempted: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="module")
def cfg() -> TrainingConfig:
    return load_config("tiny-cpu")


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("images") / "prior.png"
    Image.new("L", (70, 56), 90).save(path)  # grayscale, not a multiple of 28: resized by the processor
    return str(path)


def sft_row(i: int, image_path: str) -> dict:
    if i % 4 == 3:  # a temporal sample: prior (a file path) then current image
        images = [image_path, Image.new("RGB", (56, 56), (i * 30, 0, 0))]
        question = "Given a reference image and a new image, what is the progression of edema? A) stable B) worsening"
    else:
        images, question = [Image.new("RGB", (56, 56), (i * 30, 40, 0))], QUESTION
    user = {"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": question}]}
    assistant = {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}
    return {"messages": [user, assistant], "images": images, "task": "binary", "weight": 0.1}


def grpo_row(i: int, image_path: str) -> dict:
    images = [image_path, Image.new("RGB", (56, 56))] if i % 2 else [Image.new("RGB", (56, 56), (0, i * 50, 0))]
    content = [*({"type": "image"} for _ in images), {"type": "text", "text": QUESTION}]
    return {
        "prompt": [{"role": "user", "content": content}],
        "images": images,
        "solution": "B",
        "task": "temporal" if i % 2 else "binary",
        "gold_steps": ["The costophrenic angles are sharp.", "No pleural effusion."],
        "gold_labels": json.dumps({"Pleural Effusion": "negative"}),
        "sample_id": f"sample-{i}",
    }


@pytest.fixture(scope="module")
def sft_rows(image_path) -> list[dict]:
    return [sft_row(i, image_path) for i in range(4)]


@pytest.fixture(scope="module")
def sft_result(cfg, sft_rows, tmp_path_factory):
    return run_sft(cfg, sft_rows, eval_rows=sft_rows[:2], out_dir=tmp_path_factory.mktemp("sft"))


def format_reward(completions, **kwargs) -> list[float]:
    pattern = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>$", re.S)
    return [1.0 if pattern.match(c[0]["content"].strip()) else 0.0 for c in completions]


class KwargsProbe:
    """A reward that records the dataset columns TRL hands it."""

    __name__ = "kwargs_probe"

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, completions, solution, task, gold_steps, gold_labels, sample_id, **kwargs) -> list[float]:
        self.calls.append(dict(n=len(completions), solution=solution, task=task, gold_steps=gold_steps,
                               gold_labels=gold_labels, sample_id=sample_id, images=kwargs.get("images")))
        return [float(len(c[0]["content"]) % 5) for c in completions]


@pytest.fixture(scope="module")
def grpo_run(cfg, sft_result, image_path, tmp_path_factory):
    probe = KwargsProbe()
    rows = [grpo_row(i, image_path) for i in range(2)]
    result = run_grpo(cfg, rows, [format_reward, probe], [1.0, 0.5],
                      out_dir=tmp_path_factory.mktemp("grpo"), init_checkpoint=sft_result.checkpoint)
    return result, probe


# --- tokenizer ---------------------------------------------------------------------------------------


def test_tokenizer_round_trips_and_carries_the_qwen2vl_special_tokens(tmp_path):
    tokenizer = train_bpe_tokenizer(["Small right apical pneumothorax."], vocab_size=400)
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == "<|endoftext|>"
    for text in [ANSWER, "naïve — 肺 ✓\n\ttabs  and  spaces", "<answer>A, C</answer>", ""]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # Special tokens are single ids, never split by BPE.
    assert tokenizer(IMAGE_PAD * 3)["input_ids"] == [tokenizer.convert_tokens_to_ids(IMAGE_PAD)] * 3

    reloaded = load_tokenizer(save_tokenizer(tokenizer, tmp_path / "tok"))
    assert reloaded(ANSWER)["input_ids"] == tokenizer(ANSWER)["input_ids"]
    assert reloaded.chat_template == tokenizer.chat_template


def test_chat_template_renders_qwen2vl_format_and_masks_the_answer():
    tokenizer = train_bpe_tokenizer(vocab_size=400)
    # As rows come out of a datasets.Dataset: image blocks carry a null "text" key.
    messages = [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Q?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<answer>B</answer>"}]},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n"
        "<|im_start|>assistant\n<answer>B</answer><|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("Q?<|im_end|>\n<|im_start|>assistant\n")
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    kept = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(kept) == "<answer>B</answer><|im_end|>"


# --- processor ---------------------------------------------------------------------------------------


def test_processor_expands_each_image_pad_to_its_patch_grid(tmp_path):
    tokenizer = train_bpe_tokenizer(vocab_size=400)
    processor = RadchainVLProcessor(build_image_processor(max_pixels=448 * 448), tokenizer)
    conversation = [{"role": "user", "content": [
        {"type": "image", "image": Image.new("RGB", (56, 56))},   # 4x4 patches -> 4 tokens
        {"type": "image", "image": Image.new("RGB", (56, 84))},   # w=56, h=84: 6x4 patches -> 6 tokens
        {"type": "text", "text": "Compare."}]}]
    out = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                        return_dict=True, return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 4, 4], [1, 6, 4]]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    assert int((out["input_ids"] == image_id).sum()) == 4 + 6
    assert torch.equal(out["mm_token_type_ids"].bool(), out["input_ids"] == image_id)
    assert out["pixel_values"].shape[0] == 16 + 24  # one row per 14x14 patch
    assert processor.image_token_count(448, 448) == 256  # the release's 448x448 budget

    reloaded = load_processor(save_processor(processor, tmp_path / "proc"))
    assert reloaded.image_processor.size["longest_edge"] == 448 * 448
    again = reloaded.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                         return_dict=True, return_tensors="pt")
    assert torch.equal(again["input_ids"], out["input_ids"])


def test_trl_collator_trains_on_the_assistant_turn_only(cfg, sft_rows):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    loaded = load_model(cfg.model)
    collator = DataCollatorForVisionLanguageModeling(processor=loaded.processor, assistant_only_loss=True)
    batch = collator([dict(example) for example in sft_dataset(sft_rows).select(range(2))])
    for labels in batch["labels"]:
        kept = labels[labels != -100]
        assert loaded.processor.tokenizer.decode(kept) == ANSWER + IM_END


# --- config and model factory ------------------------------------------------------------------------


def test_release_config_carries_the_papers_recipe():
    cfg = load_config("qwen2vl-7b-release")
    assert cfg.model.name_or_path == "Qwen/Qwen2-VL-7B-Instruct"
    s, g = cfg.sft, cfg.grpo
    assert (s.learning_rate, s.lr_scheduler_type, s.warmup_ratio, s.num_train_epochs) == (2e-6, "cosine", 0.1, 5)
    assert s.global_batch_size == 128 and s.bf16 and cfg.model.lora is None
    assert cfg.model.images.max_pixels == 448 * 448
    assert (g.num_generations, g.prompts_per_step, g.learning_rate, g.beta) == (8, 256, 5e-7, 0.001)
    assert (g.max_prompt_length, g.max_completion_length, g.num_train_epochs) == (2048, 2048, 3)
    # 128 sequences on 8 GPUs x 2 per device -> 8 accumulation steps; 256 prompts x 8 rollouts on 8 x 8 -> 32.
    assert accumulation_steps(s.global_batch_size, s.per_device_train_batch_size, 1, processes=8) == 8
    assert accumulation_steps(g.prompts_per_step * g.num_generations, g.per_device_train_batch_size, 1,
                              processes=8) == 32
    with pytest.raises(ValueError):
        accumulation_steps(100, 8, 1, processes=8)
    assert load_config("qwen2vl-2b").model.name_or_path == "Qwen/Qwen2-VL-2B-Instruct"


def test_config_rejects_unknown_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {name_or_path: m}\nsft: {learnig_rate: 0.1}\n")
    with pytest.raises(ValidationError):
        load_config(bad)


def test_accelerate_zero2_config_parses():
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(REPO / "configs/accelerate/zero2.yaml"))
    assert config.distributed_type == "DEEPSPEED"
    assert config.deepspeed_config["zero_stage"] == 2 and config.mixed_precision == "bf16"


def test_tiny_model_is_built_offline_with_the_tokenizers_ids(cfg):
    loaded = load_model(cfg.model)
    config, tokenizer = loaded.model.config, loaded.processor.tokenizer
    assert loaded.num_parameters < 300_000
    assert config.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    assert config.text_config.vocab_size == len(tokenizer)
    assert loaded.model.generation_config.eos_token_id[0] == tokenizer.convert_tokens_to_ids(IM_END)


def test_a_checkpoint_folder_loads_through_the_auto_class(tmp_path):
    # A stand-in for a downloaded Qwen2.5-VL: saved to a folder, loaded by path with local_files_only.
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from training.config import ModelSettings
    from training.tokenizer import VIDEO_PAD, VISION_END, VISION_START

    tokenizer = train_bpe_tokenizer(vocab_size=300)
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, eos_token_id=ids(IM_END), pad_token_id=0,
                         bos_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
        image_token_id=ids(IMAGE_PAD), video_token_id=ids(VIDEO_PAD),
        vision_start_token_id=ids(VISION_START), vision_end_token_id=ids(VISION_END),
    )
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(tmp_path)
    save_processor(RadchainVLProcessor(build_image_processor(), tokenizer), tmp_path)

    loaded = load_model(ModelSettings(name_or_path=str(tmp_path), dtype="float32"))
    assert type(loaded.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert loaded.source == f"checkpoint:{tmp_path}"
    row = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}],
           "images": [Image.new("RGB", (56, 56))]}
    (text,) = generate(loaded, [row], max_new_tokens=3)
    assert isinstance(text, str)


@pytest.mark.parametrize(("name", "billions"), [("qwen2vl-2b", 2.209), ("qwen2vl-7b-release", 8.291)])
def test_release_shapes_match_the_public_parameter_counts(name, billions):
    # On the meta device: the shapes without allocating a byte.
    architecture = load_config(name).model.architecture
    model = build_model_from_architecture(architecture, train_bpe_tokenizer(vocab_size=300), device="meta")
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.001)


# --- SFT ---------------------------------------------------------------------------------------------


def test_sft_trains_and_saves_a_loadable_checkpoint(cfg, sft_rows, sft_result):
    assert sft_result.status == "completed"
    m = sft_result.metrics
    assert m["steps"] >= 2 and math.isfinite(m["train_loss"])
    assert m["tokens"] > 0 and m["tokens_per_s"] > 0 and m["wall_time_s"] > 0
    assert math.isfinite(m["eval_loss"])
    checkpoint = Path(sft_result.checkpoint)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json"):
        assert (checkpoint / name).exists(), name
    assert json.loads((checkpoint.parent / "train_result.json").read_text())["metrics"]["steps"] == m["steps"]

    # The weights moved away from the (seeded, reproducible) initialisation.
    initial = load_model(cfg.model, corpus=conversation_texts(sft_rows, "messages")).model.state_dict()
    trained = load_trained(checkpoint).model.state_dict()
    assert initial.keys() == trained.keys()
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)


def test_sft_draws_rows_by_task_mixture_and_records_its_curve(sft_result, cfg):
    m = sft_result.metrics
    assert m["task_mixture"] is True and m["rows_per_task"] == {"binary": 4}
    losses = [entry["loss"] for entry in m["curve"] if "loss" in entry]
    assert len(losses) == m["steps"] and all(math.isfinite(x) for x in losses)  # logging_steps 1


def test_task_mixture_applies_the_weights_unless_turned_off_or_absent(cfg):
    rows = [dict(task="binary", weight=0.9, i=i) for i in range(10)] + \
           [dict(task="open", weight=0.1, i=i) for i in range(10)]
    drawn = apply_task_mixture(rows, cfg.sft)
    assert len(drawn) == 20 and sum(r["task"] == "binary" for r in drawn) >= 15
    assert apply_task_mixture(rows, cfg.sft) == drawn  # seeded
    assert apply_task_mixture(rows, cfg.sft.model_copy(update={"task_mixture": False})) is rows
    unweighted = [dict(task="binary"), dict(task="open")]
    assert apply_task_mixture(unweighted, cfg.sft) is unweighted
    # The config's task_weights replace the marts' weights: here only open rows are drawn.
    only_open = apply_task_mixture(rows, cfg.sft.model_copy(update={"task_weights": {"open": 1.0}}))
    assert len(only_open) == 20 and {r["task"] for r in only_open} == {"open"}


def test_sft_accepts_mart_json_columns_and_rejects_image_mismatches(sft_rows, image_path):
    mart_row = {"messages_json": json.dumps(sft_row(0, image_path)["messages"]), "images": [image_path]}
    assert len(sft_dataset([mart_row])) == 1
    broken = dict(sft_rows[0], images=[])
    with pytest.raises(ValueError, match="image placeholders"):
        sft_dataset([broken])


def test_sft_command_line_reads_a_jsonl_export(image_path, tmp_path):
    # The entry point of `accelerate launch -m training.sft`: mart rows with JSON messages and image paths.
    from training.sft import main

    rows = [{"messages_json": json.dumps(sft_row(0, image_path)["messages"]), "images": [image_path],
             "example_id": "e0"}]
    export = tmp_path / "sft.jsonl"
    export.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["--config", "tiny-cpu", "--train", str(export), "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "train_result.json").read_text())["status"] == "completed"
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_sft_with_lora_saves_merged_weights(cfg, sft_rows, tmp_path):
    lora_cfg = cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"lora": LoraSettings(r=4, alpha=8, dropout=0.0)}),
        "sft": cfg.sft.model_copy(update={"max_steps": 1}),
    })
    result = run_sft(lora_cfg, sft_rows[:2], out_dir=tmp_path)
    assert result.metrics["steps"] == 1
    reloaded = load_trained(result.checkpoint).model
    assert not any("lora" in name for name, _ in reloaded.named_parameters())


# --- GRPO --------------------------------------------------------------------------------------------


def test_grpo_runs_from_the_sft_checkpoint_with_two_rewards(grpo_run, sft_result, cfg):
    result, probe = grpo_run
    assert result.status == "completed"
    m = result.metrics
    assert m["steps"] >= 1 and math.isfinite(m["train_loss"])
    assert m["model_source"] == f"checkpoint:{sft_result.checkpoint}"
    assert m["reward_names"] == ["format_reward", "kwargs_probe"]
    assert (Path(result.checkpoint) / "model.safetensors").exists()

    # The extra columns arrive in the reward function, one value per completion.
    assert probe.calls, "the reward function was never called"
    call = probe.calls[0]
    assert call["n"] == cfg.grpo.num_generations * cfg.grpo.prompts_per_step
    assert call["solution"] == ["B"] * call["n"]
    assert set(call["task"]) <= {"binary", "temporal"}
    assert call["gold_steps"][0] == ["The costophrenic angles are sharp.", "No pleural effusion."]
    assert json.loads(call["gold_labels"][0]) == {"Pleural Effusion": "negative"}
    assert call["sample_id"][0].startswith("sample-")
    assert all(isinstance(image, Image.Image) for image in call["images"][0])


def test_grpo_steps_per_generation_splits_a_step_into_smaller_generate_calls(cfg, image_path, tmp_path):
    # Two prompts x 2 rollouts per step on 2 completions per micro-step: gradient accumulation 2. TRL's
    # default generates all 4 completions in one call; steps_per_generation=1 generates 2 at a time.
    grpo = cfg.grpo.model_copy(update=dict(prompts_per_step=2, steps_per_generation=1, beta=0.0))
    small = cfg.model_copy(update=dict(grpo=grpo))
    probe = KwargsProbe()
    rows = [grpo_row(0, image_path), grpo_row(2, image_path)]
    result = run_grpo(small, rows, [probe], out_dir=tmp_path)
    assert result.metrics["gradient_accumulation_steps"] == 2
    assert [call["n"] for call in probe.calls] == [2, 2]
    with pytest.raises(ValidationError):
        grpo.model_validate(dict(grpo.model_dump(), generation_batch_size=4))


def test_grpo_without_sft_checkpoint_saves_the_initial_policy_for_the_reference(cfg, image_path, tmp_path):
    # beta > 0: TRL loads the KL reference from the policy's path, so an in-memory model is saved first.
    result = run_grpo(cfg, [grpo_row(0, image_path)], [format_reward], out_dir=tmp_path)
    assert result.metrics["steps"] == 1 and result.metrics["model_source"] == "architecture"
    assert (tmp_path / "init" / "model.safetensors").exists()
    assert load_processor(tmp_path / "init").tokenizer.convert_tokens_to_ids(IMAGE_PAD) == 5


def test_grpo_prompt_length_matches_the_processor_and_long_prompts_are_dropped(cfg, image_path):
    loaded = load_model(cfg.model)
    row = grpo_row(1, image_path)  # two images, one of them from a path
    dataset, dropped = grpo_dataset([row], loaded.processor, max_prompt_length=None)
    example = dataset[0]
    from trl.data_utils import prepare_multimodal_messages

    conversation = prepare_multimodal_messages(example["prompt"], images=example["images"])
    real = loaded.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                return_dict=True, return_tensors="pt")["input_ids"].shape[1]
    assert prompt_length(loaded.processor, row["prompt"], row["images"]) == real
    kept, dropped = grpo_dataset([row, grpo_row(0, image_path)], loaded.processor, max_prompt_length=real - 1)
    assert (len(kept), dropped) == (1, 1)


# --- generation and the benchmark script -------------------------------------------------------------


def test_generate_returns_one_string_per_row(grpo_run, sft_rows, image_path):
    result, _ = grpo_run
    rows = [grpo_row(0, image_path), grpo_row(1, image_path), sft_rows[0],
            {"prompt_json": json.dumps([{"role": "user", "content": "Is there edema?"}])}]
    loaded = load_trained(result.checkpoint)
    batched = generate(loaded, rows, max_new_tokens=6, batch_size=4)
    assert len(batched) == len(rows) and all(isinstance(text, str) for text in batched)
    # Left padding: a batch decodes exactly like the rows one at a time (greedy).
    assert batched == [generate(loaded, [row], max_new_tokens=6)[0] for row in rows]
    assert generate(result.checkpoint, rows[:1], max_new_tokens=6) == batched[:1]


def test_sampling_with_a_seed_draws_the_same_answers_batch_by_batch(grpo_run, image_path):
    # bench/learning.py compares two checkpoints on answers sampled with the same seeds (common random
    # numbers): a seed must repeat its draws, and each batch is reseeded (seed + batch index) so a batch
    # that ends early for one model does not shift the draws of the next.
    result, _ = grpo_run
    loaded = load_trained(result.checkpoint)
    rows = [grpo_row(0, image_path), grpo_row(1, image_path)] * 3

    def sample(batch_rows, seed):
        return generate(loaded, batch_rows, max_new_tokens=8, batch_size=2, do_sample=True, temperature=1.0,
                        seed=seed)

    drawn = sample(rows, seed=5)
    assert sample(rows, seed=5) == drawn
    assert sample(rows, seed=6) != drawn
    assert sample(rows[2:4], seed=6) == drawn[2:4]  # batch 1 of seed 5 is batch 0 of seed 6
    assert generate(loaded, rows, max_new_tokens=8, batch_size=2) != drawn  # greedy is not a draw


def test_gpu_benchmark_runs_in_cpu_size_mode(tmp_path):
    report = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "bench/gpu_train.py"), "--cpu-size", "--sft-steps", "2", "--json", str(report),
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1
    figures = dict(item.split("=", 1) for item in lines[0].split()[1:])
    assert float(figures["sft_tokens_per_s"]) > 0 and float(figures["grpo_step_s"]) > 0
    assert figures["sft_peak_gpu_gb"] == "n/a"  # CPU run
    (result,) = json.loads(report.read_text())
    assert result["sft_steps"] == 2 and result["grpo_steps"] == 1 and result["grpo_generations"] == 2
    assert result["sft_tokens_per_step"] >= 64  # the prompt alone is ~64 tokens
    assert figures["sft_mfu"] == figures["grpo_mfu"] == "n/a"  # a CPU has no datasheet peak
    assert result["sft_step_tflop"] > 0 and result["grpo_step_tflop"] > 0


def test_gpu_benchmark_reports_mfu_against_a_given_peak(tmp_path):
    report = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "bench/gpu_train.py"), "--cpu-size", "--sft-steps", "2", "--json", str(report),
         "--workdir", str(tmp_path / "work"), "--peak-tflops", "0.5"],
        capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    (result,) = json.loads(report.read_text())
    assert result["peak_tflops"] == 0.5
    for job in ("sft", "grpo"):
        achieved = result[f"{job}_step_tflop"] / result[f"{job}_step_s"]  # TFLOP/s
        assert result[f"{job}_mfu"] == pytest.approx(achieved / 0.5) and 0 < result[f"{job}_mfu"] < 1


def test_model_flops_follow_palms_count():
    from training.flops import Stack, VisionTower, ModelShape, grpo_step_flops, mfu, peak_tflops, sft_step_flops

    text = Stack(matmul_params=1000, layers=2, width=8)
    # PaLM, appendix B: 6N + 12·L·H·Q·T per token of a T-token sequence, training.
    assert text.training(tokens=10, context=10) == 10 * (6 * 1000 + 12 * 2 * 8 * 10) == 79_200
    assert text.forward(tokens=10, context=10) == 79_200 / 3
    vision = VisionTower(Stack(matmul_params=100, layers=1, width=4), merger_params=40)
    # 16 patches: 2·100 + 4·1·4·16 per patch, and the merger's 2·40 per merged token (16 / 4 of them)
    assert vision.forward(16) == 16 * (200 + 256) + 4 * 80
    shape = ModelShape(text, vision)
    assert sft_step_flops(shape, sequences=2, sequence_tokens=10, images_per_sequence=1, patches_per_image=16) == (
        2 * 79_200 + 3 * 2 * vision.forward(16))
    # GRPO, 4 rollouts of 6 new tokens after a 10-token prompt, no reference model:
    prefill = 4 * 10 * (2000 + 4 * 2 * 8 * 10)
    decode = 4 * 6 * (2000 + 4 * 2 * 8 * (10 + 3))  # each new token attends over 13 tokens on average
    policy = 4 * 16 * (6000 + 12 * 2 * 8 * 16)
    images = 4 * vision.forward(16)
    expected = prefill + decode + images + policy + 3 * images
    assert grpo_step_flops(shape, 4, 10, 6, 1, 16, reference=False) == expected
    reference = 4 * 16 * (2000 + 4 * 2 * 8 * 16) + images
    assert grpo_step_flops(shape, 4, 10, 6, 1, 16, reference=True) == expected + reference
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 and peak_tflops("NVIDIA H100 PCIe") == 756.5
    assert peak_tflops("NVIDIA H200") == 989.4 and peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Tesla T4") is None
    assert mfu(494.7e12, 1.0, 989.4) == pytest.approx(0.5) and mfu(1e12, None, 989.4) is None


def test_model_shape_counts_every_parameter_but_the_embedding_lookup(cfg):
    from training.flops import model_shape

    model = build_model_from_architecture(cfg.model.architecture, train_bpe_tokenizer(["lungs clear"] * 4,
                                                                                      vocab_size=300))
    shape = model_shape(model)
    embedding = model.model.language_model.embed_tokens.weight.numel()
    norm = model.model.language_model.norm.weight.numel()
    counted = shape.text.matmul_params + shape.vision.per_patch.matmul_params + shape.vision.merger_params
    # the final norm scales, it does not multiply by a matrix; the embedding is a lookup
    assert counted + embedding + norm == sum(p.numel() for p in model.parameters())
    assert (shape.text.layers, shape.text.width) == (cfg.model.architecture.text.num_hidden_layers,
                                                    cfg.model.architecture.text.hidden_size)
    assert shape.vision.merge == 4 and shape.vision.per_patch.layers == cfg.model.architecture.vision.depth


def test_launch_command_runs_the_job_module_under_accelerate_with_the_workers_world_size(tmp_path):
    from training.config import LaunchSettings
    from training.launch import launch_command

    release = load_config("qwen2vl-7b-release")
    assert release.launch.mode == "accelerate" and release.grpo.steps_per_generation == 4
    cmd = launch_command("grpo", release.launch.model_copy(update={"num_processes": 8}), "qwen2vl-7b-release",
                         tmp_path / "rl.jsonl", tmp_path / "out", init_checkpoint="/runs/sft/final",
                         rewards=[("training.rewards:outcome_reward", 1.0)], python="python")
    assert cmd[:3] == ["python", "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1] == str(REPO / "configs/accelerate/zero3.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "8"
    assert cmd[cmd.index("-m", 3):][:2] == ["-m", "training.grpo"]
    assert cmd[cmd.index("--init") + 1] == "/runs/sft/final"
    assert cmd[cmd.index("--reward") + 1] == "training.rewards:outcome_reward=1.0"
    # No GPU here: the world size falls back to one process; without a config file, plain accelerate.
    sft = launch_command("sft", LaunchSettings(mode="accelerate"), "tiny-cpu", tmp_path / "sft.jsonl",
                         tmp_path / "o")
    assert sft[sft.index("--num_processes") + 1] == str(max(1, torch.cuda.device_count()))
    assert "--config_file" not in sft and sft[sft.index("--train") + 1] == str(tmp_path / "sft.jsonl")
    with pytest.raises(FileNotFoundError):
        launch_command("sft", LaunchSettings(accelerate_config="configs/accelerate/zero9.yaml"), "x", tmp_path,
                       tmp_path)
    with pytest.raises(ValueError):
        launch_command("grpo", LaunchSettings(), "x", tmp_path, tmp_path)  # no rewards


def test_accelerate_zero3_config_parses():
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(REPO / "configs/accelerate/zero3.yaml"))
    assert config.distributed_type == "DEEPSPEED" and config.deepspeed_config["zero_stage"] == 3


def test_memory_estimate_shards_with_zero_and_bounds_the_rollout_kv_cache():
    from training.memory import GIB, estimate

    cfg = load_config("qwen2vl-7b-release")
    sft = estimate(cfg, "sft", world_size=8)
    params = sft.parameters_b * 1e9
    assert 8.2e9 < params < 8.4e9  # Qwen2-VL-7B-Instruct has 8.29B parameters, vision tower included
    # ZeRO-3 on 8 GPUs: bf16 weights and gradients and the 12-byte fp32 optimizer state, all / 8.
    assert sft.zero_stage == 3
    assert sft.weights_gb == pytest.approx(2 * params / 8 / GIB)
    assert sft.optimizer_gb == pytest.approx(12 * params / 8 / GIB)
    # Rollout KV cache: 28 layers x 4 KV heads x 128 dims x K,V x bf16 = 57,344 bytes per token.
    kv_token = 28 * 4 * 128 * 2 * 2
    grpo = estimate(cfg, "grpo", world_size=8)
    assert grpo.rollouts_per_generate == 8 * 4  # per_device 8 x steps_per_generation 4
    assert grpo.kv_cache_gb == pytest.approx(32 * 4096 * kv_token / GIB)
    # TRL's default (no steps_per_generation) generates the whole step per GPU: 256 x 8 / 8 = 256 rollouts.
    default = cfg.model_copy(update={"grpo": cfg.grpo.model_copy(update={"steps_per_generation": None})})
    whole = estimate(default, "grpo", world_size=8)
    assert whole.rollouts_per_generate == 256 and whole.kv_cache_gb > 50
    # In process (no DeepSpeed) one GPU holds fp32 weights, gradients and Adam: 16 bytes per parameter.
    local = cfg.model_copy(update={"launch": cfg.launch.model_copy(update={"mode": "in_process"})})
    one = estimate(local, "sft", world_size=1)
    assert one.zero_stage == 0
    assert one.weights_gb + one.gradients_gb + one.optimizer_gb == pytest.approx(16 * params / GIB)
    assert one.total_gb > 80  # does not fit one 80 GB card


def test_weighted_rewards_is_grpos_weighted_sum_per_completion():
    from training.rewards import format_reward as radchain_format, outcome_reward, weighted_rewards

    rows = [{"task": "binary", "solution": "B"}] * 3
    outputs = ["<think>No effusion.</think>\n<answer>B</answer>",  # well formed, right: 1 + 0.5
               "<answer>B</answer>",                              # right, not well formed: 1
               "<think>x</think><answer>A</answer>"]              # well formed, wrong: 0.5
    assert weighted_rewards([outcome_reward, radchain_format], [1.0, 0.5], rows, outputs) == [1.5, 1.0, 0.5]

    def not_applicable(completions, **kwargs):  # TRL's None: the function does not score this one
        return [None] * len(completions)

    assert weighted_rewards([not_applicable, outcome_reward], [2.0, 1.0], rows, outputs) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError):
        weighted_rewards([outcome_reward], [1.0], rows, outputs[:2])


def test_grpo_raises_a_reward_the_policy_can_move(cfg, image_path, tmp_path):
    # The training path learns, not only runs: a reward the tiny random policy can move (the share of
    # characters that are the letter "e") rises over a few GRPO steps, the gradient's sign is right.
    def e_share(completions, **kwargs):
        texts = [c[0]["content"] for c in completions]
        return [t.count("e") / max(len(t), 1) for t in texts]

    grpo = cfg.grpo.model_copy(update=dict(learning_rate=5e-2, max_steps=10, num_generations=8, prompts_per_step=2,
                                           per_device_train_batch_size=16, beta=0.0, scale_rewards="none",
                                           task_mixture=False))
    small = cfg.model_copy(update=dict(grpo=grpo))
    result = run_grpo(small, [grpo_row(0, image_path), grpo_row(2, image_path)], [e_share], out_dir=tmp_path)
    rewards = [e["reward"] for e in result.metrics["curve"] if "reward" in e]
    assert len(rewards) == 10
    assert sum(rewards[-3:]) / 3 > 2 * sum(rewards[:3]) / 3, rewards


# --- which checkpoint evaluation gets ----------------------------------------------------------------


def test_checkpoint_choice_keeps_the_higher_validate_reward_and_grpo_on_a_tie():
    from training.selection import choose_checkpoint

    # Three prompts; GRPO loses one point on the second: mean 2 -> 5/3, diffs (0, -1, 0).
    choice = choose_checkpoint("sft/final", "grpo/final", [1.0, 2.0, 3.0], [1.0, 1.0, 3.0])
    assert (choice.chosen, choice.checkpoint, choice.n) == ("sft", "sft/final", 3)
    assert choice.reward_sft == pytest.approx(2.0) and choice.reward_grpo == pytest.approx(5 / 3)
    assert choice.rise == pytest.approx(-1 / 3)
    assert choice.se == pytest.approx((1 / 3) ** 0.5 / 3 ** 0.5)  # stdev of (0, -1, 0) over sqrt(3)
    assert choice.t == pytest.approx(-1.0)
    assert "SFT 2.000, GRPO 1.667" in choice.describe()
    won = choose_checkpoint("sft/final", "grpo/final", [0.0, 1.0], [1.0, 1.0])
    assert (won.chosen, won.checkpoint, won.rise) == ("grpo", "grpo/final", 0.5)
    tie = choose_checkpoint("sft/final", "grpo/final", [1.0, 0.0], [0.0, 1.0])
    assert (tie.chosen, tie.checkpoint, tie.rise) == ("grpo", "grpo/final", 0.0)
    empty = choose_checkpoint("sft/final", "grpo/final", [], [])
    assert (empty.chosen, empty.checkpoint, empty.n, empty.reward_sft) == ("grpo", "grpo/final", 0, None)
    assert "no validate prompts" in empty.describe()


def test_checkpoints_are_compared_on_their_own_greedy_answers(grpo_run, sft_result, image_path):
    from training.selection import compare_on_validate

    result, _ = grpo_run
    rows = [grpo_row(i, image_path) for i in range(4)]

    def chars(completions, **kwargs):  # a reward that tells the two checkpoints' answers apart
        return [float(len(c)) for c in completions]

    choice = compare_on_validate(sft_result.checkpoint, result.checkpoint, rows, [chars], [2.0], max_new_tokens=6)
    lengths = {ckpt: [len(t) for t in generate(ckpt, rows, max_new_tokens=6)]
               for ckpt in (sft_result.checkpoint, result.checkpoint)}
    assert choice.n == 4
    assert choice.reward_sft == pytest.approx(2.0 * sum(lengths[sft_result.checkpoint]) / 4)
    assert choice.reward_grpo == pytest.approx(2.0 * sum(lengths[result.checkpoint]) / 4)
    wins = "grpo" if choice.reward_grpo >= choice.reward_sft else "sft"
    assert choice.chosen == wins
    assert choice.checkpoint == {"grpo": result.checkpoint, "sft": sft_result.checkpoint}[wins]
    # A checkpoint against itself: greedy answers repeat, the rise is 0 and the tie keeps the trained one.
    itself = compare_on_validate(result.checkpoint, result.checkpoint, rows, [chars], [1.0], max_new_tokens=6)
    assert (itself.rise, itself.chosen) == (0.0, "grpo")
    assert compare_on_validate(sft_result.checkpoint, result.checkpoint, [], [chars], [1.0], 6).chosen == "grpo"
