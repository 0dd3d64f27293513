"""What every stage shares: the run context, batch results and the audit bookkeeping.

A stage module exposes three plain functions (no Prefect in them, so benchmarks can call
them directly and compare against the orchestrated run):

    plan(ctx) -> list[Any]              the units of work (batches), cheap to compute
    run_batch(ctx, batch) -> BatchResult   process one batch and write its partitions
    finalize(ctx) -> BatchResult | None    optional global step after all batches

flows/pipeline.py turns each ``run_batch`` call into a Prefect task run.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from radchain import __version__
from radchain.settings import Settings
from schemas.audit import Rejection, StageCount
from schemas.base import Lineage, TableRecord, stable_id
from warehouse import Warehouse


@dataclass
class SourceSpec:
    """Where reports come from: a MIMIC-CXR tree, or a generic table with a column mapping."""

    path: Path
    kind: str = "auto"  # auto | mimic | table
    id_col: str = "study_id"
    text_col: str | None = "text"
    findings_col: str | None = None
    impression_col: str | None = None
    patient_col: str | None = None
    split_col: str | None = None
    date_col: str | None = None
    image_col: str | None = None
    trim_ids: bool = False  # table ids are kept as written unless this asks to strip blanks around them


@dataclass
class RunContext:
    settings: Settings
    warehouse: Warehouse
    run_id: str
    source: SourceSpec | None = None
    options: dict[str, Any] = field(default_factory=dict)  # stage options (extractor, caps, seed ...)

    def lineage(self, batch_id: str, stage_version: str) -> Lineage:
        return Lineage(run_id=self.run_id, batch_id=batch_id, code_version=f"radchain-{__version__}/{stage_version}")


@dataclass
class BatchResult:
    stage: str
    batch_id: str
    inputs: int
    outputs: int
    rejected: int
    skipped: int
    wall_s: float
    skip_reason: str | None = None

    def __post_init__(self) -> None:
        if self.inputs != self.outputs + self.rejected + self.skipped:
            raise AssertionError(
                f"{self.stage}/{self.batch_id}: inputs {self.inputs} != outputs {self.outputs} "
                f"+ rejected {self.rejected} + skipped {self.skipped}"
            )


class Stage(Protocol):
    NAME: str
    VERSION: str

    def plan(self, ctx: RunContext) -> list[Any]: ...
    def run_batch(self, ctx: RunContext, batch: Any) -> BatchResult: ...
    def finalize(self, ctx: RunContext) -> BatchResult | None: ...


def rejection(stage: str, entity_id: str, reason_code: str, detail: str, raw_output: str | None = None) -> dict:
    """A dead-letter row. The id is deterministic so a re-run replaces rather than duplicates."""
    return dict(
        rejection_id=stable_id(stage, entity_id, reason_code),
        stage=stage,
        entity_id=entity_id,
        reason_code=reason_code,
        detail=detail[:2000],
        raw_output=None if raw_output is None else raw_output[:20000],
    )


def record_batch(
    ctx: RunContext,
    *,
    stage: str,
    stage_version: str,
    batch_id: str,
    started: float,
    frames: Mapping[type[TableRecord], Any],
    rejections: Sequence[dict],
    inputs: int,
    outputs: int,
    skipped: int = 0,
    skip_reason: str | None = None,
) -> BatchResult:
    """Write a batch's tables, its rejections and its audit row; check in = out + rejected + skipped."""
    result = BatchResult(stage, batch_id, inputs, outputs, len(rejections), skipped, 0.0,
                         skip_reason if skipped else None)
    lineage = ctx.lineage(batch_id, stage_version)
    partition = f"{stage}-{batch_id}"
    if frames:
        ctx.warehouse.write_batch(stage, batch_id, lineage, frames)
    ctx.warehouse.write(Rejection, partition, list(rejections), lineage)
    result.wall_s = time.perf_counter() - started
    ctx.warehouse.write(
        StageCount,
        partition,
        [dict(stage=stage, inputs=inputs, outputs=outputs, rejected=len(rejections), skipped=skipped,
              wall_s=result.wall_s, finished_at=datetime.now(UTC), skip_reason=result.skip_reason)],
        lineage,
    )
    return result
