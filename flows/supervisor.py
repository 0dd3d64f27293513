"""The process supervisor behind `radchain serve`: a Prefect server, work pools, deployments and workers
as child processes this process owns, started healthy and stopped completely.

``ServeStack`` starts, on 127.0.0.1 and as child processes in their own process groups:

1. a Prefect server (``prefect server start``) whose database lives under
   ``$RADCHAIN_HOME/prefect`` (PREFECT_HOME), and waits for its health endpoint;
2. the ``cpu`` and ``gpu`` process work pools, the global concurrency limit on LLM calls,
   and the deployments of flows/deployments.py (with their schedules);
3. one process worker per pool, and waits until each is ONLINE;

and ``stop()`` stops the workers, any flow run they started, and the server -- and nothing else.
Each child asks Linux for SIGTERM when its parent dies, so a supervisor killed outright leaves no
server or worker behind. Logs go to ``$RADCHAIN_HOME/serve/``. It is a context manager, for tests
and scripts; flows/commands/serve.py is its command line.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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


def check_loopback(host: str) -> None:
    """Refuse any address but loopback (ValueError: the CLI shows it as one line)."""
    if host not in ("127.0.0.1", "localhost"):
        # The server has no authentication: exposing it is a deliberate, separate step.
        raise ValueError(f"radchain serve binds to loopback only (got --host {host}); "
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
        check_loopback(host)
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
