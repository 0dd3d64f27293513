"""The radchain pipeline as a Prefect flow: each stage plans batches, each batch is a task run.

The stages and their order come from flows/stages/ (one class per stage; flows/stages/contract.py);
flows/stages/runner.py runs them. Here each batch becomes a task run named ``<stage>[<batch>]`` (renamed
with its counts when it finishes), each stage's finalize a task run ``<stage>[finalize]``, and a
stage's batches wait for the finalize of the stages it reads from, so the run graph draws the DAG.

By default the batches of a stage run one after another in the flow's process. With
``options={"runner": "dask"}`` (``radchain run --runner dask``) they are submitted as task runs
to a Dask cluster through prefect-dask and gathered before the stage's ``finalize``; a flow
given another task runner (``pipeline_flow.with_options(task_runner=RayTaskRunner(...))``)
fans out on that one. See flows/runners.py.
"""

from __future__ import annotations

import logging
import uuid
from contextlib import ExitStack
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run
from prefect.states import Failed
from prefect.utilities.annotations import opaque, quote
from prefect.utilities.engine import get_state_for_result

from extractors.sources import SourceError

from flows.checks import DataCheckFailed, RunAudit
from flows.locking import warehouse_lock
from flows.runners import RunnerSpec, open_task_runner, submitting_executor, unseal
from flows.stages.common import BatchResult, RunContext, SourceSpec
from flows.stages.contract import Stage, stage_names
from flows.stages.runner import (
    StageDone,
    StageRunner,
    execute_batch,
    final_errors,
    finish_stage,
    in_process,
    run_stages,
)
from radchain.settings import Settings, get_settings
from warehouse import Warehouse

__all__ = ["ALL_STAGES", "make_context", "pipeline_flow", "run_stages"]

# Every stage, in DAG order (from the tables each declares it reads and writes; flows/stages/contract.py).
ALL_STAGES = tuple(stage_names())
# Seconds per stage of the most recent pipeline flow run in this process (benchmarks read it).
LAST_STAGE_WALLS: dict[str, float] = {}


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """A failed batch is retried once, unless its stage declares the error final (the mine stage's
    circuit breaker opened: a retry would only fail again, later)."""
    return not isinstance(getattr(state, "data", None), final_errors())


def batch_run_name(result: BatchResult) -> str:
    """What a finished batch's task run is called in the UI: ``stage[batch]`` and its counts."""
    counts = f"{result.inputs} in, {result.outputs} out, {result.rejected} rejected"
    if result.skipped:
        counts += f", {result.skipped} skipped"
    return f"{result.stage}[{result.batch_id}] {counts}"


def _rename_task_run(name: str) -> None:
    """Give the current task run a name known only once it finished (its counts); never fails the batch."""
    try:
        from prefect.context import TaskRunContext

        run_ctx = TaskRunContext.get()
        if run_ctx is None:
            return
        # The engine reports the task run, name included, with its final state (Completed): renaming the run
        # it holds is enough, and costs no API call.
        run_ctx.task_run.name = name
    except Exception:  # noqa: BLE001 - a name is cosmetic
        logging.getLogger("radchain.pipeline").debug("could not rename task run to %r", name, exc_info=True)


@task(name="batch", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2, persist_result=False,
      retry_condition_fn=_worth_retrying)
def run_batch_task(stage: Stage, batch: Any) -> BatchResult:
    result = execute_batch(unseal(stage), unseal(batch))
    _rename_task_run(batch_run_name(result))
    return result


@task(name="finalize", cache_policy=NO_CACHE, persist_result=False)
def finalize_task(stage: Stage, results: list[BatchResult]) -> StageDone:
    done = finish_stage(stage, results)
    _rename_task_run(f"{stage.name}[finalize] {done.batches} batches")
    return done


def batch_task_for(stage: Stage, batch: Any) -> Any:
    """The batch task named for the UI: task ``<stage>``, task run ``<stage>[<batch>]``."""
    return run_batch_task.with_options(name=stage.name, task_run_name=f"{stage.name}[{stage.batch_id(batch)}]")


def _handle(result: Any) -> Any:
    """What a later task waits for: the state of the task run that returned ``result``, without its data.
    Prefect reads the task run id from it; the result object itself would be searched for objects other task
    runs returned too (an interned batch id such as "all", a stage name), each drawing a spurious edge."""
    found = get_state_for_result(result)
    if found is None:  # not tracked (outside a flow run): nothing to draw
        return None
    # Its data is a placeholder Prefect can resolve (the linked state holds none) and links to no task run;
    # opaque: Prefect takes the state's task run id and looks no further.
    return opaque(found[0].model_copy(update={"data": True}))


def _prefect_batch(stage: Stage, batch: Any, wait_for: Any) -> tuple[BatchResult, Any]:
    # Parameters are quoted (not searched for upstream results, for the same reason); the edges come from
    # wait_for: the finalize of the stages this one reads from.
    result = batch_task_for(stage, batch)(quote(stage), quote(batch), wait_for=_waits(wait_for))
    return result, _handle(result)


def _prefect_finalize(stage: Stage, results: list[BatchResult], wait_for: Any) -> Any:
    named = finalize_task.with_options(name=f"{stage.name}-finalize", task_run_name=f"{stage.name}[finalize]")
    return _handle(named(quote(stage), quote(results), wait_for=_waits(wait_for)))


def _waits(wait_for: Any) -> list[Any] | None:
    return [w for w in wait_for or () if w is not None] or None


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
    """Run the stages; ``options`` are stage options plus the runner's (``show_progress``, ``force``,
    ``runner``: default | dask, ``dask_address``, ``dask_workers``; see flows/runners.py)."""
    known = stage_names()
    unknown = [s for s in stages if s not in known]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; known: {', '.join(known)}")
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
        with audit, ExitStack() as stack:
            task_runner = open_task_runner(spec, stack)
            where = spec.describe() if task_runner is None or spec.kind == "dask" else type(task_runner).__name__
            if task_runner is None:
                executor = in_process(_prefect_batch)
            else:
                executor = submitting_executor(task_runner, batch_task_for)
            runner = StageRunner(ctx, executor=executor, finisher=_prefect_finalize)

            def log_stage(c: RunContext, name: str, out: list[BatchResult]) -> None:
                LAST_STAGE_WALLS[name] = runner.walls[name]
                logger.info("stage %s: %d batch results in %.2f s (%s)", name, len(out), runner.walls[name], where)

            # Work after a complete stage (its batches and finalize done, views refreshed) goes here, as a hook:
            # hook(ctx, stage name, batch results); StageRunner.after_stage runs them in order.
            runner.hooks.append(log_stage)
            # The data checks of the stage's tables (flows/checks.py); an error check stops the run.
            runner.hooks.append(lambda c, name, out: audit.after_stage(name, out))
            results = runner.run(stages)
        from flows import artifacts

        artifacts.publish_run_artifacts(ctx, results)
    return results


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # the flow function called outside a flow run
        return logging.getLogger("radchain.pipeline")
