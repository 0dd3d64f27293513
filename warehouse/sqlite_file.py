"""One SQLite file in WAL mode behind one autocommit connection that threads share under a lock.

The LLM response cache and the LLM call journal both need this: rows written one at a time
while calls complete (each its own committed transaction, so a crash loses only what was in
flight), readable by another process meanwhile (WAL), and usable from the asyncio loop and
from a thread-pool task runner alike (one connection, guarded by a lock; each statement is a
sub-millisecond local operation). ``synchronous=NORMAL`` in WAL mode survives a process crash;
``fsync=True`` asks for ``FULL`` (survives a power cut too).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

_SUFFIXES = (".sqlite3", ".sqlite", ".db")


class SQLiteFile:
    """``location`` is a folder (``file_name`` is created inside) or a file path; ``schema`` holds
    the statements that create its tables and indexes (run once, so they say IF NOT EXISTS)."""

    def __init__(self, location: Path | str, file_name: str, schema: Iterable[str], *, fsync: bool = False) -> None:
        location = Path(location)
        self.path = location if location.suffix in _SUFFIXES else location / file_name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: autocommit, so every statement is its own committed transaction.
        self._con = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self._con.execute("PRAGMA busy_timeout=30000")  # another process writing: wait instead of failing
        for statement in schema:
            self._con.execute(statement)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement under the lock; its result rows (none for a write)."""
        with self._lock:
            return self._con.execute(sql, params).fetchall()

    def transaction(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Run several writes as one transaction (all or none survive a crash)."""
        with self._lock:
            self._con.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    self._con.execute(sql, params)
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
            self._con.execute("COMMIT")

    def count(self, table: str) -> int:
        return int(self.execute(f'SELECT count(*) FROM "{table}"')[0][0])

    def close(self) -> None:
        with self._lock:
            self._con.close()
