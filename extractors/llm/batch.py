"""Mining through the OpenAI Batch API (``--llm-mode batch``): half the price, answers within 24 h.

``BatchTransport`` plugs into ``LLMClient`` (its ``transport``): where the client would post a
chat-completions request, it hands the request body to ``submit`` and awaits the answer. The
transport collects the requests of all samples; once every mining worker is waiting on it
(each sample has made its next call), the pending requests go out as one job:

1. written as JSONL (one line per request: ``custom_id``, ``method``, ``url``, ``body``), split
   into several jobs where a file would pass ``batch_max_requests`` lines or
   ``batch_max_bytes`` bytes (the API's per-batch limits);
2. recorded in the batch store (warehouse/llm_batches.py) *before* the upload starts;
3. uploaded (``files.create(purpose="batch")``), a batch created (``batches.create`` on
   ``/v1/chat/completions``, the job's key in ``metadata``), both ids stored as soon as known;
4. polled (``batches.retrieve``) every ``batch_poll_s`` until completed, expired, cancelled or
   failed; the output file and the error file are downloaded (``files.content``);
5. each request's answer is stored and handed back to its caller; a request that failed (error
   file, a non-200 response, or left unanswered by an expired/cancelled/failed batch) raises
   ``BatchItemError``, which the client retries in a later job up to ``max_attempts``.

Refinement and repair calls a sample makes after its first answer simply become requests of
the next job. Everything after the answer (parsing, repair, verification, cache, ledger rows
with ``mode = batch`` and the batch id) is the client's and the extractor's usual path, so
the same answers give the same chains as sync mode.

``custom_id`` is the SHA-256 of the request body: the same request always has the same id, so
a restarted run finds a request already answered (its stored answer is used: it is not paid
twice) or still in a running batch (that batch is polled again, not resubmitted).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Iterable
from typing import Any

import openai
from openai import AsyncOpenAI

log = logging.getLogger("radchain.llm.batch")

ENDPOINT = "/v1/chat/completions"
METADATA_KEY = "radchain_job"
TERMINAL = ("completed", "expired", "cancelled", "failed")
# Reason codes of failed batch requests (int_llm_calls.error_code when retries run out).
BATCH_EXPIRED = "BATCH_EXPIRED"
BATCH_CANCELLED = "BATCH_CANCELLED"
BATCH_FAILED = "BATCH_FAILED"


class BatchItemError(openai.OpenAIError):
    """One request of a batch did not get an answer; ``classify`` in the client reads these attributes."""

    def __init__(self, code: str, retryable: bool, status: int | None = None, message: str = "") -> None:
        super().__init__(message or code)
        self.radchain_code = code
        self.retryable = retryable
        self.status = status


def custom_id(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def jsonl_line(cid: str, payload: bytes) -> bytes:
    """One input line; the body is the exact chat-completions request the sync path would post."""
    return b'{"custom_id":"' + cid.encode() + b'","method":"POST","url":"' + ENDPOINT.encode() + b'","body":' \
        + payload + b"}\n"


def split_jobs(lines: list[tuple[str, bytes]], max_requests: int, max_bytes: int) -> list[list[tuple[str, bytes]]]:
    """Consecutive groups of (custom_id, JSONL line) within the per-batch request and byte limits."""
    jobs: list[list[tuple[str, bytes]]] = []
    current: list[tuple[str, bytes]] = []
    size = 0
    for cid, line in lines:
        if len(line) > max_bytes:
            raise ValueError(f"one batch request is {len(line)} bytes, over the {max_bytes}-byte file limit")
        if current and (len(current) >= max_requests or size + len(line) > max_bytes):
            jobs.append(current)
            current, size = [], 0
        current.append((cid, line))
        size += len(line)
    if current:
        jobs.append(current)
    return jobs


def _error_of(record: dict[str, Any]) -> tuple[str, bool, int | None, str]:
    """(code, retryable, HTTP status, message) of a failed line of an output or error file."""
    response = record.get("response") or {}
    status = response.get("status_code") if isinstance(response, dict) else None
    error = record.get("error") or {}
    body_error = ((response.get("body") or {}).get("error") or {}) if isinstance(response, dict) else {}
    message = str(error.get("message") or body_error.get("message") or "")
    code = str(error.get("code") or "")
    if code == "batch_expired":
        return BATCH_EXPIRED, True, status, message
    if code == "batch_cancelled":
        return BATCH_CANCELLED, True, status, message
    if status == 429:
        return "RATE_LIMITED", True, status, message
    if status is not None and status >= 500:
        return "SERVER_ERROR", True, status, message
    if status in (408, 409):
        return "HTTP_4XX", True, status, message
    if status is not None and status >= 400:
        return ("AUTH_FAILED" if status in (401, 403) else "HTTP_4XX"), False, status, message
    return BATCH_FAILED, True, status, message or code


class BatchTransport:
    """See the module docstring. ``store`` is a warehouse.llm_batches.SQLiteBatchStore (or alike);
    ``api`` an AsyncOpenAI client (default: one built from ``settings``)."""

    def __init__(self, settings: Any, store: Any, *, api: AsyncOpenAI | None = None) -> None:
        self.settings = settings
        self.store = store
        self._api = api
        self._workers = 0
        self._open: set[asyncio.Future] = set()  # futures of submitted requests not answered yet
        self._pending: dict[str, bytes] = {}  # custom_id -> body, not yet in a job
        self._waiters: dict[str, list[asyncio.Future]] = {}
        self._drivers: dict[str, asyncio.Task] = {}
        self._flush_scheduled = False
        self.jobs_started = 0  # jobs this transport uploaded (resumed ones not counted)
        self.jobs_resumed = 0

    # ---- plumbing ------------------------------------------------------------------------
    @property
    def api(self) -> AsyncOpenAI:
        if self._api is None:
            s = self.settings
            secret = s.api_key.get_secret_value() if s.api_key else "EMPTY"
            # File and batch management calls are few and idempotent here: the client's own retries are fine.
            self._api = AsyncOpenAI(api_key=secret, base_url=s.base_url, timeout=max(60.0, s.timeout_s), max_retries=4)
        return self._api

    async def aclose(self) -> None:
        for task in self._drivers.values():
            task.cancel()
        for task in list(self._drivers.values()):
            try:
                await task
            except BaseException:  # noqa: BLE001 - cancelled or already failed; its waiters are gone too
                pass
        self._drivers.clear()
        if self._api is not None:
            await self._api.close()

    def add_workers(self, n: int) -> None:
        self._workers += n

    def worker_done(self) -> None:
        self._workers -= 1
        self._maybe_flush()

    # ---- requests ------------------------------------------------------------------------
    async def submit(self, payload: bytes) -> tuple[bytes, str | None]:
        """The raw chat-completion JSON answering ``payload`` and the batch id it came from."""
        cid = custom_id(payload)
        record = self.store.request(cid)
        if record is not None and record.state == "done":
            # Answered in an earlier job (perhaps by a run that was killed before using it): not sent again.
            job = self.store.job(record.job_key)
            return record.result.encode("utf-8"), (job.batch_id if job else None)
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._waiters.setdefault(cid, []).append(future)
        if record is not None and record.state == "pending":
            self._ensure_driver(record.job_key, None)  # a job of an earlier run: poll it, do not resubmit
        elif cid not in self._pending and not self._in_live_job(cid):
            self._pending[cid] = payload
        self._open.add(future)
        try:
            self._maybe_flush()
            return await future
        finally:
            self._open.discard(future)

    def _in_live_job(self, cid: str) -> bool:
        record = self.store.request(cid)
        return record is not None and record.state == "pending" and record.job_key in self._drivers

    def _maybe_flush(self) -> None:
        if not self._pending:
            return
        if self._workers > 0:
            # Every worker is waiting on an unanswered request: nothing else will arrive before some answer does.
            if len(self._open) >= self._workers:
                self._flush()
        elif not self._flush_scheduled:  # used without workers: gather what arrives in this loop iteration
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending:
            return
        lines = [(cid, jsonl_line(cid, payload)) for cid, payload in self._pending.items()]
        self._pending.clear()
        s = self.settings
        for group in split_jobs(lines, max(1, s.batch_max_requests), max(1, s.batch_max_bytes)):
            data = b"".join(line for _, line in group)
            base = key = hashlib.sha256(data).hexdigest()[:32]
            n = 0
            while (job := self.store.job(key)) is not None and job.finished:  # the same lines again (a retry)
                n += 1
                key = f"{base}-{n}"
            if job is None:
                # Recorded before the upload starts: a run killed during the upload finds it next time.
                self.store.new_job(key, f"radchain-batch-{key}.jsonl", [cid for cid, _ in group])
            self.jobs_started += 1
            self._ensure_driver(key, data)

    def _ensure_driver(self, key: str, data: bytes | None) -> None:
        if key in self._drivers:
            return
        if data is None:
            self.jobs_resumed += 1
        task = asyncio.ensure_future(self._drive(key, data))
        self._drivers[key] = task

    # ---- one job ---------------------------------------------------------------------------
    async def _drive(self, key: str, data: bytes | None) -> None:
        try:
            batch = await self._start(key, data)
            if batch is None:  # a job of a killed run that never reached the API: nothing was paid
                self.store.set_status(key, "abandoned")
                self._finish(key, [(cid, "failed", None, BATCH_FAILED, None) for cid in self.store.job_requests(key)])
                return
            batch = await self._poll(key, batch)
            await self._collect(key, batch)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a job that cannot be driven fails its requests (retried later)
            log.warning("batch job %s failed: %s", key, type(e).__name__)
            code, retryable = BATCH_FAILED, True
            if isinstance(e, openai.APIStatusError) and e.status_code in (401, 403):
                code, retryable = "AUTH_FAILED", False
            self._fail_waiters(self.store.job_requests(key), code, retryable, None)
            self.store.set_status(key, "failed")
            self._finish(key, [(cid, "failed", None, code, None) for cid in self.store.job_requests(key)],
                         notify=False)
        finally:
            self._drivers.pop(key, None)
            self._maybe_flush()

    async def _start(self, key: str, data: bytes | None) -> Any | None:
        job = self.store.job(key)
        assert job is not None
        if job.batch_id:
            return await self.api.batches.retrieve(job.batch_id)
        if data is None:  # resumed: the previous run may have created the file or even the batch
            existing = await self._find_batch(key)
            if existing is not None:
                self.store.set_batch(key, existing.id, existing.status)
                return existing
            if not job.file_id:
                file_id = await self._find_file(job.filename)
                if file_id is None:
                    return None
                self.store.set_file(key, file_id)
                job.file_id = file_id
        if not job.file_id:
            uploaded = await self.api.files.create(file=(job.filename, data, "application/jsonl"), purpose="batch")
            self.store.set_file(key, uploaded.id)
            job.file_id = uploaded.id
        batch = await self.api.batches.create(input_file_id=job.file_id, endpoint=ENDPOINT,
                                              completion_window=self.settings.batch_completion_window,
                                              metadata={METADATA_KEY: key})
        self.store.set_batch(key, batch.id, batch.status)
        log.info("batch %s created for job %s (%d requests)", batch.id, key, job.requests)
        return batch

    async def _find_batch(self, key: str) -> Any | None:
        async for batch in self.api.batches.list(limit=100):
            if (batch.metadata or {}).get(METADATA_KEY) == key and batch.status not in ("failed",):
                return batch
        return None

    async def _find_file(self, filename: str) -> str | None:
        async for f in self.api.files.list(purpose="batch"):
            if f.filename == filename:
                return f.id
        return None

    async def _poll(self, key: str, batch: Any) -> Any:
        last = batch.status
        while batch.status not in TERMINAL:
            await asyncio.sleep(self.settings.batch_poll_s)
            batch = await self.api.batches.retrieve(batch.id)
            if batch.status != last:
                self.store.set_batch(key, batch.id, batch.status)
                last = batch.status
        self.store.set_batch(key, batch.id, batch.status)
        return batch

    async def _read_lines(self, file_id: str | None) -> Iterable[dict[str, Any]]:
        if not file_id:
            return []
        content = await self.api.files.content(file_id)
        return [json.loads(line) for line in content.content.splitlines() if line.strip()]

    async def _collect(self, key: str, batch: Any) -> None:
        outcomes: dict[str, tuple[str, str, str | None, str | None, int | None]] = {}
        for record in [*await self._read_lines(batch.output_file_id), *await self._read_lines(batch.error_file_id)]:
            cid = record.get("custom_id")
            if not isinstance(cid, str):
                continue
            response = record.get("response") or {}
            if isinstance(response, dict) and response.get("status_code") == 200 and not record.get("error"):
                body = json.dumps(response.get("body") or {}, ensure_ascii=False)
                outcomes[cid] = (cid, "done", body, None, 200)
            else:
                code, _, status, _ = _error_of(record)
                outcomes.setdefault(cid, (cid, "failed", None, code, status))
        unanswered = {"expired": BATCH_EXPIRED, "cancelled": BATCH_CANCELLED}.get(batch.status, BATCH_FAILED)
        for cid in self.store.job_requests(key):
            outcomes.setdefault(cid, (cid, "failed", None, unanswered, None))
        counts = getattr(batch, "request_counts", None)
        log.info("batch %s %s: %d answered, %d failed%s", batch.id, batch.status,
                 sum(o[1] == "done" for o in outcomes.values()), sum(o[1] == "failed" for o in outcomes.values()),
                 f" (API counts {counts.completed}/{counts.failed}/{counts.total})" if counts else "")
        self._finish(key, list(outcomes.values()), batch_id=batch.id)

    def _finish(self, key: str, outcomes: list[tuple[str, str, str | None, str | None, int | None]], *,
                batch_id: str | None = None, notify: bool = True) -> None:
        self.store.finish_requests(key, outcomes)
        if not notify:
            return
        for cid, state, result, code, status in outcomes:
            waiters = self._waiters.pop(cid, [])
            for fut in waiters:
                self._open.discard(fut)  # answered now, even if its worker resumes a few loop iterations later
                if fut.done():
                    continue
                if state == "done":
                    fut.set_result((result.encode("utf-8"), batch_id))
                else:
                    retryable = _error_of({"error": {"code": {BATCH_EXPIRED: "batch_expired",
                                                              BATCH_CANCELLED: "batch_cancelled"}.get(code or "")},
                                           "response": {"status_code": status} if status else None})[1]
                    fut.set_exception(BatchItemError(code or BATCH_FAILED, retryable, status))

    def _fail_waiters(self, cids: list[str], code: str, retryable: bool, status: int | None) -> None:
        for cid in cids:
            for fut in self._waiters.pop(cid, []):
                self._open.discard(fut)
                if not fut.done():
                    fut.set_exception(BatchItemError(code, retryable, status))
