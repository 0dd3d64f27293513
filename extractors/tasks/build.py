"""Build all five tasks from the input tables, with study-level accounting.

The audit unit is a study of stg_studies:

- output:   it yielded at least one sample (as the current study of a sample);
- skipped:  it was a candidate of some task but the capped, balanced sampling did not pick it;
- rejected: no task could use it, with the reason (a gate such as NO_IMAGE, or a label reason
  such as ONLY_UNCERTAIN; see prepare.py).

These three partition the studies, so inputs = outputs + skipped + rejected exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from extractors.tasks.binary import build_binary
from extractors.tasks.common import TaskConfig, TaskOutput
from extractors.tasks.multi import build_multi
from extractors.tasks.open_ended import build_open
from extractors.tasks.prepare import GATE_DETAIL, Corpus, prepare
from extractors.tasks.single import build_single
from extractors.tasks.temporal import build_temporal
from schemas.vqa import TASKS

LABEL_BUILDERS: dict[str, Callable[[Corpus, TaskConfig], TaskOutput]] = {
    "binary": build_binary, "single": build_single, "multi": build_multi, "open": build_open,
}


@dataclass(frozen=True)
class StudyRejection:
    study_id: str
    reason_code: str
    detail: str


@dataclass
class TaskBuildResult:
    samples: dict[str, list[dict[str, Any]]]  # task -> int_vqa_samples rows (without lineage)
    rejections: list[StudyRejection]
    inputs: int
    outputs: int
    skipped: int
    candidates: dict[str, int] = field(default_factory=dict)  # task -> candidate studies
    skip_reasons: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> reason -> pairs

    @property
    def rejected(self) -> int:
        return len(self.rejections)

    def sample_counts(self) -> dict[str, int]:
        return {task: len(rows) for task, rows in self.samples.items()}

    def rejection_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.rejections:
            counts[r.reason_code] = counts.get(r.reason_code, 0) + 1
        return dict(sorted(counts.items()))

    def summary(self) -> dict[str, Any]:
        return dict(
            inputs=self.inputs, outputs=self.outputs, rejected=self.rejected, skipped=self.skipped,
            samples=self.sample_counts(), candidates=self.candidates, rejections=self.rejection_counts(),
            skip_reasons=self.skip_reasons,
        )


def check_patient_splits(samples: dict[str, list[dict[str, Any]]]) -> None:
    """No patient may appear in two splits (the gates guarantee it; a failure is a bug)."""
    split_of: dict[str, str] = {}
    for rows in samples.values():
        for s in rows:
            seen = split_of.setdefault(s["patient_id"], s["split"])
            if seen != s["split"]:
                raise AssertionError(f"patient {s['patient_id']} has samples in splits {seen} and {s['split']}")


def _dedupe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for r in rows:
        if r["sample_id"] not in seen:
            seen.add(r["sample_id"])
            out.append(r)
    return out


def study_rejections(corpus: Corpus, eligible: set[str]) -> list[StudyRejection]:
    """A reason for every study no task could use: its gate, else its label problem."""
    status = (
        corpus.studies.join(corpus.profiles.select("study_id", "label_gate"), on="study_id", how="left")
        .filter(~pl.col("study_id").is_in(pl.Series(sorted(eligible), dtype=pl.String).implode()))
        .with_columns(reason=pl.coalesce("gate", "label_gate", pl.lit("NO_ELIGIBLE_TASK")))
        .sort("study_id")
    )
    out = []
    for study_id, patient_id, reason in status.select("study_id", "patient_id", "reason").iter_rows():
        detail = GATE_DETAIL.get(reason, reason)
        if reason == "SPLIT_CONFLICT":
            detail = f"{detail} (patient {patient_id})"
        out.append(StudyRejection(study_id, reason, detail))
    return out


def build_tasks(
    labels: pl.DataFrame | None,
    studies: pl.DataFrame | None,
    images: pl.DataFrame | None,
    temporal_csv: pl.DataFrame | None = None,
    config: TaskConfig | None = None,
) -> TaskBuildResult:
    """All requested tasks' samples plus the study-level rejections and counts."""
    config = config or TaskConfig()
    corpus = prepare(labels, studies, images, require_images=config.require_images)
    outputs: list[TaskOutput] = []
    for task in TASKS:
        if task not in config.tasks:
            continue
        if task == "temporal":
            outputs.append(build_temporal(corpus, config, temporal_csv))
        else:
            outputs.append(LABEL_BUILDERS[task](corpus, config))
    samples = {o.task: _dedupe(o.samples) for o in outputs}
    check_patient_splits(samples)
    eligible = set().union(*(o.eligible for o in outputs)) if outputs else set()
    produced = {s["study_id"] for rows in samples.values() for s in rows}
    if not produced <= eligible:
        raise AssertionError("a sample came from a study no builder declared eligible")
    rejections = study_rejections(corpus, eligible)
    inputs = corpus.studies.height
    result = TaskBuildResult(
        samples=samples, rejections=rejections, inputs=inputs, outputs=len(produced),
        skipped=len(eligible) - len(produced),
        candidates={o.task: len(o.eligible) for o in outputs},
        skip_reasons={o.task: dict(sorted(o.skip_reasons.items())) for o in outputs},
    )
    if result.inputs != result.outputs + result.rejected + result.skipped:
        raise AssertionError(f"task accounting does not balance: {result.summary()}")
    return result
