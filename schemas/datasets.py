"""Dataset marts handed to training, versioned by a hash of their inputs."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from schemas.base import TableRecord


class SftExample(TableRecord):
    __table__ = "mart_sft_examples"
    __description__ = "SFT conversations (user: images + question; assistant: <think>chain</think><answer>X</answer>)."
    __grain__ = "one conversation of one dataset version"
    __key__ = ("dataset_version", "example_id")

    dataset_version: str
    example_id: str
    sample_id: str
    task: str
    split: str
    variant: Literal["chain", "answer_only"]
    messages_json: str  # TRL conversational format, JSON-encoded
    images: list[str]
    weight: float  # mixture weight of the task (the release: 0.1 per task file, temporal 0.05)


class RlPrompt(TableRecord):
    __table__ = "mart_rl_prompts"
    __description__ = "GRPO prompts with the gold answer (solution), gold steps and labels as reward columns."
    __grain__ = "one prompt of one dataset version"
    __key__ = ("dataset_version", "example_id")

    dataset_version: str
    example_id: str
    sample_id: str
    task: str
    split: str
    prompt_json: str  # TRL conversational prompt, JSON-encoded
    images: list[str]
    solution: str  # answer letter, or comma-joined findings for the open task
    gold_steps: str  # JSON: [{"kind","text","findings":[{"observation","status","anatomy"}]}]
    gold_labels: str  # JSON: {observation: positive|negative|uncertain|not_mentioned}
    weight: float


class BenchmarkItem(TableRecord):
    __table__ = "mart_benchmark"
    __description__ = "Held-out test samples with gold chains, for evaluation."
    __grain__ = "one test sample of one dataset version"
    __key__ = ("dataset_version", "sample_id")

    dataset_version: str
    sample_id: str
    task: str
    prompt_json: str
    images: list[str]
    solution: str
    gold_chain: str
    gold_steps: str
    gold_labels: str


class DatasetVersion(TableRecord):
    __table__ = "fct_dataset_versions"
    __description__ = "Every dataset version built: inputs hash, builder version, row counts per mart."
    __grain__ = "one dataset version"
    __key__ = ("dataset_version",)

    dataset_version: str
    builder_version: str
    n_sft: int
    n_rl: int
    n_benchmark: int
    mixture_json: str
    built_at: datetime
