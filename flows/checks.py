"""Data checks and quality gates in a pipeline run, and the run's own audit row.

After each stage, the checks of the tables that stage writes (declared in schemas/, run as SQL by
warehouse/checks.py) run over the warehouse; their results land in ``fct_check_results``. A failed
``error`` check stops the run: ``DataCheckFailed`` carries one line saying which check failed and why,
and the pipeline flow ends Failed with it. Gates are error checks with a threshold from the settings:
the mine stage's acceptance rate (``checks.min_acceptance``, ``radchain run --min-acceptance``), and the
datasets stage's checks (no empty split, no test patient in a training mart ...): a dataset version
that fails them is removed again, so it is never registered and ``train`` cannot pick it.

``RunAudit`` keeps one ``audit_runs`` row per flow run (Running, then Completed or Failed with the
reason, with each finished stage's totals; Crashed when a later run finds it killed): run history that
survives later runs, read by ``v_runs``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Any

import polars as pl

from flows.stages.common import BatchResult, RunContext
from schemas.audit import RunRecord
from schemas.base import Lineage
from warehouse.checks import CheckOutcome, all_checks, run_checks, write_results

log = logging.getLogger("radchain.checks")

CHECKS_KEY = "data-checks"
# Tables the runner writes for every stage (rejections, audit, materializations): checked after every stage.
SHARED_TABLES = ("int_rejections", "audit_stage_counts", "fct_materializations")
DATASET_TABLES = ("mart_sft_examples", "mart_rl_prompts", "mart_benchmark", "fct_dataset_versions")
THRESHOLD_HINT = {
    "min_acceptance": "RADCHAIN_CHECKS_MIN_ACCEPTANCE or `radchain run --min-acceptance`",
}


class DataCheckFailed(RuntimeError):
    """An error-severity data check failed after a stage: the run stops (one line says which and why)."""

    def __init__(self, stage: str, failed: Sequence[CheckOutcome], note: str = "") -> None:
        self.stage = stage
        self.failed = list(failed)
        first = failed[0]
        hint = "; ".join(f"set by {THRESHOLD_HINT[p]}" for p in first.check.params if p in THRESHOLD_HINT)
        more = f" (and {len(failed) - 1} more failed error checks: " + ", ".join(
            o.check.name for o in failed[1:]) + ")" if len(failed) > 1 else ""
        super().__init__(f"after stage {stage}, data check {first.line}{more}"
                         + (f" ({hint})" if hint else "") + (f"; {note}" if note else ""))

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (a state's data may be serialized)
        return (_rebuild_failure, (str(self), self.stage, self.failed))


def _rebuild_failure(message: str, stage: str, failed: list[CheckOutcome]) -> DataCheckFailed:
    err = DataCheckFailed.__new__(DataCheckFailed)
    RuntimeError.__init__(err, message)
    err.stage, err.failed = stage, failed
    return err


def stage_writes(stage: str) -> tuple[str, ...]:
    """The tables whose checks run after ``stage``: what its class declares it writes, plus the tables
    the runner writes for every stage."""
    from flows.stages.contract import stage_class

    return tuple(dict.fromkeys([*(t.__table__ for t in stage_class(stage).writes), *SHARED_TABLES]))


def stage_checks(stage: str, last: bool = True) -> list[Any]:
    """The checks to run after ``stage``. The tables every stage writes get their run-scoped checks (the
    gates, rejection rates) after each stage, and their whole-table checks (keys) after the run's last."""
    own = set(stage_writes(stage)) - set(SHARED_TABLES)
    return [c for c in all_checks(stage_writes(stage)) if c.table in own or last or c.scope == "run"]


def check_params_from(settings: Any, min_acceptance: float | None = None) -> dict[str, float]:
    """The checks' thresholds: the settings (RADCHAIN_CHECKS_*), the mine gate overridden per run."""
    params = settings.checks.params()
    if min_acceptance is not None:
        params["min_acceptance"] = float(min_acceptance)
    return params


def check_params(ctx: RunContext) -> dict[str, float]:
    return check_params_from(ctx.settings, ctx.options.get("min_acceptance"))


def _code_version() -> str:
    from radchain.build_info import code_version

    return f"{code_version()}/checks-v1"


def run_stage_checks(ctx: RunContext, stage: str, last: bool = True, con: Any = None) -> list[CheckOutcome]:
    """Run the checks of the tables ``stage`` wrote (``last``: the run's last stage, see stage_checks), store
    the results, log the failures; raise DataCheckFailed when an error check failed (after removing a
    dataset version the datasets stage built)."""
    wh = ctx.warehouse
    outcomes = run_checks(wh, stage_checks(stage, last), ctx.run_id, check_params(ctx), con=con)
    versions = []
    if stage == "datasets":
        versions = (wh.scan("fct_dataset_versions").filter(pl.col("run_id") == ctx.run_id)
                    .select("dataset_version").collect()["dataset_version"].to_list())
    write_results(wh, outcomes, ctx.run_id, stage, _code_version(), versions[0] if len(versions) == 1 else None)
    for o in outcomes:
        if not o.passed and o.check.severity == "warn":
            log.warning("data check warning after %s: %s", stage, o.line)
    failed = [o for o in outcomes if not o.passed and o.check.severity == "error"]
    if not failed:
        return outcomes
    note = ""
    if versions:
        for table in DATASET_TABLES:
            for v in versions:
                wh.delete_partitions(table, prefix=v)
        note = f"dataset version {', '.join(versions)} was not registered"
    wh.refresh_views()
    raise DataCheckFailed(stage, failed, note)


