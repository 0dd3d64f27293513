"""VQA samples of the five RadRBench-CXR task types."""

from __future__ import annotations

from typing import Literal

from schemas.base import TableRecord
from schemas.checks import relationship, sql_check

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

    __checks__ = (
        relationship("int_vqa_samples", "study_id", "stg_studies", "study_id"),
        relationship("int_vqa_samples", "prior_study_id", "stg_studies", "study_id"),
        sql_check("int_vqa_samples", "answer_in_options",
                  "SELECT sample_id AS id FROM {table} WHERE task <> 'open' AND (answer_letter IS NULL "
                  "OR ascii(answer_letter) - 64 NOT BETWEEN 1 AND len(options))",
                  "an option task's answer letter names one of its options"),
        # Balanced sampling (extractors/tasks): no option task answers one letter far more often than chance.
        sql_check("int_vqa_samples", "task_balance",
                  "SELECT task AS id, format('{{}}: answer {{}} in {{}} of {{}} samples ({{:.2f}}; at most {{:.2f}} "
                  "expected)', task, top, n_top, n, n_top / n, {max_answer_share}) AS detail FROM ("
                  "  SELECT task, count(*) AS n, max(c) AS n_top, arg_max(answer_letter, c) AS top,"
                  "         any_value(n_options) AS n_options FROM ("
                  "    SELECT task, answer_letter, len(options) AS n_options, count(*) OVER (PARTITION BY task, "
                  "answer_letter) AS c FROM {table} WHERE task <> 'open') GROUP BY task) "
                  "WHERE n >= 20 AND n_top / n > {max_answer_share}",
                  "per option task, no answer letter holds more than max_answer_share of the samples (>= 20)",
                  severity="warn", params=("max_answer_share",)),
    )
