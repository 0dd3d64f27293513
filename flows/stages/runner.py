"""The stage runner: everything a stage does not do itself (see flows/stages/contract.py).

For each stage, in DAG order:

1. ``plan()`` on a stage object made from the run context and its typed options;
2. each batch runs through ``execute_batch``: reuse of an unchanged batch (the stage's ``input_hash``
   against the stored audit row, rows and materialization records), else ``process(batch)``; then its
   partitions, rejections and audit row are written with lineage, plus one fct_materializations row per
   partition written (data tables, int_rejections, audit_stage_counts, the call ledger);
3. ``finish_stage``: partitions of this stage's tables that no batch of this run wrote or kept are removed
   (with their rejection, audit and materialization rows), ``finalize()`` runs and its rows are written;
4. ``StageRunner.after_stage``: the views are refreshed, then every hook in ``StageRunner.hooks`` runs
   with (ctx, stage name, batch results). This is the one place for work after a stage is complete.

Where a batch runs is the caller's choice (flows/pipeline.py: Prefect task runs, in-process or on a task
runner); without one, batches run as plain calls (benchmarks measure that).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import polars as pl

from flows.stages.common import BatchResult, RunContext
from flows.stages.contract import BatchOutput, Stage, StageOptions, dag_order, direct_upstream, discover
from radchain.runtime import gc_frozen
from schemas.audit import Materialization, Rejection, StageCount
from schemas.base import TableRecord

log = logging.getLogger("radchain.runner")

class RunOptions(StageOptions):
    """The runner's own options (read from the run's options like a stage's)."""

    show_progress: bool = True  # a terminal bar and a Prefect progress artifact for stages with a progress_unit
    force: bool = False  # never reuse a batch, even when its inputs did not change


@dataclass
class StageDone:
    """What ``finish_stage`` returns: the stage, its batch count and the partitions that stayed."""

    stage: str
    batches: int
    partitions: dict[str, list[str]] = field(default_factory=dict)


# ---- one batch ------------------------------------------------------------------------------------
def execute_batch(stage: Stage, batch: Any) -> BatchResult:
    """Run one batch of ``stage`` and write what it produced; its BatchResult (in = out + rejected + skipped)."""
    started = time.perf_counter()
    digest = stage.input_hash(batch)
    if digest is not None and getattr(stage, "plan_complete", False) and not RunOptions.of(stage.ctx).force:
        reused = _try_reuse(stage, batch, digest, started)
        if reused is not None:
            return reused
    out = stage.process(batch)
    if digest is not None and out.input_hash is None:
        out.input_hash = digest
    return write_output(stage, batch, out, started)


def stage_version(stage: Stage | type[Stage], input_hash: str | None) -> str:
    return stage.version + (f"+in.{input_hash[:20]}" if input_hash else "")


def _per_batch_tables(stage: Stage | type[Stage]) -> list[type[TableRecord]]:
    """Written tables whose partition is the batch id (not history, not written by finalize)."""
    skip = {t.__table__ for t in (*stage.history, *stage.final_tables)}
    return [t for t in stage.writes if t.__table__ not in skip]


def _mat(wh: Any, table: str, partition: str, rows: int, now: datetime) -> dict:
    return dict(table_name=table, partition=partition, rows=rows,
                path=str(wh.table_dir(table) / f"{partition}.parquet"), written_at=now)


def write_output(stage: Stage, batch: Any, out: BatchOutput, started: float) -> BatchResult:
    """Write a batch's partitions, rejections, audit row and materialization records."""
    ctx, wh = stage.ctx, stage.ctx.warehouse
    batch_id = out.batch_id or stage.batch_id(batch)
    lineage = ctx.lineage(batch_id, stage_version(stage, out.input_hash))
    result = BatchResult(stage.name, batch_id, out.inputs, out.outputs, len(out.rejections), out.skipped, 0.0,
                         out.skip_reason if out.skipped else None)
    prefixed = f"{stage.name}-{batch_id}"
    history = {t.__table__ for t in stage.history}
    now = datetime.now(UTC)
    mats: list[dict] = []
    history_mats: dict[str, list[dict]] = {}
    parts: dict[str, list[str]] = {}
    for model, rows in out.frames.items():
        n = wh.write(model, batch_id, rows, lineage)
        mats.append(_mat(wh, model.__table__, batch_id, n, now))
        parts.setdefault(model.__table__, []).append(batch_id)
    for model, by_partition in out.partitions.items():
        for partition, rows in by_partition.items():
            n = wh.write(model, partition, rows, lineage)
            if model.__table__ in history and partition != batch_id:  # outlives the batch: recorded on its own
                history_mats.setdefault(partition, []).append(_mat(wh, model.__table__, partition, n, now))
            else:
                mats.append(_mat(wh, model.__table__, partition, n, now))
            parts.setdefault(model.__table__, []).append(partition)
    n = wh.write(Rejection, prefixed, list(out.rejections), lineage)
    mats.append(_mat(wh, Rejection.__table__, prefixed, n, now))
    result.wall_s = time.perf_counter() - started
    _write_audit(stage, result, lineage, mats, now)
    wh.write(Materialization, prefixed, mats, lineage)
    for partition, rows in history_mats.items():
        wh.write(Materialization, f"{stage.name}-{partition}", rows, lineage)
    if out.committed is not None:
        out.committed()
    result.partitions = parts
    return result


