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

SQLite in WAL mode, as the response cache (warehouse/sqlite_file.py): a commit survives a
process crash. Only ledger rows are stored (hashes, counts, codes), never messages or keys.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

from warehouse.sqlite_file import SQLiteFile

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
        self._db = SQLiteFile(location, FILE_NAME, [_SCHEMA, _INDEX])
        self.path = self._db.path

    @classmethod
    def from_settings(cls, settings: object) -> "SQLiteCallJournal":
        return cls(Path(getattr(settings, "cache_dir")))

    def append(self, run_id: str, batch_id: str, row: dict[str, Any]) -> None:
        self._db.execute("INSERT INTO llm_call_journal VALUES (?, ?, ?)", (run_id, batch_id, _encode(row)))

    def left_by_other_runs(self, batch_id: str, run_id: str) -> dict[str, list[dict[str, Any]]]:
        """Rows of ``batch_id`` that runs other than ``run_id`` journaled and never wrote, by run."""
        found = self._db.execute(
            "SELECT run_id, row FROM llm_call_journal WHERE batch_id = ? AND run_id <> ? ORDER BY rowid",
            (batch_id, run_id),
        )
        by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for run, text in found:
            by_run[run].append(_decode(text))
        return dict(by_run)

    def discard(self, run_id: str, batch_id: str) -> None:
        self._db.execute("DELETE FROM llm_call_journal WHERE run_id = ? AND batch_id = ?", (run_id, batch_id))

    def __len__(self) -> int:
        return self._db.count("llm_call_journal")

    def close(self) -> None:
        self._db.close()
