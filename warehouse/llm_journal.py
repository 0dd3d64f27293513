"""Durable journal of LLM calls, so the spend of a run killed mid-batch still reaches int_llm_calls.

The mine stage writes a batch's ledger rows to Parquet when the batch ends; a run killed
before that would lose the record of every call it had paid for (their answers survive in
the response cache, and the next run reads them as free cache hits). So each fresh call's
ledger row is also appended here the moment it is made, tagged with its run and batch:

* when the batch's ledger partition is written, its journal rows are discarded;
* when a later run starts the same batch, rows left by other runs (which died: the warehouse
  lock lets one run write at a time) are written to the ledger under the dead run's id, as
  partition ``<batch>--<dead run>`` (the name the dead run would have used, so a crash in
  between only writes the same file again), and then discarded.

SQLite in WAL mode with ``synchronous=NORMAL``, as the response cache: a commit survives a
process crash. Only ledger rows are stored (hashes, counts, codes), never messages or keys.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

FILE_NAME = "llm-call-journal.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS llm_call_journal (
    run_id   TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    row      TEXT NOT NULL
)
"""
_INDEX = "CREATE INDEX IF NOT EXISTS llm_call_journal_batch ON llm_call_journal (batch_id, run_id)"


def _encode(row: dict[str, Any]) -> str:
    return json.dumps({k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()})


def _decode(text: str) -> dict[str, Any]:
    row = json.loads(text)
    if isinstance(row.get("created_at"), str):
        row["created_at"] = datetime.fromisoformat(row["created_at"])
    return row


class SQLiteCallJournal:
    """``location``: a folder (the file is created inside) or a file path."""

    def __init__(self, location: Path | str) -> None:
        location = Path(location)
        self.path = location if location.suffix in (".sqlite3", ".sqlite", ".db") else location / FILE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._con = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=NORMAL")
        self._con.execute("PRAGMA busy_timeout=30000")
        self._con.execute(_SCHEMA)
        self._con.execute(_INDEX)

    @classmethod
    def from_settings(cls, settings: object) -> "SQLiteCallJournal":
        return cls(Path(getattr(settings, "cache_dir")))

    def append(self, run_id: str, batch_id: str, row: dict[str, Any]) -> None:
        with self._lock:
            self._con.execute("INSERT INTO llm_call_journal VALUES (?, ?, ?)", (run_id, batch_id, _encode(row)))

    def left_by_other_runs(self, batch_id: str, run_id: str) -> dict[str, list[dict[str, Any]]]:
        """Rows of ``batch_id`` that runs other than ``run_id`` journaled and never wrote, by run."""
        with self._lock:
            found = self._con.execute(
                "SELECT run_id, row FROM llm_call_journal WHERE batch_id = ? AND run_id <> ? ORDER BY rowid",
                (batch_id, run_id),
            ).fetchall()
        by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for run, text in found:
            by_run[run].append(_decode(text))
        return dict(by_run)

    def discard(self, run_id: str, batch_id: str) -> None:
        with self._lock:
            self._con.execute("DELETE FROM llm_call_journal WHERE run_id = ? AND batch_id = ?", (run_id, batch_id))

    def __len__(self) -> int:
        with self._lock:
            return int(self._con.execute("SELECT count(*) FROM llm_call_journal").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._con.close()
