"""Build the SFT, RL and benchmark marts from samples, accepted chains and labels (pure).

Formats follow what TRL expects: conversational ``messages`` for SFTTrainer (user turn:
one ``{"type": "image"}`` per image, then the question; assistant turn
``<think>…</think><answer>…</answer>``), and a conversational ``prompt`` plus reward
columns for GRPOTrainer (``solution``, ``task``, ``gold_steps``, ``gold_labels`` arrive in
the reward functions as keyword arguments).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from schemas.base import stable_id
from schemas.vqa import ANSWER_INSTRUCTION

BUILDER_VERSION = "datasets-v1"
# The release mixes one file per task at weight 0.1, temporal at 0.05.
DEFAULT_MIXTURE: dict[str, float] = {"binary": 0.1, "single": 0.1, "multi": 0.1, "open": 0.1, "temporal": 0.05}
TRAIN_SPLITS = ("train", "validate")
BENCHMARK_SPLIT = "test"


@dataclass
class Marts:
    dataset_version: str
    sft: list[dict[str, Any]] = field(default_factory=list)
    rl: list[dict[str, Any]] = field(default_factory=list)
    benchmark: list[dict[str, Any]] = field(default_factory=list)
    used_samples: set[str] = field(default_factory=set)


def prompt_text(sample: Mapping[str, Any]) -> str:
    q = str(sample["question"]).rstrip()
    return q if ANSWER_INSTRUCTION in q else f"{q}\n{ANSWER_INSTRUCTION}"


def solution_of(sample: Mapping[str, Any]) -> str:
    """The gold answer a reward compares against: a letter, or the open task's finding set."""
    if sample.get("answer_letter"):
        return str(sample["answer_letter"])
    return ", ".join(sample.get("answer_findings") or []) or str(sample["answer_text"])


def user_turn(sample: Mapping[str, Any]) -> dict[str, Any]:
    images = [{"type": "image"} for _ in sample.get("image_paths") or []]
    return {"role": "user", "content": [*images, {"type": "text", "text": prompt_text(sample)}]}


def assistant_text(chain_text: str | None, solution: str) -> str:
    think = f"<think>\n{chain_text.strip()}\n</think>\n" if chain_text else ""
    return f"{think}<answer>{solution}</answer>"


def gold_steps_json(steps: Sequence[Mapping[str, Any]]) -> str:
    keep = [
        dict(kind=s["kind"], text=s["text"],
             findings=[dict(observation=f["observation"], status=f["status"], anatomy=f.get("anatomy"))
                       for f in s.get("findings") or []])
        for s in sorted(steps, key=lambda s: s["step_index"])
    ]
    return json.dumps(keep, ensure_ascii=False)


def dataset_version(samples: Sequence[Mapping[str, Any]], chains: Mapping[str, Mapping[str, Any]],
                    mixture: Mapping[str, float]) -> str:
    """Hash of the inputs and the builder version: same inputs, same version."""
    parts = sorted(
        (s["sample_id"], stable_id(chains[s["sample_id"]]["text"]) if s["sample_id"] in chains else "-")
        for s in samples
    )
    return "ds-" + stable_id(BUILDER_VERSION, json.dumps(dict(sorted(mixture.items()))), *parts, length=12)


def build_marts(
    samples: Sequence[Mapping[str, Any]],
    chains: Mapping[str, Mapping[str, Any]],
    labels: Mapping[str, Mapping[str, str]],
    mixture: Mapping[str, float] | None = None,
    answer_only_variants: bool = True,
) -> Marts:
    """``chains``: sample_id -> {"text", "steps": [int_chain_steps rows]}; ``labels``: study_id -> {obs: value}."""
    mixture = dict(mixture or DEFAULT_MIXTURE)
    marts = Marts(dataset_version(samples, chains, mixture))
    for s in sorted(samples, key=lambda s: s["sample_id"]):
        sid, task, split = s["sample_id"], s["task"], s["split"]
        weight = float(mixture.get(task, 0.0))
        chain = chains.get(sid)
        solution = solution_of(s)
        prompt = [user_turn(s)]
        images = list(s.get("image_paths") or [])
        gold = dict(
            gold_steps=gold_steps_json(chain["steps"]) if chain else "[]",
            gold_labels=json.dumps(dict(sorted(labels.get(s["study_id"], {}).items()))),
        )
        if split == BENCHMARK_SPLIT:
            if chain:  # RadRScore needs a gold chain
                marts.benchmark.append(dict(
                    dataset_version=marts.dataset_version, sample_id=sid, task=task,
                    prompt_json=json.dumps(prompt), images=images, solution=solution, gold_chain=chain["text"], **gold,
                ))
                marts.used_samples.add(sid)
            continue
        if split not in TRAIN_SPLITS or weight <= 0:
            continue
        variants = []
        if chain:
            variants.append(("chain", chain["text"]))
        if answer_only_variants and task != "open":
            variants.append(("answer_only", None))
        for variant, text in variants:
            messages = prompt + [{"role": "assistant", "content": [{"type": "text", "text": assistant_text(text, solution)}]}]
            marts.sft.append(dict(
                dataset_version=marts.dataset_version, example_id=stable_id(sid, variant), sample_id=sid, task=task,
                split=split, variant=variant, messages_json=json.dumps(messages, ensure_ascii=False), images=images,
                weight=weight,
            ))
        if chain:
            marts.rl.append(dict(
                dataset_version=marts.dataset_version, example_id=stable_id(sid, "rl"), sample_id=sid, task=task,
                split=split, prompt_json=json.dumps(prompt, ensure_ascii=False), images=images, solution=solution,
                weight=weight, **gold,
            ))
        if variants:
            marts.used_samples.add(sid)
    return marts


def mixture_sample(rows: Sequence[Mapping[str, Any]], n: int, seed: int) -> list[Mapping[str, Any]]:
    """Draw ``n`` rows (with replacement, deterministic) so that each task's share of the draw is its
    mixture weight over the sum of the weights of the tasks present; rows of one task are equally likely.

    A row's ``weight`` is its task's mixture weight (the marts carry it); a row without one weighs 1.
    With the release's mixture (0.1 per task, temporal 0.05) temporal gets 0.05 / 0.45 of the draws
    however many temporal rows there are: the weight decides the share, not the size of the task's file.
    """
    import random

    if not rows or n <= 0:
        return []
    task_weight: dict[str, float] = {}
    task_size: dict[str, int] = {}
    for r in rows:
        task = str(r.get("task"))
        task_weight.setdefault(task, float(r.get("weight", 1.0)))
        task_size[task] = task_size.get(task, 0) + 1
    total = sum(w for w in task_weight.values() if w > 0)
    if total <= 0:
        weights = [1.0] * len(rows)
    else:
        weights = [max(task_weight[str(r.get("task"))], 0.0) / total / task_size[str(r.get("task"))] for r in rows]
    return random.Random(seed).choices(list(rows), weights=weights, k=n)


def task_counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Rows per task (what a mixture draw gave each task), sorted by task."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[str(r.get("task"))] = counts.get(str(r.get("task")), 0) + 1
    return dict(sorted(counts.items()))
