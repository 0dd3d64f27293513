"""`radchain serve`, `radchain deploy`, `radchain status`: the Prefect UI, workers and deployments.

``radchain serve`` runs a ``flows.supervisor.ServeStack`` (a Prefect server on 127.0.0.1, the
``cpu``/``gpu`` work pools, the LLM concurrency limit, the deployments of flows/deployments.py and
one worker per pool, all child processes of this one), prints the UI URL and runs until Ctrl-C or
SIGTERM, then stops the workers, any flow run they started, and the server -- and nothing else.
Logs go to ``$RADCHAIN_HOME/serve/``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from flows.cli_support import UsageError, clear_errors, console, err_console, print_arrow
from flows.supervisor import DEFAULT_HOST, DEFAULT_PORT, ServeError, ServeStack, check_loopback, read_state


# ---- status ------------------------------------------------------------------------------------
def _artifact_rows(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except ValueError:
            return []
    return data if isinstance(data, list) else []


def summarize_stage_counts(rows: list[dict[str, Any]]) -> str:
    parts = []
    for r in rows:
        text = f"{r.get('stage')} {r.get('inputs')}→{r.get('outputs')}"
        if r.get("rejected"):
            text += f" ({r['rejected']} rej)"
        parts.append(text)
    return ", ".join(parts)


def recent_runs(limit: int = 10) -> list[dict[str, Any]]:
    """The last flow runs (newest first) with state, timing and the stage-count artifact."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        FlowFilter,
        FlowFilterId,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    now = datetime.now(UTC)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(expected_start_time=FlowRunFilterExpectedStartTime(before_=now)),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=limit,
        )
        if not runs:
            return []
        flows = {f.id: f.name for f in client.read_flows(
            flow_filter=FlowFilter(id=FlowFilterId(any_=list({r.flow_id for r in runs}))))}
        deployments: dict[Any, str] = {}
        for dep_id in {r.deployment_id for r in runs if r.deployment_id}:
            try:
                deployments[dep_id] = client.read_deployment(dep_id).name
            except Exception:  # noqa: BLE001 - a deleted deployment
                deployments[dep_id] = "?"
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[r.id for r in runs]),
            key=ArtifactFilterKey(any_=["stage-counts"])))
    counts = {a.flow_run_id: _artifact_rows(a.data) for a in artifacts}
    out = []
    for r in runs:
        start = r.start_time
        if r.end_time and start:
            duration = r.end_time - start
        elif start and r.state and r.state.is_running():
            duration = now - start
        else:
            duration = None
        out.append(dict(
            flow=flows.get(r.flow_id, "?"), deployment=deployments.get(r.deployment_id, ""), run=r.name,
            state=r.state.name if r.state else "?",
            start=_fmt_time(start or r.expected_start_time),
            duration=_fmt_duration(duration), stages=summarize_stage_counts(counts.get(r.id, [])),
            id=str(r.id),
        ))
    return out


def _fmt_time(t: datetime | None) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if t else ""


def _fmt_duration(d: timedelta | None) -> str:
    if d is None:
        return ""
    s = int(d.total_seconds())
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def resolve_api_url(settings, api_url: str | None) -> str:
    if api_url:
        return api_url
    from prefect.settings import PREFECT_API_URL

    configured = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if configured:
        return configured
    state = read_state(settings)
    if state and state.get("api_url"):
        return state["api_url"]
    raise UsageError("no Prefect server to ask: start one with `radchain serve`, or set PREFECT_API_URL")


@contextmanager
def _api(url: str) -> Iterator[None]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


def _server_up(api_url: str) -> bool:
    import httpx

    try:
        loopback = any(h in api_url for h in ("//127.0.0.1", "//localhost"))
        return httpx.get(f"{api_url}/health", timeout=3.0, trust_env=not loopback).status_code == 200
    except httpx.HTTPError:
        return False


