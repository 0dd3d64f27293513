"""Evaluation tables: accuracy, RadRScore and format compliance per task (model and baselines), per-sample scores."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from schemas.base import TableRecord


class EvalResult(TableRecord):
    __table__ = "fct_eval_results"
    __description__ = (
        "Accuracy and RadRScore (completeness, factuality, effectiveness) per task of one scored "
        "prediction set, plus an 'all' row."
    )
    __grain__ = "one (evaluation, task); task 'all' sums the evaluation"
    __key__ = ("eval_id", "task")

    eval_id: str  # hash of model, checkpoint, judge and the predictions' content: a re-score replaces its rows
    model: str
    checkpoint: str | None = None
    judge: Literal["rules", "llm"]
    task: str  # binary | single | multi | open | temporal | all
    n: int  # predictions scored (known sample ids)
    n_unparseable: int  # outputs without any reasoning text: scored 0 on every RadRScore component
    n_tagless: int = 0  # outputs without a <think> tag, scored from their free text (reasoning before the answer)
    n_no_answer: int  # outputs without an <answer> block: wrong for accuracy
    n_no_gold_chain: int  # samples without an accepted chain: completeness/effectiveness not scorable
    n_unknown: int  # prediction sample ids not in the warehouse (only on the 'all' row; 0 elsewhere)
    accuracy: float | None = None  # option tasks: letter match; open: mean set F1
    completeness: float | None = None
    factuality: float | None = None
    effectiveness: float | None = None
    radrscore: float | None = None  # mean of the three component averages (the release's convention)
    # Share of outputs that are exactly one <think>…</think> then one <answer>…</answer> (format_reward's rule).
    format_compliance: float | None = None
    # None: a model's outputs. "majority" | "random" | "oracle": a baseline scored by the same scorer on
    # the same samples (training/baselines.py); baseline_of is then the eval_id of the model evaluation
    # it stands beside.
    baseline: str | None = None
    baseline_of: str | None = None
    predictions_path: str
    scored_at: datetime


class ScoredPrediction(TableRecord):
    __table__ = "fct_predictions"
    __description__ = "One scored model output: parsed answer, outcome, RadRScore components."
    __grain__ = "one (evaluation, sample)"
    __key__ = ("eval_id", "sample_id")

    eval_id: str
    sample_id: str
    task: str
    model: str
    judge: Literal["rules", "llm"]
    output: str
    answer: str | None = None  # text of the <answer> block
    outcome: float  # 1/0 letter match; set F1 for the open task
    unparseable: bool
    completeness: float | None = None
    factuality: float | None = None
    effectiveness: float | None = None
    radrscore: float
    n_model_steps: int
    n_model_findings: int
