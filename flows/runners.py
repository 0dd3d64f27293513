"""Where a stage's batches run: in the flow's process, one after another (the default), or fanned
out as Prefect task runs on a task runner (Dask through prefect-dask, or any runner the flow was
given with ``pipeline_flow.with_options(task_runner=...)``, such as prefect-ray's RayTaskRunner).

Stages stay in DAG order either way: every batch of a stage is submitted, all are gathered, and
only then does the stage's ``finalize`` run (in the flow's process) and the next stage start.
Batches within a stage are independent (each writes its own partitions atomically), so they may
run in any order on any worker that sees the same warehouse folder.

Options read from ``ctx.options`` (and from the ``options`` parameter of the pipeline flow):

    runner        "default" (in-process; or the flow's own task runner when it is not the
                  default thread pool) | "dask"
    dask_address  "tcp://host:8786": an existing Dask scheduler; without it, a LocalCluster
                  with one single-threaded worker process per core is started for the run
    dask_workers  worker processes of that LocalCluster (default: the machine's cores)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from flows.stages.common import BatchResult, RunContext

RUNNERS = ("default", "dask")
# Options that only make sense in the flow's process (callbacks, runner choice): never shipped.
LOCAL_OPTIONS = frozenset({"progress", "runner", "dask_address", "dask_workers", "show_progress"})


class RunnerError(ValueError):
    """A runner option that cannot work (unknown runner, a context that cannot be shipped)."""


@dataclass(frozen=True)
class RunnerSpec:
    kind: str = "default"
    address: str | None = None
    n_workers: int | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "RunnerSpec":
        options = options or {}
        kind = str(options.get("runner") or "default").strip().lower()
        if kind not in RUNNERS:
            raise RunnerError(f"unknown runner {kind!r}; choose from {', '.join(RUNNERS)}")
        address = options.get("dask_address") or None
        workers = options.get("dask_workers")
        if address and kind != "dask":
            raise RunnerError("dask_address needs runner 'dask'")
        if workers is not None:
            workers = int(workers)
            if workers < 1:
                raise RunnerError("dask_workers must be at least 1")
            if address:
                raise RunnerError("dask_workers sizes a local cluster; it cannot be combined with dask_address")
        return cls(kind=kind, address=address, n_workers=workers)

    def describe(self) -> str:
        if self.kind != "dask":
            return "in-process"
        if self.address:
            return f"dask at {self.address}"
        return f"dask LocalCluster ({self.n_workers or default_workers()} worker processes)"


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def dask_task_runner(spec: RunnerSpec) -> Any:
    """A prefect-dask DaskTaskRunner for ``spec``: an existing scheduler, or a local process cluster.

    Workers of a local cluster are pointed at the flow's own Prefect API (the temporary local one
    when no server is configured), so their task runs appear under the flow run instead of each
    worker starting an API of its own. Workers of a remote cluster need ``PREFECT_API_URL`` set
    in their own environment (bench/README.md)."""
    from prefect_dask import DaskTaskRunner

    if spec.address:
        return DaskTaskRunner(address=spec.address)
    # Worker processes log at WARNING (Dask's INFO chatter about nannies and comms would drown the
    # run's own output); their task runs' logs still reach Prefect.
    env = {"DASK_LOGGING__DISTRIBUTED": "warning"}
    api_url = current_api_url()
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs=dict(
            n_workers=spec.n_workers or default_workers(),
            threads_per_worker=1,  # the stages are CPU-bound Python: parallelism is processes
            processes=True,
            host="127.0.0.1",
            # The scheduler's HTTP server (and the dashboard, when bokeh is installed) on a free
            # loopback port: never a fixed one that another run on the machine already holds.
            dashboard_address="127.0.0.1:0",
            env=env,
        ),
    )


def current_api_url() -> str | None:
    """The Prefect API this flow run talks to (a configured server, or the temporary local one)."""
    from prefect.context import FlowRunContext

    flow_ctx = FlowRunContext.get()
    client = getattr(flow_ctx, "client", None)
    try:
        url = str(client.api_url) if client is not None else None
    except Exception:  # noqa: BLE001 - a client without a URL: workers fall back to their own settings
        return None
    return url if url and url.startswith(("http://", "https://")) else None


def open_task_runner(spec: RunnerSpec, stack: ExitStack) -> Any | None:
    """The task runner batches are submitted to, entered on ``stack``; None means in-process calls.

    runner "dask" starts (or connects to) a cluster for this run. With the default runner, a flow
    given a non-default task runner (``pipeline_flow.with_options(task_runner=RayTaskRunner(...))``)
    fans out on that runner; the plain flow keeps calling batches one after another in-process.
    """
    if spec.kind == "dask":
        import distributed  # noqa: F401 - importing it applies Dask's logging config, which is then overridden

        quiet = logging.getLogger("distributed")
        if quiet.getEffectiveLevel() < logging.WARNING:
            # Restored after the cluster is closed (the stack unwinds in reverse order).
            stack.callback(quiet.setLevel, quiet.level)
            quiet.setLevel(logging.WARNING)
        return stack.enter_context(dask_task_runner(spec))
    from prefect.context import FlowRunContext
    from prefect.task_runners import ThreadPoolTaskRunner

    flow_ctx = FlowRunContext.get()
    runner = getattr(flow_ctx, "task_runner", None)
    if runner is None or type(runner) is ThreadPoolTaskRunner:
        return None
    return runner


def worker_context(ctx: RunContext) -> RunContext:
    """A copy of ``ctx`` safe to pickle to another process: flow-local options and callables dropped."""
    options = {k: v for k, v in ctx.options.items() if k not in LOCAL_OPTIONS and not callable(v)}
    shipped = dataclasses.replace(ctx, options=options)
    try:
        import cloudpickle

        cloudpickle.dumps(shipped)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        raise RunnerError(f"the run context cannot be sent to remote workers: {e}") from e
    return shipped


class Sealed:
    """A task parameter Prefect neither searches for upstream results nor rebuilds (prefect's ``quote`` is a
    tuple that does not survive the trip to a Dask worker as one). Unwrap with ``unseal``."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __getstate__(self) -> Any:
        return self.value

    def __setstate__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def unseal(value: Any) -> Any:
    return value.value if isinstance(value, Sealed) else value