def _write_audit(stage: Stage, result: BatchResult, lineage: Any, mats: list[dict], now: datetime) -> None:
    wh = stage.ctx.warehouse
    prefixed = f"{stage.name}-{result.batch_id}"
    row = dict(stage=stage.name, inputs=result.inputs, outputs=result.outputs, rejected=result.rejected,
               skipped=result.skipped, wall_s=result.wall_s, finished_at=now, skip_reason=result.skip_reason)
    n = wh.write(StageCount, prefixed, [row], lineage)
    mats.append(_mat(wh, StageCount.__table__, prefixed, n, now))


# ---- reuse of an unchanged batch -------------------------------------------------------------------
def _same_code(a: str | None, b: str) -> bool:
    """Same package version and stage version (+ input hash); the git commit may differ (a commit that changes
    what a stage computes changes its version or its input hash)."""
    def strip(cv: str) -> str:
        head, _, tail = cv.partition("/")
        return head.split("+g", 1)[0] + "/" + tail
    return a is not None and strip(a) == strip(b)


def _try_reuse(stage: Stage, batch: Any, digest: str, started: float) -> BatchResult | None:
    """The stored result of a batch produced from the same inputs by the same code, re-recorded for this run
    (a new audit row); None when anything stored does not match (then the batch is processed)."""
    wh, name = stage.ctx.warehouse, stage.name
    batch_id = stage.batch_id(batch)
    lineage = stage.ctx.lineage(batch_id, stage_version(stage, digest))
    code = lineage.code_version
    prefixed = f"{name}-{batch_id}"
    audit = wh.scan(StageCount).filter((pl.col("stage") == name) & (pl.col("batch_id") == batch_id)).collect()
    if audit.height != 1 or not _same_code(audit["code_version"][0], code):
        return None
    row = audit.row(0, named=True)
    if prefixed not in wh.partitions(Rejection.__table__):
        return None
    rejections = (wh.scan(Rejection).filter((pl.col("stage") == name) & (pl.col("batch_id") == batch_id))
                  .select("code_version", "reason_code").collect())
    if rejections.height != row["rejected"] or not all(_same_code(c, code) for c in rejections["code_version"]):
        return None
    recorded = _recorded_rows(wh, prefixed)
    for model in _per_batch_tables(stage):
        table = model.__table__
        if batch_id not in wh.partitions(table) or recorded.get((table, batch_id)) is None:
            return None
        stored = wh.scan(model).filter(pl.col("batch_id") == batch_id).select("code_version").collect()
        if stored.height != recorded[(table, batch_id)] or not all(_same_code(c, code) for c in stored["code_version"]):
            return None
    if not stage.reuse(batch, dict(audit=row, reason_codes=rejections["reason_code"].to_list())):
        return None
    result = BatchResult(name, batch_id, row["inputs"], row["outputs"], row["rejected"], row["skipped"], 0.0,
                         row.get("skip_reason"))
    result.wall_s = time.perf_counter() - started
    now = datetime.now(UTC)
    mats: list[dict] = []
    _write_audit(stage, result, lineage, mats, now)
    # The partition's other records (the kept rows) stay; the audit row's record is this run's.
    kept = _materializations(wh, prefixed).filter(pl.col("table_name") != StageCount.__table__)
    wh.write(Materialization, prefixed, kept.drop("run_id", "batch_id", "code_version").to_dicts() + mats, lineage)
    result.partitions = {t.__table__: [batch_id] for t in _per_batch_tables(stage)}
    stage.tick(stage.units(batch))
    return result


def _materializations(wh: Any, partition: str) -> pl.DataFrame:
    path = wh.table_dir(Materialization.__table__) / f"{partition}.parquet"
    if not path.exists():
        return pl.from_arrow(Materialization.arrow_schema().empty_table())
    return pl.read_parquet(path)


def _recorded_rows(wh: Any, partition: str) -> dict[tuple[str, str], int]:
    mats = _materializations(wh, partition)
    return {(t, p): n for t, p, n in mats.select("table_name", "partition", "rows").iter_rows()}


