"""Who may write the warehouse, and how many LLM calls may be in flight across all workers.

``warehouse_lock`` is an exclusive ``fcntl.flock`` on ``<warehouse>/.write.lock``. Every
job that writes the warehouse (the pipeline flow; training and evaluation jobs around their
registry writes) takes it, so two processes never write one warehouse at once, whether they
were started by Prefect workers, by cron, or by two people typing ``radchain run``. The
second writer waits up to a timeout, then fails with a message naming the holder. Readers
(``radchain sql``, the duckdb CLI, notebooks) take no lock: the DuckDB file holds only
views and is opened read-only by them.

The lock is re-entrant within a process (a flow that holds it can call a subflow that asks
for it again), and the kernel drops it when the holding process dies, so a crashed run
never leaves a stale lock behind. flock is reliable on local disks; on NFS or object
storage use the Prefect deployment concurrency limits (flows/deployments.py) instead.

``llm_slots`` occupies slots of a Prefect global concurrency limit (created by
``radchain serve``) around a batch of LLM calls, so all workers together stay under one
cap. Without a Prefect server, or when the limit does not exist, it limits nothing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from warehouse import WarehouseError

LOCK_NAME = ".write.lock"
# Seconds a writer waits for another writer to finish before giving up.
DEFAULT_TIMEOUT_S = 3600.0
TIMEOUT_ENV = "RADCHAIN_LOCK_TIMEOUT_S"
# Name and size of the global concurrency limit on LLM calls (settings may override both).
LLM_LIMIT_NAME = "llm-calls"
LLM_LIMIT_SLOTS = 32

_POLL_S = 0.2


class WarehouseLocked(WarehouseError):
    """Another process is writing the warehouse and did not finish within the timeout.

    A WarehouseError, so the CLI prints it as one line (exit code 2) rather than a traceback."""


# Per-process bookkeeping: path -> [file descriptor, depth]. flock locks belong to an open
# file description, so a second open() in the same process would deadlock on itself.
_held: dict[str, list[int]] = {}
_guard = threading.RLock()


def lock_path(warehouse_dir: Path | str) -> Path:
    return Path(warehouse_dir).resolve() / LOCK_NAME


def default_timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    return DEFAULT_TIMEOUT_S


def _holder_info(purpose: str) -> dict[str, Any]:
    info: dict[str, Any] = dict(pid=os.getpid(), host=socket.gethostname(), purpose=purpose,
                                since=datetime.now(UTC).isoformat(timespec="seconds"))
    try:  # the Prefect flow run, when there is one: operators can look it up in the UI
        from prefect.runtime import flow_run

        if flow_run.get_id():
            info["flow_run"] = f"{flow_run.get_name()} ({flow_run.get_id()})"
    except Exception:  # noqa: BLE001 - the lock must work without Prefect
        pass
    return info


def read_holder(warehouse_dir: Path | str) -> dict[str, Any] | None:
    """What the current (or last) holder wrote into the lock file, if anything."""
    try:
        text = lock_path(warehouse_dir).read_text(encoding="utf-8").strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def describe_holder(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process"
    who = f"pid {info.get('pid')} on {info.get('host')}"
    if info.get("flow_run"):
        who += f", flow run {info['flow_run']}"
    return f"{who} ({info.get('purpose', 'a write')}, since {info.get('since')})"


def is_locked(warehouse_dir: Path | str) -> bool:
    """True when some process (this one included) holds the write lock right now."""
    path = lock_path(warehouse_dir)
    with _guard:
        if str(path) in _held:
            return True
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return True
        raise
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


@contextmanager
def warehouse_lock(warehouse_dir: Path | str | None = None, timeout_s: float | None = None,
                   purpose: str = "pipeline run") -> Iterator[Path]:
    """Hold the exclusive write lock of a warehouse for the duration of the block.

    ``warehouse_dir`` defaults to the settings' warehouse; ``timeout_s`` to
    ``$RADCHAIN_LOCK_TIMEOUT_S`` or one hour (0 means: fail at once if it is taken).
    Raises ``WarehouseLocked`` naming the holder when the wait runs out.
    """
    if warehouse_dir is None:
        from radchain.settings import get_settings

        warehouse_dir = get_settings().warehouse_dir
    timeout = default_timeout() if timeout_s is None else float(timeout_s)
    path = lock_path(warehouse_dir)
    key = str(path)
    with _guard:
        entry = _held.get(key)
        if entry is not None:  # re-entrant: this process already holds it
            entry[1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield path
        finally:
            with _guard:
                _held[key][1] -= 1
        return

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    deadline = time.monotonic() + max(0.0, timeout)
    announced = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                holder = describe_holder(read_holder(warehouse_dir))
                raise WarehouseLocked(
                    f"the warehouse {Path(warehouse_dir).resolve()} is being written by {holder}; "
                    f"gave up after waiting {timeout:g} s. Two runs must not write one warehouse at once: "
                    f"wait for that run to finish (or raise {TIMEOUT_ENV}), then run again."
                )
            if not announced:
                announced = True
                _log(f"waiting for the warehouse write lock held by {describe_holder(read_holder(warehouse_dir))} "
                     f"(up to {timeout:g} s)")
            time.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())) or 0.01)
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder_info(purpose)) + "\n").encode(), 0)
    except OSError:
        pass  # the information is a courtesy; the lock itself is what matters
    with _guard:
        _held[key] = [fd, 1]
    try:
        yield path
    finally:
        with _guard:
            _held.pop(key, None)
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _log(message: str) -> None:
    try:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        try:
            get_run_logger().warning(message)
            return
        except MissingContextError:
            pass
    except Exception:  # noqa: BLE001
        pass
    import logging

    logging.getLogger("radchain.locking").warning(message)


# ---- LLM calls: one cap for all workers ----------------------------------------------------
def llm_limit_name(settings: Any = None) -> str:
    llm = getattr(settings, "llm", None)
    return getattr(llm, "concurrency_limit_name", None) or LLM_LIMIT_NAME


def llm_limit_slots(settings: Any = None) -> int:
    llm = getattr(settings, "llm", None)
    return int(getattr(llm, "global_concurrency", None) or LLM_LIMIT_SLOTS)


@contextmanager
def llm_slots(n: int, settings: Any = None, timeout_s: float | None = None) -> Iterator[int]:
    """Occupy ``n`` slots (capped at the limit's size) of the global LLM-calls limit.

    Use around a batch of concurrent LLM calls, with ``n`` the batch's concurrency (e.g.
    ``min(len(items), settings.llm.max_concurrency)``). Outside a Prefect API, or when the
    limit was never created, nothing is limited (Prefect's non-strict mode).
    """
    n = max(0, min(int(n), llm_limit_slots(settings)))
    from prefect.settings import PREFECT_API_URL

    if n == 0 or not PREFECT_API_URL.value():
        # No server: the ephemeral API of a single `radchain run` has no global limit to share.
        yield n
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(llm_limit_name(settings), occupy=n, timeout_seconds=timeout_s, strict=False):
        yield n
