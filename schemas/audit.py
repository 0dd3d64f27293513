"""Rejections (the dead-letter table), per-stage counts and materializations."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from schemas.base import TableRecord
from schemas.checks import relationship, sql_check


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

    __checks__ = (
        sql_check("audit_stage_counts", "balanced",
                  "SELECT stage || '|' || batch_id AS id FROM {table} WHERE inputs <> outputs + rejected + skipped",
                  "every batch accounts for its inputs: inputs = outputs + rejected + skipped"),
        # The quality gate of mining (radchain.settings: min_acceptance, `radchain run --min-acceptance`).
        sql_check("audit_stage_counts", "mine_acceptance",
                  "SELECT 'mine' AS id, format('mine accepted {{}} of {{}} decided samples ({{:.2f}}); the minimum '"
                  " || 'acceptance rate is {{:.2f}}', sum(outputs), sum(outputs + rejected),"
                  " sum(outputs) / sum(outputs + rejected), {min_acceptance}) AS detail "
                  "FROM {table} WHERE stage = 'mine' "
                  "HAVING sum(outputs + rejected) > 0 AND sum(outputs) / sum(outputs + rejected) < {min_acceptance}",
                  "the mine stage accepts at least min_acceptance of the samples it decided (skipped ones aside)",
                  scope="run", params=("min_acceptance",)),
        sql_check("audit_stage_counts", "rejection_rate",
                  "SELECT stage AS id, format('{{}} rejected {{}} of {{}} inputs ({{:.2f}}); the threshold is {{:.2f}}',"
                  " stage, sum(rejected), sum(inputs - skipped), sum(rejected) / sum(inputs - skipped),"
                  " {max_rejection_rate}) AS detail "
                  "FROM {table} GROUP BY stage "
                  "HAVING sum(inputs - skipped) > 0 AND sum(rejected) / sum(inputs - skipped) > {max_rejection_rate}",
                  "each stage of the run rejects at most max_rejection_rate of its inputs", severity="warn",
                  scope="run", params=("max_rejection_rate",)),
    )


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


class StageTotals(BaseModel):
    """One stage of one run, summed over its batches."""

    stage: str
    batches: int
    inputs: int
    outputs: int
    rejected: int
    skipped: int
    wall_s: float


class RunRecord(TableRecord):
    __table__ = "audit_runs"
    __description__ = ("One row per pipeline flow run (kept for every run): its state, why it failed, and the "
                       "counts of each stage it ran; v_runs adds its LLM spend and check results.")
    __grain__ = "one pipeline flow run"
    __key__ = ("run_id",)
    __checks__ = (
        sql_check("audit_runs", "failed_runs_say_why",
                  "SELECT run_id AS id FROM {table} WHERE state = 'Failed' AND coalesce(reason, '') = ''",
                  "a Failed run names its reason", severity="warn"),
    )

    flow: str = Field(description="the flow that ran (radchain-pipeline)")
    state: Literal["Running", "Completed", "Failed", "Crashed"] = Field(
        description="Running until the run ends; Crashed when the next run finds it was killed mid-way")
    reason: str | None = Field(default=None, description="why the run failed: the failing check or error, one line")
    requested_stages: list[str] = Field(description="the stages the run was asked to run, in DAG order")
    stages: list[StageTotals] = Field(description="per stage that finished: batches, inputs, outputs, rejected, "
                                                  "skipped, wall time")
    started_at: datetime
    finished_at: datetime | None = Field(default=None, description="when the run ended (null while Running)")
