"""VQA samples of the five RadRBench-CXR task types."""

from __future__ import annotations

from typing import Literal

from schemas.base import TableRecord

TASKS = ("binary", "single", "multi", "open", "temporal")
Task = Literal["binary", "single", "multi", "open", "temporal"]
ANSWER_INSTRUCTION = (
    "Think step by step. Put your reasoning inside <think></think> and your final answer inside "
    "<answer></answer>."
)


class VqaSample(TableRecord):
    __table__ = "int_vqa_samples"
    __description__ = "VQA samples with question, options, answer and images."
    __grain__ = "one sample"
    __key__ = ("sample_id",)

    sample_id: str
    task: Task
    study_id: str
    prior_study_id: str | None = None
    patient_id: str
    split: str
    question: str
    options: list[str]  # option texts in letter order; empty for the open task
    answer_letter: str | None = None  # None for the open task
    answer_text: str
    findings: list[str]  # observations the question asks about (option findings, or the temporal finding)
    answer_findings: list[str]  # observations that are the answer (the true set)
    image_paths: list[str]  # current image(s); for temporal: prior first, then current
