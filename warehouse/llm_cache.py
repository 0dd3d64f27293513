"""Durable LLM response cache: one SQLite file, one row per request hash.

Why SQLite and not Parquet: the cache is written one answer at a time, while calls
complete, so that a crash loses only the calls still in flight; Parquet partitions are
written whole. WAL mode lets readers (another process looking at the cache) proceed while
a writer commits. ``synchronous=NORMAL`` in WAL mode survives a process crash (the
committed WAL frames are in the OS's hands); only a power cut can drop the last commits,
which would merely be asked again. Pass ``fsync=True`` for ``synchronous=FULL``.

One connection serves the whole process, guarded by a lock so that threads (a Prefect
thread-pool task runner) and the asyncio loop can share it (warehouse/sqlite_file.py). Each
operation is a sub-millisecond local statement, so calling it from the event loop does not
stall it.

Stored per entry: hash, model, prompt and schema versions, stage, the answer text, token
counts and time. Never the request messages (report text) and never the API key, which
this module is not even given.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from extractors.llm.cache import CachedResponse
from warehouse.sqlite_file import SQLiteFile

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
        self._db = SQLiteFile(location, FILE_NAME, [_SCHEMA], fsync=fsync)
        self.path = self._db.path

    @classmethod
    def from_settings(cls, settings: object) -> "SQLiteResponseCache":
        """The cache under ``Settings.cache_dir``."""
        return cls(Path(getattr(settings, "cache_dir")))

    def get(self, request_hash: str) -> CachedResponse | None:
        rows = self._db.execute(
            "SELECT request_hash, model, prompt_version, schema_version, stage, text, prompt_tokens,"
            " completion_tokens, created_at FROM llm_responses WHERE request_hash = ?",
            (request_hash,),
        )
        if not rows:
            return None
        row = rows[0]
        return CachedResponse(*row[:8], created_at=datetime.fromisoformat(row[8]))

    def put(self, entry: CachedResponse) -> None:
        # INSERT OR REPLACE: the same request answered twice (two runs racing) keeps the newer answer.
        self._db.execute(
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
        return self._db.count("llm_responses")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "SQLiteResponseCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# flows/stages/mine.py spells it this way; one class, two names.
SqliteResponseCache = SQLiteResponseCache
