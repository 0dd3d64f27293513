"""The radchain pipeline as a Prefect flow: each stage plans batches, each batch is a task run.

By default the batches of a stage run one after another in the flow's process. With
``options={"runner": "dask"}`` (``radchain run --runner dask``) they are submitted as task runs
to a Dask cluster through prefect-dask and gathered before the stage's ``finalize``; a flow
given another task runner (``pipeline_flow.with_options(task_runner=RayTaskRunner(...))``)
fans out on that one. See flows/runners.py.
"""

from __future__ import annotations

import importlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run
from prefect.states import Failed

from extractors.sources import SourceError

from flows.checks import DataCheckFailed, RunAudit
from flows.locking import warehouse_lock
from flows.runners import (
    RunnerSpec,
    StageRunner,
    open_task_runner,
    submitting_stage_runner,
)
from flows.stages.common import BatchResult, RunContext, SourceSpec
from radchain.runtime import gc_frozen
from radchain.settings import Settings, get_settings
from warehouse import Warehouse

# Stage name -> module implementing the stage protocol (flows/stages/common.py), in DAG order.
STAGE_MODULES = {
    "ingest": "flows.stages.ingest",
    "label": "flows.stages.label",
    "tasks": "flows.stages.tasks",
    "mine": "flows.stages.mine",
    "datasets": "flows.stages.datasets",
}
ALL_STAGES = tuple(STAGE_MODULES)
# Seconds per stage of the most recent pipeline flow run in this process (benchmarks read it).
LAST_STAGE_WALLS: dict[str, float] = {}


def stage_module(name: str) -> Any:
    return importlib.import_module(STAGE_MODULES[name])


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """A failed batch is retried once, unless the LLM endpoint is down (the mine stage's circuit breaker
    opened): a retry would only fail again, later."""
    from flows.stages.mine import LLMEndpointDown

    return not isinstance(getattr(state, "data", None), LLMEndpointDown)


@task(name="batch", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2, persist_result=False,
      retry_condition_fn=_worth_retrying)
def run_batch_task(stage: str, ctx: RunContext, batch: Any) -> BatchResult:
    return stage_module(stage).run_batch(ctx, batch)


@task(name="finalize", cache_policy=NO_CACHE, persist_result=False)
def finalize_task(stage: str, ctx: RunContext) -> BatchResult | None:
    return stage_module(stage).finalize(ctx)


def run_stages(
    ctx: RunContext,
    stages: Sequence[str],
    batch_runner: Callable[[str, RunContext, Any], BatchResult] | None = None,
    finalizer: Callable[[str, RunContext], BatchResult | None] | None = None,
    on_stage: Callable[[str, list[BatchResult], float], None] | None = None,
    stage_runner: StageRunner | None = None,
) -> dict[str, list[BatchResult]]:
    """Run stages in DAG order. With no runners given, stage functions are called directly
    (benchmarks use this to measure orchestration overhead).

    ``batch_runner`` runs one batch at a time, in this process. ``stage_runner`` instead gets all
    of a stage's batches at once (to fan them out) and returns their results; either way every
    batch of a stage finishes before its ``finalize`` and before the next stage starts."""
    batch_runner = batch_runner or (lambda s, c, b: stage_module(s).run_batch(c, b))
    finalizer = finalizer or (lambda s, c: stage_module(s).finalize(c))
    results: dict[str, list[BatchResult]] = {}
    for name in ALL_STAGES:
        if name not in stages:
            continue
        t0 = time.perf_counter()
        with gc_frozen():  # no 0.2 s full collections over the imported libraries mid-stage
            out = _run_stage(name, ctx, batch_runner, finalizer, stage_runner)
        results[name] = out
        if on_stage:
            on_stage(name, out, time.perf_counter() - t0)
    return results


def _run_stage(
    name: str,
    ctx: RunContext,
    batch_runner: Callable[[str, RunContext, Any], BatchResult],
    finalizer: Callable[[str, RunContext], BatchResult | None],
    stage_runner: StageRunner | None,
) -> list[BatchResult]:
    mod = stage_module(name)
    batches = mod.plan(ctx)
    progress = None
    if name == "mine" and ctx.options.get("show_progress", True):
        from flows.progress import StageProgress

        progress = StageProgress(name, sum(len(b["sample_ids"]) for b in batches))
    try:
        if stage_runner is not None:
            # Remote batches cannot call back into this process: the runner ticks per batch.
            out = stage_runner(name, ctx, batches, progress)
        else:
            if progress is not None:
                ctx.options["progress"] = progress
            out = [batch_runner(name, ctx, b) for b in batches]
    finally:
        if progress is not None:
            progress.close()
            ctx.options.pop("progress", None)
    final = finalizer(name, ctx)
    if final is not None:
        out.append(final)
    ctx.warehouse.refresh_views()
    return out


