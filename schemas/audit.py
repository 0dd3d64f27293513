"""Rejections (the dead-letter table), per-stage counts and materializations."""

from __future__ import annotations

from datetime import datetime

from schemas.base import TableRecord


class Rejection(TableRecord):
    __table__ = "int_rejections"
    __description__ = "Dead-letter rows: what a stage could not use, with a reason code."
    __grain__ = "one rejected entity at one stage"
    __key__ = ("rejection_id",)

    rejection_id: str
    stage: str
    entity_id: str
    reason_code: str
    detail: str
    raw_output: str | None = None


class StageCount(TableRecord):
    __table__ = "audit_stage_counts"
    __description__ = "Per run, stage and batch: inputs = outputs + rejected + skipped."
    __grain__ = "one (stage, batch) of one run"
    __key__ = ("stage", "batch_id")

    stage: str
    inputs: int
    outputs: int
    rejected: int
    skipped: int
    wall_s: float
    finished_at: datetime
    skip_reason: str | None = None  # why the skipped inputs were skipped (mine: BUDGET, the run's LLM spend cap)


class Materialization(TableRecord):
    __table__ = "fct_materializations"
    __description__ = "Every Parquet partition written: table, partition, rows, path."
    __grain__ = "one partition write"
    __key__ = ("table_name", "partition")

    table_name: str
    partition: str
    rows: int
    path: str
    written_at: datetime
