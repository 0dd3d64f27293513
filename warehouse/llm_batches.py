"""Durable state of OpenAI Batch API jobs, so a restarted run resumes them instead of paying twice.

Each job (one uploaded JSONL file, one batch) is recorded *before* its file is uploaded, with
the ``custom_id`` of every request in it (the SHA-256 of the request body); its file id and
batch id are added the moment the API returns them. A request's answer is stored when its
job's output is downloaded. So when a run is killed at any point:

* killed before the upload finished: the job has no file id; the next run looks for the file
  by its name and for a batch whose metadata names the job, and resubmits only if there is none;
* killed while the batch ran: the next run finds the batch id and polls it;
* killed after the output was downloaded: the answers are here, and no request is sent again.

SQLite in WAL mode, like the response cache (warehouse/sqlite_file.py). Only request hashes,
ids, statuses and the answers' JSON are stored, never the API key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warehouse.sqlite_file import SQLiteFile

FILE_NAME = "llm-batches.sqlite3"
TERMINAL = frozenset({"completed", "expired", "cancelled", "failed", "abandoned"})

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS batch_jobs (
        job_key    TEXT PRIMARY KEY,
        filename   TEXT NOT NULL,
        requests   INTEGER NOT NULL,
        file_id    TEXT,
        batch_id   TEXT,
        status     TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS batch_requests (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        custom_id  TEXT NOT NULL,
        job_key    TEXT NOT NULL,
        state      TEXT NOT NULL,
        result     TEXT,
        error_code TEXT,
        status     INTEGER
    )""",
    "CREATE INDEX IF NOT EXISTS batch_requests_cid ON batch_requests (custom_id, seq)",
    "CREATE INDEX IF NOT EXISTS batch_requests_job ON batch_requests (job_key)",
]


@dataclass
class JobRecord:
    job_key: str
    filename: str
    requests: int
    file_id: str | None
    batch_id: str | None
    status: str

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


@dataclass
class RequestRecord:
    custom_id: str
    job_key: str
    state: str  # pending | done | failed
    result: str | None
    error_code: str | None
    status: int | None


class SQLiteBatchStore:
    """``location``: a folder (the file is created inside) or a file path."""

    def __init__(self, location: Path | str) -> None:
        self._db = SQLiteFile(location, FILE_NAME, _SCHEMA)
        self.path = self._db.path

    @classmethod
    def from_settings(cls, settings: object) -> "SQLiteBatchStore":
        return cls(Path(getattr(settings, "cache_dir")))

    def close(self) -> None:
        self._db.close()

    # ---- jobs ------------------------------------------------------------------------------
    def new_job(self, job_key: str, filename: str, custom_ids: list[str]) -> None:
        """Record a job and its requests (state pending) in one transaction, before anything is uploaded."""
        now = time.time()
        statements: list[tuple[str, Any]] = [(
            "INSERT INTO batch_jobs (job_key, filename, requests, status, created_at, updated_at) "
            "VALUES (?, ?, ?, 'uploading', ?, ?)", (job_key, filename, len(custom_ids), now, now))]
        statements += [("INSERT INTO batch_requests (custom_id, job_key, state) VALUES (?, ?, 'pending')",
                        (cid, job_key)) for cid in custom_ids]
        self._db.transaction(statements)

    def job(self, job_key: str) -> JobRecord | None:
        rows = self._db.execute("SELECT job_key, filename, requests, file_id, batch_id, status FROM batch_jobs "
                                "WHERE job_key = ?", (job_key,))
        return JobRecord(*rows[0]) if rows else None

    def jobs(self) -> list[JobRecord]:
        rows = self._db.execute("SELECT job_key, filename, requests, file_id, batch_id, status FROM batch_jobs "
                                "ORDER BY created_at")
        return [JobRecord(*r) for r in rows]

    def set_file(self, job_key: str, file_id: str) -> None:
        self._db.execute("UPDATE batch_jobs SET file_id = ?, status = 'uploaded', updated_at = ? WHERE job_key = ?",
                         (file_id, time.time(), job_key))

    def set_batch(self, job_key: str, batch_id: str, status: str) -> None:
        self._db.execute("UPDATE batch_jobs SET batch_id = ?, status = ?, updated_at = ? WHERE job_key = ?",
                         (batch_id, status, time.time(), job_key))

    def set_status(self, job_key: str, status: str) -> None:
        self._db.execute("UPDATE batch_jobs SET status = ?, updated_at = ? WHERE job_key = ?",
                         (status, time.time(), job_key))

    # ---- requests --------------------------------------------------------------------------
    def request(self, custom_id: str) -> RequestRecord | None:
        """The latest record of a request (a failed one may have been sent again in a later job)."""
        rows = self._db.execute("SELECT custom_id, job_key, state, result, error_code, status FROM batch_requests "
                                "WHERE custom_id = ? ORDER BY seq DESC LIMIT 1", (custom_id,))
        return RequestRecord(*rows[0]) if rows else None

    def job_requests(self, job_key: str) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT custom_id FROM batch_requests WHERE job_key = ? ORDER BY seq",
                                               (job_key,))]

    def finish_requests(self, job_key: str, outcomes: list[tuple[str, str, str | None, str | None, int | None]]) -> None:
        """(custom_id, state, result, error_code, status) of a job's requests, in one transaction, with the job's
        final status left to ``set_status``."""
        self._db.transaction([
            ("UPDATE batch_requests SET state = ?, result = ?, error_code = ?, status = ? "
             "WHERE job_key = ? AND custom_id = ?", (state, result, code, status, job_key, cid))
            for cid, state, result, code, status in outcomes
        ])

    def counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT state, count(*) FROM batch_requests GROUP BY state"))