# ---- CLI ----------------------------------------------------------------------------------------
def register(app: typer.Typer) -> None:
    @app.command()
    @clear_errors
    def serve(
        port: int = typer.Option(DEFAULT_PORT, help="port of the UI and API on 127.0.0.1 (0: any free port)"),
        host: str = typer.Option(DEFAULT_HOST, help="loopback address to bind"),
        source: Path | None = typer.Option(None, help="report source of the nightly `mine` run "
                                                       "(default: the synthetic demo corpus, generated if absent)"),
        demo_studies: int = typer.Option(400, help="size of the demo corpus when --source is absent"),
        train_config: str = typer.Option("tiny-cpu", help="training recipe (configs/<name>.yaml or a path) of the "
                                                          "train, sft and grpo deployments"),
        extractor: str = typer.Option("auto", help="chain extractor of the `mine` deployment: rules | llm | auto"),
        code_source: str | None = typer.Option(None, help="where workers get the code: this checkout (default) "
                                                          "or a git URL"),
        schedules: bool = typer.Option(True, "--schedules/--no-schedules", help="activate the cron schedules"),
        collision: str = typer.Option("enqueue", help="a second run of a busy deployment: enqueue | cancel"),
        workers: str = typer.Option("cpu,gpu", help="pools to start a local worker for ('' for none)"),
    ) -> None:
        """Start the Prefect server and UI, the cpu/gpu work pools, workers and deployments; Ctrl-C stops."""
        from radchain.runtime import prepare_environment

        settings = prepare_environment()
        check_loopback(host)
        if extractor not in ("auto", "rules", "llm"):
            raise UsageError("--extractor must be rules, llm or auto")
        if collision not in ("enqueue", "cancel"):
            raise UsageError("--collision must be enqueue or cancel")
        if source is None:
            from flows.commands.run import ensure_demo_corpus

            source = ensure_demo_corpus(settings.demo_corpus_dir, demo_studies, settings.seed)
        elif not source.exists():
            raise UsageError(f"source {source} does not exist")
        pools = [p.strip() for p in workers.split(",") if p.strip()]
        unknown = [p for p in pools if p not in ("cpu", "gpu")]
        if unknown:
            raise UsageError(f"unknown pools {unknown}: radchain has cpu and gpu")

        from flows.deployments import deployment_specs, schedule_rows

        specs = deployment_specs(source=source, train_config=train_config, extractor=extractor)
        stack = ServeStack(settings, host=host, port=port, pools=pools)
        stop = threading.Event()

        def on_signal(signum, frame):  # noqa: ARG001
            stop.set()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            console.print(f"starting the Prefect server on {stack.ui_url} (logs: {escape(str(stack.log_dir))}) ...")
            try:
                stack.start(specs, code_source=code_source, schedules_active=schedules, collision=collision,
                            workers=bool(pools))
            except ServeError as e:
                raise UsageError(str(e)) from e
            import pyarrow as pa

            print_arrow(pa.Table.from_pylist(schedule_rows(specs)), "table", title="deployments")
            name, slots = stack.setup_result["llm_limit"]
            console.print(f"global concurrency limit [bold]{name}[/]: {slots} slots")
            console.print(f"workers: {', '.join(pools) or 'none'}  ·  warehouse: {escape(str(settings.warehouse_dir))}")
            console.print(f"\n[bold green]Prefect UI:[/] {stack.ui_url}\n"
                          f"API: {stack.api_url}  (export PREFECT_API_URL={stack.api_url} to use it from a shell)\n"
                          f"Run the pipeline now: PREFECT_API_URL={stack.api_url} prefect deployment run "
                          f"radchain-pipeline/mine\nCtrl-C stops everything.", highlight=False, soft_wrap=True)
            while not stop.wait(1.0):
                dead = stack.dead_children()
                if dead:
                    err_console.print(f"[bold red]error:[/] {', '.join(dead)} stopped; shutting down "
                                      f"(logs in {stack.log_dir})")
                    raise typer.Exit(1)
        finally:
            console.print("stopping workers and server ...")
            stack.stop()
            for s, h in old.items():
                signal.signal(s, h)
            console.print("stopped.")

    @app.command()
    @clear_errors
    def deploy(
        source: Path | None = typer.Option(None, help="report source of the nightly `mine` run"),
        train_config: str = typer.Option("tiny-cpu", help="training recipe of train/sft/grpo"),
        extractor: str = typer.Option("auto", help="chain extractor of `mine`: rules | llm | auto"),
        code_source: str | None = typer.Option(None, help="this checkout (default) or a git URL"),
        schedules: bool = typer.Option(True, "--schedules/--no-schedules", help="activate the cron schedules"),
        collision: str = typer.Option("enqueue", help="enqueue | cancel"),
        api_url: str | None = typer.Option(None, help="Prefect API (default: PREFECT_API_URL or `radchain serve`)"),
    ) -> None:
        """Create or update the work pools, LLM limit and deployments on a running Prefect server."""
        from radchain.runtime import prepare_environment

        settings = prepare_environment()
        url = resolve_api_url(settings, api_url)
        if not _server_up(url):
            raise UsageError(f"no Prefect server answers at {url}")
        if source is None:
            from flows.commands.run import ensure_demo_corpus

            source = ensure_demo_corpus(settings.demo_corpus_dir, 400, settings.seed)
        from flows.deployments import REPO_DIR, deployment_specs, schedule_rows, setup_server

        specs = deployment_specs(source=source, train_config=train_config, extractor=extractor)
        with _api(url):
            result = setup_server(specs, code_source or REPO_DIR, schedules, collision, settings)
        import pyarrow as pa

        print_arrow(pa.Table.from_pylist(schedule_rows(specs)), "table", title=f"deployments on {url}")
        if result["pools_created"]:
            console.print(f"created work pools: {', '.join(result['pools_created'])}")

    @app.command()
    @clear_errors
    def status(
        limit: int = typer.Option(10, help="how many runs"),
        api_url: str | None = typer.Option(None, help="Prefect API (default: PREFECT_API_URL or `radchain serve`)"),
        format: str = typer.Option("table", "--format", "-f", help="table | csv | json"),
    ) -> None:
        """The last flow runs: flow, state, start, duration and per-stage counts."""
        from radchain.runtime import prepare_environment

        settings = prepare_environment()
        url = resolve_api_url(settings, api_url)
        if not _server_up(url):
            raise UsageError(f"no Prefect server answers at {url}; start one with `radchain serve`")
        with _api(url):
            rows = recent_runs(limit)
        import pyarrow as pa

        cols = ["flow", "deployment", "run", "state", "start", "duration", "stages"]
        if not rows:
            console.print(f"no flow runs yet on {url}")
            return
        table = pa.Table.from_pylist([{c: r[c] for c in cols + (["id"] if format != "table" else [])} for r in rows])
        print_arrow(table, format, title=f"last runs on {url}")
