"""Dataset marts handed to training, versioned by a hash of their inputs."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from schemas.base import TableRecord
from schemas.checks import relationship, sql_check


def training_mart_checks(table: str) -> tuple:
    """What every training mart (SFT examples, RL prompts) must hold: its samples and its version exist,
    and no patient with a test-split study is in it (no leakage into the benchmark)."""
    return (
        # Run scope: older versions are kept as history, and their samples may since have left the warehouse.
        relationship(table, "sample_id", "int_vqa_samples", "sample_id", scope="run"),
        relationship(table, "dataset_version", "fct_dataset_versions", "dataset_version"),
        sql_check(table, "no_test_patient",
                  "SELECT m.example_id AS id, format('patient {{}} of sample {{}} has a test-split study', s.patient_id, "
                  "m.sample_id) AS detail FROM {table} m JOIN int_vqa_samples s USING (sample_id) "
                  "WHERE s.patient_id IN (SELECT patient_id FROM stg_studies WHERE split = 'test')",
                  "no patient with a test-split study is in a training mart (no leakage into the benchmark)",
                  scope="run", reads=("int_vqa_samples", "stg_studies")),
    )


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

    __checks__ = training_mart_checks("mart_sft_examples")


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

    __checks__ = training_mart_checks("mart_rl_prompts")


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

    __checks__ = (
        # Run scope: older versions are kept as history, and their samples may since have left the warehouse.
        relationship("mart_benchmark", "sample_id", "int_vqa_samples", "sample_id", scope="run"),
        relationship("mart_benchmark", "dataset_version", "fct_dataset_versions", "dataset_version"),
        sql_check("mart_benchmark", "test_split_only",
                  "SELECT b.sample_id AS id FROM {table} b JOIN int_vqa_samples s USING (sample_id) "
                  "WHERE s.split <> 'test'",
                  "the benchmark holds test-split samples only", scope="run", reads=("int_vqa_samples",)),
    )


class DatasetVersion(TableRecord):
    __table__ = "fct_dataset_versions"
    __description__ = ("Every dataset version built and registered: its version (a hash of its inputs), builder "
                       "version, mixture and row counts per mart. A version whose checks fail is not registered.")
    __grain__ = "one dataset version"
    __key__ = ("dataset_version",)

    dataset_version: str
    builder_version: str
    n_sft: int
    n_rl: int
    n_benchmark: int
    mixture_json: str
    built_at: datetime

    __checks__ = (
        sql_check("fct_dataset_versions", "splits_not_empty",
                  "SELECT dataset_version AS id, format('dataset {{}} has {{}} SFT rows, {{}} RL prompts, {{}} "
                  "benchmark rows', dataset_version, n_sft, n_rl, n_benchmark) AS detail FROM {table} "
                  "WHERE n_sft = 0 OR n_rl = 0 OR n_benchmark = 0",
                  "a dataset version has SFT rows, RL prompts and benchmark rows (no empty split)", scope="run"),
        sql_check("fct_dataset_versions", "task_coverage",
                  "SELECT v.dataset_version || '|' || k.task AS id, format('task {{}} (weight {{}}) has no SFT rows "
                  "in {{}}', k.task, json_extract_string(v.mixture_json, '$.' || k.task), v.dataset_version) AS detail "
                  "FROM {table} v, unnest(json_keys(v.mixture_json)) AS k(task) "
                  "WHERE CAST(json_extract_string(v.mixture_json, '$.' || k.task) AS DOUBLE) > 0 AND NOT EXISTS "
                  "(SELECT 1 FROM mart_sft_examples m WHERE m.dataset_version = v.dataset_version AND m.task = k.task)",
                  "every task with a mixture weight has SFT rows (per-task balance of the marts)",
                  severity="warn", scope="run", reads=("mart_sft_examples",)),
    )