def last_run_complete(stage: Stage, batch_ids: Sequence[str]) -> bool:
    """Did one run of this stage write the audit row of every batch of the plan (it was not killed mid-way)?"""
    audit = (stage.ctx.warehouse.scan(StageCount).filter(pl.col("stage") == stage.name)
             .select("batch_id", "run_id").collect())
    runs = dict(audit.iter_rows())
    return bool(batch_ids) and all(b in runs for b in batch_ids) and len({runs[b] for b in batch_ids}) == 1


# ---- after the batches -----------------------------------------------------------------------------
def finish_stage(stage: Stage, results: Sequence[BatchResult]) -> StageDone:
    """Remove what the current plan no longer produces, run ``finalize`` and write its rows."""
    ctx, wh = stage.ctx, stage.ctx.warehouse
    kept: dict[str, set[str]] = {}
    for r in results:
        for table, partitions in r.partitions.items():
            kept.setdefault(table, set()).update(partitions)
    if stage.replaces:
        for model in _per_batch_tables(stage):
            wh.delete_partitions(model.__table__, keep=kept.get(model.__table__, set()))
    final = stage.finalize()
    prefixed_keep = {f"{stage.name}-{r.batch_id}" for r in results}
    if final:
        partition = stage.final_partition
        lineage = ctx.lineage(partition, stage.version)
        wh.write_batch(stage.name, partition, lineage, final)
        for model in final:
            kept.setdefault(model.__table__, set()).add(partition)
        prefixed_keep.add(f"{stage.name}-{partition}")
    if stage.replaces:
        for model in stage.final_tables:
            wh.delete_partitions(model.__table__, keep=kept.get(model.__table__, set()))
        for model in (Rejection, StageCount):
            wh.delete_partitions(model.__table__, keep=prefixed_keep, prefix=f"{stage.name}-")
        history = {f"{stage.name}-{p}" for t in stage.history for p in wh.partitions(t.__table__)}
        wh.delete_partitions(Materialization.__table__, keep=prefixed_keep | history, prefix=f"{stage.name}-")
    return StageDone(stage.name, len(results), {t: sorted(p) for t, p in kept.items()})


# ---- progress ---------------------------------------------------------------------------------------
class _BatchTicks:
    """Progress of one batch: what the stage reports while it works; the runner adds the rest when it ends."""

    def __init__(self, progress: Any):
        self.progress, self.n = progress, 0
        self._lock = threading.Lock()

    def __call__(self, n: int = 1) -> None:
        with self._lock:
            self.n += n
        self.progress(n)

    def add_spend(self, usd: float) -> None:
        spend = getattr(self.progress, "add_spend", None)
        if spend is not None:
            spend(usd)


# ---- running stages --------------------------------------------------------------------------------
# (stage, batches, wait_for, progress) -> (results, what the stage's finalize waits for)
BatchExecutor = Callable[[Stage, Sequence[Any], Sequence[Any], Any], tuple[list[BatchResult], list[Any]]]
# (stage, results, wait_for) -> what the next stages wait for (a StageDone; a Prefect state in flows/pipeline.py)
Finisher = Callable[[Stage, list[BatchResult], Sequence[Any]], Any]
Hook = Callable[[RunContext, str, list[BatchResult]], None]
# (stage, total units, unit name) -> a progress object: progress(n), optional add_spend(usd) and close()
ProgressFactory = Callable[[str, int, str], Any]


def in_process(run_batch: Callable[..., tuple[BatchResult, Any]] | None = None) -> BatchExecutor:
    """Batches one after another in this process. ``run_batch(stage, batch, wait_for)`` returns the result and
    what the stage's finalize waits for (flows/pipeline.py: a Prefect task run and its state); by default
    ``execute_batch`` and the result itself."""
    def call(stage: Stage, batch: Any, wait_for: Sequence[Any]) -> tuple[BatchResult, Any]:
        if run_batch is None:
            result = execute_batch(stage, batch)
            return result, result
        return run_batch(stage, batch, wait_for)

    def run(stage: Stage, batches: Sequence[Any], wait_for: Sequence[Any], progress: Any):
        results, handles = [], []
        for b in batches:
            ticks = _BatchTicks(progress) if progress is not None else None
            stage.progress = ticks
            try:
                result, handle = call(stage, b, wait_for)
            finally:
                stage.progress = None
            results.append(result)
            handles.append(handle)
            if ticks is not None and ticks.n < stage.units(b):
                progress(stage.units(b) - ticks.n)
        return results, handles

    return run


