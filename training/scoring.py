"""Scoring a prediction file: accuracy, RadRScore and format compliance per task (plain code).

The evaluation job and `radchain score` both come here: this module reads a predictions JSONL,
scores it against gold references (training.radrscore.score_predictions), computes format
compliance and the evaluation's deterministic id, and shapes the rows of ``fct_eval_results`` and
``fct_predictions``. It reads no warehouse and writes nothing: the caller loads the gold
(warehouse.eval_store.read_gold_rows), runs an LLM judge if asked, and writes the rows
(flows/evaluation.py ``score_file``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from training.radrscore import GoldReference, ReasoningScore, ScoreReport

JUDGES = ("rules", "llm")
COMPONENT_NAMES = ("completeness", "factuality", "effectiveness")  # RadRScore's three parts
# Per-task scores an evaluation reports; each comes with the number of samples it averages over.
SCORES = ("accuracy", *COMPONENT_NAMES, "radrscore", "format_compliance")


class PredictionsError(ValueError):
    """A predictions file that cannot be scored (the message names the file and line)."""


def read_predictions(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """JSONL records with sample_id and output; returns them and a model name if the file names one."""
    if not path.exists():
        raise PredictionsError(f"predictions file {path} does not exist")
    records, models = [], set()
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PredictionsError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
            if not isinstance(rec, dict) or rec.get("sample_id") in (None, ""):
                raise PredictionsError(f"{path}:{lineno}: each line needs a sample_id")
            if "output" not in rec:
                raise PredictionsError(f"{path}:{lineno}: each line needs an output (use \"\" for an empty one)")
            rec["sample_id"] = str(rec["sample_id"])
            if rec.get("model"):
                models.add(str(rec["model"]))
            records.append(rec)
    if not records:
        raise PredictionsError(f"{path} holds no predictions")
    return records, (models.pop() if len(models) == 1 else None)


def format_compliance(report: ScoreReport) -> dict[str, float | None]:
    """Task (and "all") -> share of well-formed outputs, over the samples the report scored."""
    from training.answers import is_well_formed

    by_task: dict[str, list[bool]] = {}
    for s in report.per_sample:
        ok = is_well_formed(s.output)
        by_task.setdefault(s.task, []).append(ok)
        by_task.setdefault("all", []).append(ok)
    return {task: (sum(v) / len(v) if v else None) for task, v in by_task.items()}


def score_counts(report: ScoreReport) -> dict[str, dict[str, int]]:
    """Task (and "all") -> score -> how many samples that score averages over.

    Accuracy, RadRScore and format compliance count every scored sample; a RadRScore component
    counts the samples for which it is defined (e.g. no completeness when the gold chain states no
    key finding). An all-unparseable evaluation thus reads "accuracy 0.00 over 113", not a bare 0.
    """
    out: dict[str, dict[str, int]] = {}
    for s in report.per_sample:
        for task in (s.task, "all"):
            counts = out.setdefault(task, dict.fromkeys(SCORES, 0))
            counts["accuracy"] += 1
            counts["radrscore"] += 1
            counts["format_compliance"] += 1
            for name in COMPONENT_NAMES:
                counts[name] += getattr(s.reasoning, name) is not None
    return out


def eval_id(path: Path, model: str, checkpoint: str | None, judge: str, semantic: bool) -> str:
    """Deterministic: the same file scored the same way is the same evaluation (a re-score replaces it)."""
    from schemas.base import stable_id

    digest = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    return stable_id("eval", model, checkpoint, judge, "semantic" if semantic else "lexical", digest)


@dataclass
class ScoredFile:
    """A scored predictions file: its id, the report (with ``format_compliance``), and what was asked."""

    eval_id: str
    report: ScoreReport
    model: str
    checkpoint: str | None
    judge: str
    predictions: Path

    def result_rows(self, scored_at: datetime, baseline: str | None = None,
                    baseline_of: str | None = None) -> list[dict[str, Any]]:
        """fct_eval_results rows: one per task, then "all"."""
        return [
            dict(eval_id=self.eval_id, model=self.model, checkpoint=self.checkpoint, judge=self.judge,
                 predictions_path=str(self.predictions.resolve()), scored_at=scored_at,
                 format_compliance=self.report.format_compliance.get(r.task), baseline=baseline,
                 baseline_of=baseline_of, **r.as_dict())
            for r in self.report.per_task
        ]

    def prediction_rows(self) -> list[dict[str, Any]]:
        """fct_predictions rows: one per scored sample."""
        return [
            dict(eval_id=self.eval_id, sample_id=s.sample_id, task=s.task, model=self.model, judge=self.judge,
                 output=s.output, answer=s.answer, outcome=s.outcome, unparseable=s.reasoning.unparseable,
                 completeness=s.reasoning.completeness, factuality=s.reasoning.factuality,
                 effectiveness=s.reasoning.effectiveness, radrscore=s.reasoning.radrscore,
                 n_model_steps=s.reasoning.n_steps, n_model_findings=s.reasoning.n_findings)
            for s in self.report.per_sample
        ]

    def task_rows(self) -> list[dict[str, Any]]:
        """Per task: the report's summary, format compliance, and ``<score>_n`` (samples behind each score)."""
        counts = score_counts(self.report)
        return [dict(r.as_dict(), format_compliance=self.report.format_compliance.get(r.task),
                     **{f"{k}_n": v for k, v in counts.get(r.task, dict.fromkeys(SCORES, 0)).items()})
                for r in self.report.per_task]


def score_records(
    records: list[Mapping[str, Any]],
    gold: Mapping[str, GoldReference],
    predictions: Path,
    *,
    model: str,
    checkpoint: str | None = None,
    judge: str = "rules",
    semantic: bool = False,
    reasoning_scores: Mapping[str, ReasoningScore] | None = None,
    judge_failures: int = 0,
) -> ScoredFile:
    """Score the records of ``predictions`` against ``gold`` (``reasoning_scores``: an LLM judge's verdicts,
    computed by the caller; samples it lacks are scored by the rules)."""
    from training.radrscore import EmbeddingStepMatcher, score_predictions

    if judge not in JUDGES:
        raise ValueError(f"--judge must be one of {', '.join(JUDGES)}, got {judge!r}")
    matcher = EmbeddingStepMatcher(pooling="words") if semantic else None
    report = score_predictions(records, gold, reasoning_scores=reasoning_scores, step_matcher=matcher)
    report.judge_failures = judge_failures
    report.model = model
    report.format_compliance = format_compliance(report)
    return ScoredFile(eval_id(predictions, model, checkpoint, judge, semantic), report, model, checkpoint, judge,
                      predictions)