def make_context(
    settings: Settings | None = None,
    source: SourceSpec | None = None,
    run_id: str | None = None,
    **options: Any,
) -> RunContext:
    settings = settings or get_settings()
    if settings.llm.api_key is not None:
        # The context is handed to every task (and pickled to Dask workers): no API key in it. The mine
        # stage resolves the key where it makes its calls (radchain.secrets.with_api_key: environment,
        # then the Prefect Secret block).
        settings = settings.model_copy(update={"llm": settings.llm.model_copy(update={"api_key": None})})
    wh = Warehouse(settings.warehouse_dir).ensure()
    return RunContext(settings=settings, warehouse=wh, run_id=run_id or uuid.uuid4().hex[:16], source=source,
                      options=options)


@flow(name="radchain-pipeline", log_prints=True, persist_result=False)
def pipeline_flow(
    source: SourceSpec | None = None,
    stages: list[str] = list(ALL_STAGES),
    options: dict[str, Any] | None = None,
) -> dict[str, list[BatchResult]]:
    """Run the stages; ``options`` are stage options plus the runner (``runner``: default | dask,
    ``dask_address``, ``dask_workers``; see flows/runners.py)."""
    unknown = [s for s in stages if s not in STAGE_MODULES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; known: {', '.join(ALL_STAGES)}")
    spec = RunnerSpec.from_options(options)
    run_id = str(flow_run.get_id() or uuid.uuid4())
    try:
        return _run_pipeline(source, stages, options, spec, run_id)
    except (SourceError, DataCheckFailed) as e:
        # The source's content or mapping is unusable (a missing column, no rows, a broken JSON
        # line ...), or an error data check failed after a stage (flows/checks.py): the run is Failed
        # with that one line, and no traceback is logged for it.
        # Calling the flow still raises the error (the CLI prints it as one line).
        return Failed(message=f"{type(e).__name__}: {e}", data=e)


def _run_pipeline(source: SourceSpec | None, stages: list[str], options: dict[str, Any] | None,
                  spec: RunnerSpec, run_id: str) -> dict[str, list[BatchResult]]:
    # One writer per warehouse: a second run waits (RADCHAIN_LOCK_TIMEOUT_S), then fails naming the holder.
    with warehouse_lock(get_settings().warehouse_dir, purpose=f"pipeline run {run_id}"):
        ctx = make_context(source=source, run_id=run_id, **(options or {}))
        logger = _logger()
        LAST_STAGE_WALLS.clear()
        audit = RunAudit(ctx, [s for s in ALL_STAGES if s in stages])  # this run's audit_runs row
        finalizer = lambda s, c: finalize_task.with_options(name=f"{s}-finalize")(s, c)
        with audit, ExitStack() as stack:
            task_runner = open_task_runner(spec, stack)
            where = spec.describe() if task_runner is None or spec.kind == "dask" else type(task_runner).__name__

            def on_stage(name: str, out: list[BatchResult], wall: float) -> None:
                LAST_STAGE_WALLS[name] = wall
                logger.info("stage %s: %d batch results in %.2f s (%s)", name, len(out), wall, where)
                audit.after_stage(name, out)  # the data checks of its tables; an error check stops the run

            if task_runner is None:
                results = run_stages(
                    ctx, stages,
                    batch_runner=lambda s, c, b: run_batch_task.with_options(name=f"{s}-batch")(s, c, b),
                    finalizer=finalizer, on_stage=on_stage,
                )
            else:
                results = run_stages(ctx, stages, stage_runner=submitting_stage_runner(task_runner, run_batch_task),
                                     finalizer=finalizer, on_stage=on_stage)
        from flows import artifacts

        artifacts.publish_run_artifacts(ctx, results)
    return results


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # the flow function called outside a flow run
        return logging.getLogger("radchain.pipeline")
