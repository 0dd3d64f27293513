"""Durable LLM response cache: one SQLite file, one row per request hash.

Why SQLite and not Parquet: the cache is written one answer at a time, while calls
complete, so that a crash loses only the calls still in flight; Parquet partitions are
written whole. WAL mode lets readers (another process looking at the cache) proceed while
a writer commits. ``synchronous=NORMAL`` in WAL mode survives a process crash (the
committed WAL frames are in the OS's hands); only a power cut can drop the last commits,
which would merely be asked again. Pass ``fsync=True`` for ``synchronous=FULL``.

One connection serves the whole process, guarded by a lock so that threads (a Prefect
thread-pool task runner) and the asyncio loop can share it. Each operation is a
sub-millisecond local statement, so calling it from the event loop does not stall it.

Stored per entry: hash, model, prompt and schema versions, stage, the answer text, token
counts and time. Never the request messages (report text) and never the API key, which
this module is not even given.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import datetime
from pathlib import Path

from extractors.llm.cache import CachedResponse

FILE_NAME = "llm-responses.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS llm_responses (
    request_hash      TEXT PRIMARY KEY,
    model             TEXT NOT NULL,
    prompt_version    TEXT NOT NULL,
    schema_version    TEXT,
    stage             TEXT NOT NULL,
    text              TEXT NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created_at        TEXT NOT NULL
)
"""


class SQLiteResponseCache:
    """``ResponseCache`` on SQLite. ``location`` is a folder (the file is created inside) or a file path."""

    def __init__(self, location: Path | str, *, fsync: bool = False) -> None:
        location = Path(location)
        self.path = location if location.suffix in (".sqlite3", ".sqlite", ".db") else location / FILE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: autocommit, so every put is its own committed transaction.
        self._con = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self._con.execute("PRAGMA busy_timeout=30000")  # another process writing: wait instead of failing
        self._con.execute(_SCHEMA)

    @classmethod
    def from_settings(cls, settings: object) -> "SQLiteResponseCache":
        """The cache under ``Settings.cache_dir``."""
        return cls(Path(getattr(settings, "cache_dir")))

    def get(self, request_hash: str) -> CachedResponse | None:
        with self._lock:
            row = self._con.execute(
                "SELECT request_hash, model, prompt_version, schema_version, stage, text, prompt_tokens,"
                " completion_tokens, created_at FROM llm_responses WHERE request_hash = ?",
                (request_hash,),
            ).fetchone()
        if row is None:
            return None
        return CachedResponse(*row[:8], created_at=datetime.fromisoformat(row[8]))

    def put(self, entry: CachedResponse) -> None:
        # INSERT OR REPLACE: the same request answered twice (two runs racing) keeps the newer answer.
        with self._lock:
            self._con.execute(
                "INSERT OR REPLACE INTO llm_responses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.request_hash,
                    entry.model,
                    entry.prompt_version,
                    entry.schema_version,
                    entry.stage,
                    entry.text,
                    int(entry.prompt_tokens),
                    int(entry.completion_tokens),
                    entry.created_at.isoformat(),
                ),
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._con.execute("SELECT count(*) FROM llm_responses").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __enter__(self) -> "SQLiteResponseCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# flows/stages/mine.py spells it this way; one class, two names.
SqliteResponseCache = SQLiteResponseCache