class StageRunner:
    """Runs stages in DAG order (see the module doc). ``hooks`` run after each complete stage."""

    def __init__(self, ctx: RunContext, *, executor: BatchExecutor | None = None,
                 finisher: Finisher | None = None, hooks: Iterable[Hook] = (),
                 progress: ProgressFactory | None = None):
        self.ctx = ctx
        self.progress = progress
        self.executor = executor or in_process()
        self.finisher = finisher or (lambda stage, results, wait_for: finish_stage(stage, results))
        self.hooks: list[Hook] = list(hooks)
        self.options = RunOptions.of(ctx)
        self.walls: dict[str, float] = {}

    def run(self, names: Iterable[str]) -> dict[str, list[BatchResult]]:
        registry = discover()
        wanted = list(names)
        unknown = [n for n in wanted if n not in registry]
        if unknown:
            raise ValueError(f"unknown stages {unknown}; known: {', '.join(s.name for s in dag_order())}")
        chosen = [s for s in dag_order() if s.name in wanted]
        unknown_options = set(self.ctx.options) - known_options(registry.values())
        if unknown_options:
            log.warning("options no stage or runner declares (ignored): %s", ", ".join(sorted(unknown_options)))
        results: dict[str, list[BatchResult]] = {}
        done: dict[str, Any] = {}  # stage name -> what its finalize handed on
        for cls in chosen:
            # A stage waits for the stages of this run that write what it reads: the edges of the run graph.
            wait_for = [done[u.name] for u in direct_upstream(cls, chosen) if u.name in done]
            t0 = time.perf_counter()
            with gc_frozen():  # no 0.2 s full collections over the imported libraries mid-stage
                out, done[cls.name] = self.run_stage(cls, wait_for)
            results[cls.name] = out
            self.after_stage(cls.name, out, time.perf_counter() - t0)
        return results

    def run_stage(self, cls: type[Stage], wait_for: Sequence[Any] = ()) -> tuple[list[BatchResult], Any]:
        stage = cls(self.ctx)
        batches = stage.plan()
        if stage.input_hash is not Stage.input_hash:  # the stage can reuse batches: was its last run complete?
            stage.plan_complete = last_run_complete(stage, [stage.batch_id(b) for b in batches])
        progress = None
        if stage.progress_unit and (self.progress is not None or self.options.show_progress):
            total = sum(stage.units(b) for b in batches)
            if self.progress is not None:
                progress = self.progress(stage.name, total, stage.progress_unit)
            else:
                from flows.progress import StageProgress

                progress = StageProgress(stage.name, total, unit=stage.progress_unit)
        try:
            out, handles = self.executor(stage, batches, wait_for, progress)
        finally:
            if progress is not None:
                progress.close()
        return out, self.finisher(stage, out, handles or list(wait_for))

    def after_stage(self, name: str, results: list[BatchResult], wall: float) -> None:
        """The stage's batches and finalize are done: refresh the views, then run every hook."""
        self.ctx.warehouse.refresh_views()
        self.walls[name] = wall
        for hook in self.hooks:
            hook(self.ctx, name, results)


# Options of the flow's task runner (flows/runners.py), read before any stage runs.
RUNNER_SPEC_OPTIONS = frozenset({"runner", "dask_address", "dask_workers"})


def known_options(stages: Iterable[type[Stage]]) -> set[str]:
    """Every option name a stage's Options, the runner's RunOptions or the task runner declares."""
    names = set(RunOptions.model_fields) | RUNNER_SPEC_OPTIONS
    for cls in stages:
        names |= set(cls.Options.model_fields)
    return names


def shipped(stage: Stage, ctx: RunContext) -> Stage:
    """A copy of ``stage`` around another context (one safe to send to remote workers)."""
    other = copy.copy(stage)
    other.ctx = ctx
    other.progress = None
    return other


def run_stages(ctx: RunContext, stages: Iterable[str], *,
               batch_runner: Callable[[Stage, Any], BatchResult] | None = None,
               on_stage: Callable[[str, list[BatchResult], float], None] | None = None,
               hooks: Iterable[Hook] = (), progress: ProgressFactory | None = None) -> dict[str, list[BatchResult]]:
    """Run stages in DAG order without Prefect (benchmarks, tests). ``batch_runner(stage, batch)`` replaces
    ``execute_batch`` (a test wraps it); ``on_stage(name, results, wall_s)`` is told when a stage is done;
    ``progress`` makes the progress of stages that report it (default: a StageProgress unless the run option
    ``show_progress`` is false)."""
    def call(stage: Stage, batch: Any, wait_for: Sequence[Any]) -> tuple[BatchResult, Any]:
        result = batch_runner(stage, batch)
        return result, result

    executor = in_process(None if batch_runner is None else call)
    runner = StageRunner(ctx, executor=executor, hooks=hooks, progress=progress)
    if on_stage is not None:
        runner.hooks.append(lambda c, name, out: on_stage(name, out, runner.walls[name]))
    return runner.run(stages)


def final_errors() -> tuple[type[BaseException], ...]:
    """Errors no retry can help with, as the registered stages declare them."""
    return tuple(e for cls in discover().values() for e in cls.final_errors)
