"""`radchain serve`, `radchain deploy`, `radchain status`: the Prefect UI, workers and deployments.

``radchain serve`` starts, on 127.0.0.1 and as child processes in their own process groups:

1. a Prefect server (``prefect server start``) whose database lives under
   ``$RADCHAIN_HOME/prefect`` (PREFECT_HOME);
2. the ``cpu`` and ``gpu`` process work pools, the global concurrency limit on LLM calls,
   and the deployments of flows/deployments.py (with their schedules);
3. one process worker per pool;

prints the UI URL and runs until Ctrl-C or SIGTERM, then stops the workers, any flow run
they started, and the server — and nothing else. Logs go to ``$RADCHAIN_HOME/serve/``.

``ServeStack`` is the same machinery as a context manager, for tests and scripts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import typer

from flows.cli_support import UsageError, clear_errors, console, err_console, print_arrow

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200
STATE_FILE = "serve.json"


class ServeError(RuntimeError):
    """The server or a worker could not be started (message says why, logs say more)."""


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_dir(settings) -> Path:
    return settings.home / "serve"


def read_state(settings) -> dict[str, Any] | None:
    path = serve_dir(settings) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _check_loopback(host: str) -> None:
    if host not in ("127.0.0.1", "localhost"):
        # The server has no authentication: exposing it is a deliberate, separate step.
        raise UsageError(f"radchain serve binds to loopback only (got --host {host}); "
                         "put an authenticating proxy in front of it to reach it from elsewhere")


class ServeStack:
    """A Prefect server, work pools, deployments and workers, owned by this process.

    Every child is started with ``start_new_session=True`` so that stopping signals its own
    process group only; flow runs a worker started (in groups of their own) are found as
    descendants of our children and stopped too.
    """

    def __init__(
        self,
        settings,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        pools: Sequence[str] = ("cpu", "gpu"),
        env: dict[str, str] | None = None,
        worker_poll_s: float | None = None,
    ) -> None:
        _check_loopback(host)
        self.settings = settings
        self.host = host
        self.port = port or pick_free_port(host)
        self.pools = list(pools)
        self.extra_env = dict(env or {})
        self.worker_poll_s = worker_poll_s
        self.log_dir = serve_dir(settings)
        self.server: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.setup_result: dict[str, Any] | None = None
        self._logs: list[Any] = []

    # ---- addresses -----------------------------------------------------------------------
    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.ui_url}/api"

    @contextmanager
    def api(self) -> Iterator[None]:
        """Point this process's Prefect client at the server (get_client, run_deployment ...)."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            yield

    # ---- children ------------------------------------------------------------------------
    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PREFECT_HOME=str(self.settings.prefect_home),
            RADCHAIN_HOME=str(self.settings.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DO_NOT_TRACK="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        return env

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab", buffering=0)  # noqa: SIM115 - closed in stop()
        log.write(f"\n--- {datetime.now(UTC).isoformat()} {' '.join(args)}\n".encode())
        self._logs.append(log)
        return subprocess.Popen(_with_parent_death_signal(args), env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=str(self.settings.home), start_new_session=True)

    def log_tail(self, name: str, n: int = 30) -> str:
        try:
            lines = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def start_server(self, timeout_s: float = 180.0) -> None:
        if not port_free(self.host, self.port):
            raise ServeError(f"port {self.port} on {self.host} is in use (another `radchain serve` or Prefect "
                             "server?); stop it or pass --port")
        self.settings.prefect_home.mkdir(parents=True, exist_ok=True)
        env = self._base_env()
        env.pop("PREFECT_API_URL", None)
        env.pop("PREFECT_API_KEY", None)
        # The UI is told where its API is; without this it assumes the default port 4200.
        env.update(PREFECT_SERVER_API_HOST=self.host, PREFECT_SERVER_API_PORT=str(self.port),
                   PREFECT_UI_API_URL=self.api_url)
        self.server = self._spawn("server", [sys.executable, "-m", "prefect", "server", "start", "--host", self.host,
                                             "--port", str(self.port)], env)
        self.wait_healthy(timeout_s)

    def wait_healthy(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.server is not None and self.server.poll() is not None:
                raise ServeError(f"the Prefect server exited with code {self.server.returncode}:\n"
                                 f"{self.log_tail('server')}")
            try:
                r = httpx.get(f"{self.api_url}/health", timeout=2.0, trust_env=False)  # loopback: no proxy
                if r.status_code == 200 and r.json() is True:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise ServeError(f"the Prefect server did not answer {self.api_url}/health within {timeout_s:g} s:\n"
                         f"{self.log_tail('server')}")

    def setup(self, specs=None, code_source: Path | str | None = None, schedules_active: bool = True,
              collision: str = "enqueue") -> dict[str, Any]:
        from flows.deployments import REPO_DIR, deployment_specs, setup_server

        specs = specs or deployment_specs(source=self.settings.demo_corpus_dir)
        with self.api():
            self.setup_result = setup_server(specs, code_source or REPO_DIR, schedules_active, collision,
                                             self.settings)
        return self.setup_result

    def start_workers(self, timeout_s: float = 120.0) -> None:
        env = self._base_env()
        env["PREFECT_API_URL"] = self.api_url
        if self.worker_poll_s is not None:
            env["PREFECT_WORKER_QUERY_SECONDS"] = str(self.worker_poll_s)
            env["PREFECT_WORKER_HEARTBEAT_SECONDS"] = str(max(self.worker_poll_s, 5))
        host = socket.gethostname()
        for pool in self.pools:
            self.workers[pool] = self._spawn(
                f"worker-{pool}",
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
                 "--name", f"radchain-{pool}-{host}", "--install-policy", "never"],
                env,
            )
        self.wait_workers_online(timeout_s)

    def wait_workers_online(self, timeout_s: float) -> None:
        from prefect import get_client
        from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

        deadline = time.monotonic() + timeout_s
        waiting = set(self.pools)
        with self.api(), get_client(sync_client=True) as client:
            while waiting and time.monotonic() < deadline:
                for pool in list(waiting):
                    proc = self.workers[pool]
                    if proc.poll() is not None:
                        raise ServeError(f"the {pool} worker exited with code {proc.returncode}:\n"
                                         f"{self.log_tail(f'worker-{pool}')}")
                    online = client.read_workers_for_work_pool(
                        pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"])))
                    if online:
                        waiting.discard(pool)
                if waiting:
                    time.sleep(0.5)
        if waiting:
            raise ServeError(f"no worker came online for pool(s) {', '.join(sorted(waiting))} within {timeout_s:g} s")

    def start(self, specs=None, code_source: Path | str | None = None, schedules_active: bool = True,
              collision: str = "enqueue", workers: bool = True) -> ServeStack:
        try:
            self.start_server()
            self.setup(specs, code_source, schedules_active, collision)
            if workers:
                self.start_workers()
            self.write_state()
        except BaseException:
            self.stop()
            raise
        return self

    def write_state(self) -> None:
        state = dict(ui_url=self.ui_url, api_url=self.api_url, pid=os.getpid(),
                     server_pid=self.server.pid if self.server else None,
                     workers={p: w.pid for p, w in self.workers.items()},
                     started_at=datetime.now(UTC).isoformat(timespec="seconds"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.log_dir / STATE_FILE).write_text(json.dumps(state, indent=2))

    def dead_children(self) -> list[str]:
        dead = []
        if self.server is not None and self.server.poll() is not None:
            dead.append(f"server (exit {self.server.returncode})")
        dead += [f"{p} worker (exit {w.returncode})" for p, w in self.workers.items() if w.poll() is not None]
        return dead

    # ---- stopping ------------------------------------------------------------------------
    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop workers (and flow runs they started), then the server. Idempotent."""
        import psutil

        procs = [*self.workers.values(), *([self.server] if self.server else [])]
        descendants: list[psutil.Process] = []
        for p in procs:
            if p.poll() is None:
                try:
                    descendants += psutil.Process(p.pid).children(recursive=True)
                except psutil.NoSuchProcess:
                    pass
        # Workers first, so no new flow run starts while the server goes down.
        for group in (list(self.workers.values()), [self.server] if self.server else []):
            for p in group:
                _signal_group(p, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            for p in group:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _signal_group(p, signal.SIGKILL)
                    p.wait(5)
        # Flow runs live in process groups of their own: stop those that outlived their worker.
        alive = [d for d in descendants if d.is_running()]
        for d in alive:
            try:
                d.terminate()
            except psutil.NoSuchProcess:
                pass
        _, still = psutil.wait_procs(alive, timeout=5)
        for d in still:
            try:
                d.kill()
            except psutil.NoSuchProcess:
                pass
        for log in self._logs:
            log.close()
        self._logs.clear()
        state = self.log_dir / STATE_FILE
        try:
            if json.loads(state.read_text()).get("pid") == os.getpid():
                state.unlink()
        except (OSError, ValueError):
            pass
        self.workers.clear()
        self.server = None

    def __enter__(self) -> ServeStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Run in the child before it execs the real command: ask Linux for SIGTERM when the parent dies, so
# a serve process killed outright (SIGKILL) leaves no server or worker behind. (An exec wrapper
# rather than preexec_fn, which is unsafe in a process with threads.)
_PDEATHSIG = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"  # PR_SET_PDEATHSIG
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"  # the parent died before prctl
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _with_parent_death_signal(args: list[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return args
    return [sys.executable, "-c", _PDEATHSIG, str(os.getpid()), *args]


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)  # its own group (start_new_session): never ours
    except ProcessLookupError:
        pass


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
        _check_loopback(host)
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
            console.print(f"starting the Prefect server on {stack.ui_url} (logs: {stack.log_dir}) ...")
            try:
                stack.start(specs, code_source=code_source, schedules_active=schedules, collision=collision,
                            workers=bool(pools))
            except ServeError as e:
                raise UsageError(str(e)) from e
            import pyarrow as pa

            print_arrow(pa.Table.from_pylist(schedule_rows(specs)), "table", title="deployments")
            name, slots = stack.setup_result["llm_limit"]
            console.print(f"global concurrency limit [bold]{name}[/]: {slots} slots")
            console.print(f"workers: {', '.join(pools) or 'none'}  ·  warehouse: {settings.warehouse_dir}")
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