def submitting_executor(task_runner: Any, task_for: Callable[[Any, Any], Any]) -> Callable:
    """A batch executor for flows/stages/runner.py: one task run per batch submitted to ``task_runner``,
    all gathered (``task_for(stage, batch)`` is the named batch task). Returns (results, futures); the stage's
    finalize waits for the futures, so the run graph has its batch -> finalize edges.

    Every batch is waited for before a failure is raised, so batches that succeeded keep their
    partitions (a re-run rewrites them anyway) and no task is left running behind the flow.
    Remote batches cannot call back into this process: progress moves as each batch finishes.
    """
    from prefect.futures import as_completed
    from prefect.utilities.engine import collect_task_run_inputs_sync

    from flows.stages.runner import shipped

    def run(stage: Any, batches: Sequence[Any], wait_for: Sequence[Any],
            progress: Callable[[int], None] | None = None) -> tuple[list[BatchResult], list[Any]]:
        if not batches:
            return [], []
        remote = shipped(stage, worker_context(stage.ctx))
        # The upstream stages' edges, resolved here: their finalize results are linked in this process only.
        upstream = {"stage": collect_task_run_inputs_sync(list(wait_for))} if wait_for else None
        futures = [task_runner.submit(task_for(stage, b), parameters=dict(stage=Sealed(remote), batch=Sealed(b)),
                                      dependencies=upstream) for b in batches]
        units = {id(f): stage.units(b) for f, b in zip(futures, batches)}
        for f in as_completed(futures):
            if progress is not None:
                progress(units[id(f)])
        results, errors = [], []
        for f in futures:
            try:
                results.append(f.result())
            except Exception as e:  # noqa: BLE001 - gathered, then the first one is raised
                errors.append(e)
        if errors:
            raise errors[0]
        return results, futures

    return run
