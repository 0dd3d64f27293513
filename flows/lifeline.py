"""Children of a CLI process die with it, even when it is SIGKILLed.

`radchain run` starts child processes it does not spawn itself: Prefect's temporary API server
(``python -m uvicorn ...``, started by ``prefect.server.api.server.SubprocessASGIServer`` when no
``PREFECT_API_URL`` is set) and, with ``--runner dask``, a local Dask cluster. Prefect stops its
server from an ``atexit`` handler, which never runs when the process is killed with SIGKILL (or by
the OOM killer), so the server used to outlive the run.

``start_reaper()`` starts one small watchdog process (its own session, so a signal to the run's
process group does not reach it) that records the run's descendants every ``interval_s`` and,
once the run is gone, terminates the ones it recorded (SIGTERM, then SIGKILL after a grace period)
and exits. ``psutil.Process.is_running`` compares creation times, so a recycled pid is never
signalled. On a normal exit the children are already stopped and the watchdog just exits.

No flow code changes: a process with a reused Prefect server (``PREFECT_API_URL``) has no such
children, and the watchdog then only waits.
"""

from __future__ import annotations

import os
import subprocess
import sys

# The watchdog, run with `python -c`: it needs only psutil (no project import path).
_REAPER = r"""
import os, sys, time
import psutil

parent = psutil.Process(int(sys.argv[1]))
interval, grace = float(sys.argv[2]), float(sys.argv[3])
me = os.getpid()
known = {}
while True:
    try:
        alive = parent.is_running() and parent.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        alive = False
    if not alive:
        break
    try:
        known = {p.pid: p for p in parent.children(recursive=True) if p.pid != me}
    except psutil.Error:
        pass
    time.sleep(interval)
left = [p for p in known.values() if p.is_running()]
for p in left:
    try:
        p.terminate()
    except psutil.Error:
        pass
_, still = psutil.wait_procs(left, timeout=grace)
for p in still:
    try:
        p.kill()
    except psutil.Error:
        pass
"""

_STARTED: subprocess.Popen | None = None


def start_reaper(interval_s: float = 0.5, grace_s: float = 5.0) -> subprocess.Popen | None:
    """Start the watchdog for this process once (later calls return the same one); None where it cannot
    run (no psutil)."""
    global _STARTED
    if _STARTED is not None and _STARTED.poll() is None:
        return _STARTED
    try:
        import psutil  # noqa: F401  (the watchdog imports it too)
    except ImportError:
        return None
    _STARTED = subprocess.Popen(
        [sys.executable, "-c", _REAPER, str(os.getpid()), str(interval_s), str(grace_s)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )
    return _STARTED