def run_results(ctx: RunContext) -> list[dict[str, Any]]:
    """This run's check results, failures first."""
    frame = (ctx.warehouse.scan("fct_check_results").filter(pl.col("run_id") == ctx.run_id)
             .select("stage", "check_name", "severity", "passed", "failing_rows", "sample_ids", "detail")
             .collect())
    return sorted(frame.to_dicts(), key=lambda r: (r["passed"], r["severity"] != "error", r["check_name"]))


def checks_markdown(rows: Sequence[dict[str, Any]], run_id: str) -> str:
    failed = [r for r in rows if not r["passed"]]
    errors = sum(r["severity"] == "error" for r in failed)
    head = (f"## Data checks of run {run_id}\n\n{len(rows)} checks ran: {len(rows) - len(failed)} passed, "
            f"{errors} errors failed, {len(failed) - errors} warnings.\n\n")
    lines = ["| stage | check | severity | result | failing rows | sample ids | detail |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        detail = (r["detail"] or "").replace("|", "\\|")
        lines.append(f"| {r['stage']} | `{r['check_name']}` | {r['severity']} | "
                     f"{'passed' if r['passed'] else '**failed**'} | {r['failing_rows']} | "
                     f"{', '.join(r['sample_ids'] or [])} | {detail} |")
    return head + "\n".join(lines)


def publish_checks(ctx: RunContext) -> None:
    from prefect.artifacts import create_markdown_artifact

    rows = run_results(ctx)
    if rows:
        create_markdown_artifact(key=CHECKS_KEY, markdown=checks_markdown(rows, ctx.run_id),
                                 description=f"Data checks of run {ctx.run_id} (fct_check_results)")


class RunAudit:
    """The ``audit_runs`` row of one pipeline flow run, rewritten as stages finish and when it ends."""

    def __init__(self, ctx: RunContext, stages: Sequence[str], flow: str = "radchain-pipeline") -> None:
        self.ctx, self.flow = ctx, flow
        self.requested = list(stages)
        self.started_at = datetime.now(UTC)
        self.stages: list[dict[str, Any]] = []
        self._close_killed_runs()
        self._write("Running")
        self._reader = ExitStack()  # one read-only connection for the run's checks (views read the live files)
        self._con: Any = None

    def _close_killed_runs(self) -> None:
        """Mark Crashed the runs that were killed before they could end.

        A pipeline run holds the warehouse lock from before its first audit row to after its last,
        so another run's row still Running, seen by a run that holds the lock, belongs to a process
        that is gone (SIGKILL, a lost machine): it would otherwise read Running forever.
        """
        wh = self.ctx.warehouse
        if not wh.partitions(RunRecord.__table__):
            return
        stale = wh.read(RunRecord).filter((pl.col("state") == "Running") & (pl.col("run_id") != self.ctx.run_id))
        stale = stale.with_columns(
            state=pl.lit("Crashed"),
            reason=pl.lit(f"ended without finishing (its process was killed); found by run {self.ctx.run_id}"))
        for closed in stale.partition_by("run_id"):  # one partition per run, rewritten as it was but closed
            row = closed.row(0, named=True)
            lineage = Lineage(run_id=row["run_id"], batch_id=row["batch_id"], code_version=row["code_version"])
            wh.write_batch("runs", row["run_id"], lineage, {RunRecord: closed})
            log.warning("run %s never finished (killed?): audit_runs now says Crashed", row["run_id"])

    def _write(self, state: str, reason: str | None = None) -> None:
        row = dict(flow=self.flow, state=state, reason=reason, requested_stages=self.requested, stages=self.stages,
                   started_at=self.started_at, finished_at=None if state == "Running" else datetime.now(UTC))
        lineage = Lineage(run_id=self.ctx.run_id, batch_id="run", code_version=_code_version())
        self.ctx.warehouse.write_batch("runs", self.ctx.run_id, lineage, {RunRecord: [row]})

    def after_stage(self, stage: str, results: Sequence[BatchResult]) -> list[CheckOutcome]:
        """Record the stage's totals, then run its data checks (DataCheckFailed stops the run)."""
        self.stages.append(dict(
            stage=stage, batches=len(results), inputs=sum(r.inputs for r in results),
            outputs=sum(r.outputs for r in results), rejected=sum(r.rejected for r in results),
            skipped=sum(r.skipped for r in results), wall_s=round(sum(r.wall_s for r in results), 3)))
        self._write("Running")
        if self._con is None:
            self._con = self._reader.enter_context(self.ctx.warehouse.read_connection())
        return run_stage_checks(self.ctx, stage, last=stage == self.requested[-1], con=self._con)

    def __enter__(self) -> "RunAudit":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.finish(exc)

    def finish(self, error: BaseException | None = None) -> None:
        """Completed, or Failed with the error's one line; then the run's checks as a Prefect artifact."""
        self._reader.close()
        self._con = None
        reason = None
        if error is not None:
            reason = " ".join(f"{type(error).__name__}: {error}".split())[:2000]
        self._write("Failed" if error is not None else "Completed", reason)
        self.ctx.warehouse.refresh_views()
        from prefect.context import FlowRunContext

        if FlowRunContext.get() is None:  # stages run outside a flow (benchmarks): no run to attach an artifact to
            return
        try:
            publish_checks(self.ctx)
        except Exception as e:  # an artifact is a view of the table; never fail a run over it
            log.warning("could not publish the data checks artifact: %s", e)
