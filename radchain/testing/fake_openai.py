"""A fake OpenAI-compatible chat server. TEST AND BENCHMARK INFRASTRUCTURE ONLY.

It is never used by the pipeline itself: it exists so that the LLM layer (retries,
throttling, structured output, caching, the chain-mining protocols) can be exercised
for real, over HTTP, on a machine with no model and no network. Nothing here is a model.

``FakeOpenAIServer`` runs a real HTTP server (uvicorn + starlette) on 127.0.0.1 at an
ephemeral port, in a background thread with its own event loop, and speaks

* ``POST /v1/chat/completions`` -> a ``chat.completion`` object with ``usage`` counts
  (about 4 characters per token), the content produced by a pluggable
  ``responder(request_body) -> str``;
* ``GET /v1/models`` -> the one model it pretends to serve;
* the Batch API: ``POST /v1/files`` (multipart upload, ``purpose=batch``), ``GET /v1/files``,
  ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``; ``POST /v1/batches``, ``GET /v1/batches``,
  ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``, with OpenAI's object shapes. A batch
  goes validating -> in_progress -> finalizing -> completed over ``batch_delay_s``; each input line
  is answered by the same code as a chat request (responder, content faults, cached tokens) into
  the output file as ``{"id", "custom_id", "response": {"status_code", "request_id", "body"},
  "error": null}``; a line drawn to fail (``batch_failure_rate``, seeded like ``faults``) goes to
  the error file with a 500 response; ``expire_batches = n`` makes the next n batches expire
  after answering half their lines (the rest: error ``batch_expired``, as the real API reports).

Knobs, for tests and benchmarks:

* ``latency_s``: time spent "generating" each answer (asyncio sleep: costs no CPU, so
  32+ concurrent requests at 100 ms are served in parallel);
* ``max_concurrency``: requests beyond it queue, like a saturated inference server;
* ``faults``: probability per request of each fault in ``FAULT_KINDS`` (drawn with an RNG
  seeded from ``seed``, the request body and how often that body was seen before, so a
  run's faults do not depend on the order concurrent requests happen to arrive);
  ``enqueue_faults(...)`` scripts the exact faults of the next requests instead;
* ``reject_json_schema``: answer 400 to ``response_format: json_schema`` (a server with
  JSON mode only), to exercise the client's fallback;
* ``api_key``: when set, requests without ``Authorization: Bearer <api_key>`` get 401;
* ``prompt_caching`` (on by default): automatic prompt caching as OpenAI documents it: a prompt
  of at least ``cache_min_tokens`` (1,024) tokens whose first 1,024 + k*128 tokens were already
  seen in an earlier request reports them as ``usage.prompt_tokens_details.cached_tokens``
  (tokens here are 4 characters of the messages' contents, as ``prompt_tokens``).

Fault kinds: ``rate_limit`` (429 with ``Retry-After``), ``server_error`` (500),
``timeout`` (sleeps ``timeout_sleep_s``, past the client's timeout, then answers),
``malformed_json`` (content that is not JSON), ``schema_invalid`` (JSON that breaks the
chain schema), ``ungrounded`` (a valid chain whose evidence quotes are not in the report),
``contradiction`` (a valid chain whose finding statuses are flipped and whose conclusion
denies the answer), ``off_topic`` (each observation step quotes a report sentence about another
finding: in the report, but not evidence for the step). Content faults apply to requests that ask for JSON only.

Counters (``requests``, ``statuses``, ``faults``, ``max_in_flight``, ``served_s``: the sum of
the time from receiving each request to finishing its answer) and ``bodies`` (every
request body received, parsed) are there for assertions, e.g. that a given text never
reached the server. Request headers are not recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

Responder = Callable[[dict[str, Any]], str]

HTTP_FAULTS = ("rate_limit", "server_error", "timeout")
CONTENT_FAULTS = ("malformed_json", "schema_invalid", "ungrounded", "contradiction", "off_topic")
FAULT_KINDS = HTTP_FAULTS + CONTENT_FAULTS

UNGROUNDED_QUOTE = "a fabricated observation that this report never mentions"
_FENCED = re.compile(r"^(`{3,})[^\n]*\n(.*?)\n\1[ \t]*$", re.DOTALL | re.MULTILINE)


# ---- responders ----------------------------------------------------------------------------
def fenced_blocks(text: str) -> list[str]:
    """Contents of the fenced blocks (``` or longer fences) in a message, in order."""
    return [m.group(2) for m in _FENCED.finditer(text)]


def last_user_text(body: Mapping[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return message["content"]
    return ""


def wants_json(body: Mapping[str, Any]) -> bool:
    fmt = body.get("response_format") or {}
    return fmt.get("type") in ("json_schema", "json_object")


def default_responder(body: dict[str, Any]) -> str:
    """A minimal answer: a two-step ReasoningChain when JSON is asked for, a one-line plan otherwise.

    The observation step quotes the first non-empty line of the first fenced block of the
    first user message that has one (the report, in radchain's prompts), so its evidence is
    grounded.
    """
    if not wants_json(body):
        return "Plan: look at each finding named in the question, then answer."
    quote = None
    for message in body.get("messages") or []:
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            for block in fenced_blocks(message["content"]):
                lines = [ln.strip() for ln in block.splitlines() if ln.strip()]
                if lines:
                    quote = lines[0]
                    break
        if quote:
            break
    steps: list[dict[str, Any]] = [
        {
            "kind": "observation",
            "text": quote or "The image is reviewed.",
            "findings": [],
            "evidence": [{"quote": quote, "start": None, "end": None}] if quote else [],
        },
        {"kind": "conclusion", "text": "The answer follows from these observations.", "findings": [], "evidence": []},
    ]
    return json.dumps({"steps": steps})


def _make_ungrounded(content: str) -> str:
    chain = json.loads(content)
    steps = chain.get("steps") or []
    quoted = False
    for step in steps:
        for ev in step.get("evidence") or []:
            ev["quote"] = UNGROUNDED_QUOTE
            quoted = True
    if not quoted and steps:
        steps[0].setdefault("evidence", []).append({"quote": UNGROUNDED_QUOTE, "start": None, "end": None})
    return json.dumps(chain)


def _make_off_topic(content: str, body: Mapping[str, Any]) -> str:
    """Each observation step quotes, instead of its own evidence, a report sentence that names
    another finding (a step for which the report has none is left as it is)."""
    from extractors.mentions import find_mentions

    report = next((b for m in body.get("messages") or [] if m.get("role") == "user"
                   and isinstance(m.get("content"), str) for b in fenced_blocks(m["content"])), "")
    sentences = [(m.observation, m.sentence.strip()) for m in find_mentions(report)]
    chain = json.loads(content)
    for step in chain.get("steps") or []:
        if step.get("kind") != "observation":
            continue
        own = {str(f.get("observation")) for f in step.get("findings") or []}
        other = next((sentence for name, sentence in sentences if name not in own and sentence), None)
        if other is not None:
            step["evidence"] = [{"quote": other, "start": None, "end": None}]
    return json.dumps(chain)


def _make_contradiction(content: str) -> str:
    chain = json.loads(content)
    flip = {"present": "absent", "absent": "present"}
    for step in chain.get("steps") or []:
        for finding in step.get("findings") or []:
            finding["status"] = flip.get(finding.get("status"), finding.get("status"))
        if step.get("kind") == "conclusion":
            step["text"] = "Therefore the given answer is wrong, and none of these findings is present."
    return json.dumps(chain)


# ---- the server ----------------------------------------------------------------------------
class FakeOpenAIServer:
    def __init__(
        self,
        *,
        responder: Responder | None = None,
        model: str = "fake-model",
        latency_s: float = 0.0,
        max_concurrency: int | None = None,
        faults: Mapping[str, float] | None = None,
        seed: int = 0,
        retry_after_s: float = 1.0,
        timeout_sleep_s: float = 5.0,
        reject_json_schema: bool = False,
        api_key: str | None = None,
        prompt_caching: bool = True,
        cache_min_tokens: int = 1024,
        cache_block_tokens: int = 128,
        batch_delay_s: float = 0.2,
        batch_failure_rate: float = 0.0,
        expire_batches: int = 0,
    ) -> None:
        unknown = set(faults or {}) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        self.responder: Responder = responder or default_responder
        self.model = model
        self.latency_s = latency_s
        self.max_concurrency = max_concurrency
        self.faults: dict[str, float] = dict(faults or {})
        self.seed = seed
        self.retry_after_s = retry_after_s
        self.timeout_sleep_s = timeout_sleep_s
        self.reject_json_schema = reject_json_schema
        self.api_key = api_key
        self.prompt_caching = prompt_caching
        self.cache_min_tokens = cache_min_tokens
        self.cache_block_tokens = cache_block_tokens
        self._prefixes: set[bytes] = set()  # digests of prompt prefixes seen (at cacheable lengths)
        self.cached_tokens_served = 0
        # Batch API state and counters.
        self.batch_delay_s = batch_delay_s
        self.batch_failure_rate = batch_failure_rate
        self.expire_batches = expire_batches
        self.files: dict[str, dict[str, Any]] = {}  # id -> FileObject fields + "_content"
        self.batches: dict[str, dict[str, Any]] = {}  # id -> Batch object
        self.batch_executions: Counter[str] = Counter()  # custom_id -> lines answered 200 (paid)
        self.batch_lines_failed = 0
        self.batches_expired = 0
        self._batch_tasks: set[asyncio.Task] = set()

        self._lock = threading.Lock()
        self._scripted: deque[str] = deque()
        self._seen: Counter[str] = Counter()
        self.requests = 0  # chat completion requests received
        self.model_requests = 0
        self.statuses: Counter[int] = Counter()
        self.faults_served: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        # time.monotonic() of the first request received and the last answer finished since the
        # last reset (CLOCK_MONOTONIC is system-wide on Linux, so another process can compare).
        self.first_request_at: float | None = None
        self.last_response_at: float | None = None
        self.served_s = 0.0
        self.bodies: list[dict[str, Any]] = []

        self._gate: asyncio.Semaphore | None = None
        self._stopping: asyncio.Event | None = None  # wakes sleeping handlers so stop() is quick
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the fake server is not running")
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, wait_s: float = 10.0) -> "FakeOpenAIServer":
        self._gate = self._stopping = self._loop = None  # loop-bound state from an earlier start
        app = Starlette(routes=[
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/v1/files", self._files_create, methods=["POST"]),
            Route("/v1/files", self._files_list, methods=["GET"]),
            Route("/v1/files/{file_id}", self._files_get, methods=["GET"]),
            Route("/v1/files/{file_id}/content", self._files_content, methods=["GET"]),
            Route("/v1/batches", self._batches_create, methods=["POST"]),
            Route("/v1/batches", self._batches_list, methods=["GET"]),
            Route("/v1/batches/{batch_id}", self._batches_get, methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", self._batches_cancel, methods=["POST"]),
        ])
        # proto=IPPROTO_TCP matters: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say
        # they are TCP; without it every response waits ~40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))  # loopback only, ephemeral port
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=1,
            backlog=1024,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="fake-openai", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + wait_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake OpenAI server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:  # the loop closed in between
                pass
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- test controls ---------------------------------------------------------------------
    def enqueue_faults(self, *kinds: str) -> None:
        """The next requests get these faults, in order ("ok" = no fault), before any random draw."""
        for kind in kinds:
            if kind != "ok" and kind not in FAULT_KINDS:
                raise ValueError(f"unknown fault kind {kind!r}")
        with self._lock:
            self._scripted.extend(kinds)

    def reset_counters(self) -> None:
        with self._lock:
            self.requests = 0
            self.model_requests = 0
            self.statuses.clear()
            self.faults_served.clear()
            self.max_in_flight = self.in_flight
            self.first_request_at = self.last_response_at = None
            self.served_s = 0.0
            self.cached_tokens_served = 0
            self.bodies.clear()

    def clear_prompt_cache(self) -> None:
        with self._lock:
            self._prefixes.clear()

    def received_text(self) -> str:
        """Every request body received, as one string (for 'this must never reach the server' checks)."""
        with self._lock:
            return "\n".join(json.dumps(b, ensure_ascii=False) for b in self.bodies)

    # ---- handlers --------------------------------------------------------------------------
    async def _models(self, request: Request) -> Response:
        with self._lock:
            self.model_requests += 1
        return JSONResponse({
            "object": "list",
            "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "radchain-fake"}],
        })

    def _pick_fault(self, raw: bytes, body: dict[str, Any]) -> str | None:
        with self._lock:
            if self._scripted:
                kind = self._scripted.popleft()
                return None if kind == "ok" else kind
            digest = hashlib.sha256(raw).hexdigest()
            occurrence = self._seen[digest]
            self._seen[digest] += 1
        if not self.faults:
            return None
        rng = random.Random(f"{self.seed}|{digest}|{occurrence}")
        kinds = HTTP_FAULTS + (CONTENT_FAULTS if wants_json(body) else ())
        for kind in kinds:  # fixed order and one draw per kind, so a body's fate is reproducible
            if rng.random() < self.faults.get(kind, 0.0):
                return kind
        return None

    def _finish(self, status: int, fault: str | None) -> None:
        with self._lock:
            self.statuses[status] += 1
            if fault:
                self.faults_served[fault] += 1

    async def _chat(self, request: Request) -> Response:
        received = time.monotonic()
        raw = await request.body()
        with self._lock:
            self.requests += 1
            if self.first_request_at is None:
                self.first_request_at = time.monotonic()
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request, raw)
        finally:
            with self._lock:
                self.in_flight -= 1
                self.last_response_at = time.monotonic()
                self.served_s += self.last_response_at - received

    async def _answer(self, request: Request, raw: bytes) -> Response:
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            self._finish(400, None)
            return _error(400, "request body is not JSON", "invalid_request_error")
        with self._lock:
            self.bodies.append(body)
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            self._finish(401, None)
            return _error(401, "invalid API key (fake server)", "invalid_request_error", code="invalid_api_key")
        fmt = body.get("response_format") or {}
        if self.reject_json_schema and fmt.get("type") == "json_schema":
            self._finish(400, "json_schema_rejected")
            return _error(400, "response_format json_schema is not supported by this server",
                          "invalid_request_error", param="response_format")

        fault = self._pick_fault(raw, body)
        if fault == "rate_limit":
            self._finish(429, fault)
            return _error(429, "rate limit reached (fake server)", "rate_limit_error", code="rate_limit_exceeded",
                          headers={"retry-after": _seconds(self.retry_after_s)})
        if fault == "server_error":
            self._finish(500, fault)
            return _error(500, "internal error (fake server)", "server_error")

        async with self._loop_state():
            if fault == "timeout":
                await self._sleep(self.timeout_sleep_s)
            elif self.latency_s:
                await self._sleep(self.latency_s)
            # Made after the wait: a request stalled there (a test raising latency_s) never reaches the responder.
            content = self._content(body, fault)
        self._finish(200, fault)
        return JSONResponse(self._completion(body, content))

    def _loop_state(self) -> asyncio.Semaphore:
        """The request gate, plus the stop event; created lazily inside the server's own event loop."""
        if self._gate is None:
            self._loop = asyncio.get_running_loop()
            self._stopping = asyncio.Event()
            self._gate = asyncio.Semaphore(self.max_concurrency or 1_000_000)
        return self._gate

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when the server is stopping (a 'timeout' fault must not delay stop())."""
        assert self._stopping is not None
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass

    def _content(self, body: dict[str, Any], fault: str | None) -> str:
        if fault == "malformed_json":
            return '{"steps": [{"kind": "observation", "text": "the reply stops mid-way'
        if fault == "schema_invalid":
            return json.dumps({"steps": [{"kind": "hunch", "text": 3}], "confidence": "high"})
        content = self.responder(body)
        if fault == "ungrounded":
            return _make_ungrounded(content)
        if fault == "contradiction":
            return _make_contradiction(content)
        if fault == "off_topic":
            return _make_off_topic(content, body)
        return content

    def _cached_tokens(self, body: Mapping[str, Any], prompt_tokens: int) -> int:
        """Tokens of this prompt's longest prefix seen before, at 1,024 + k*128 tokens (0 below 1,024);
        this prompt's own prefixes are remembered for later requests."""
        if not self.prompt_caching or prompt_tokens < self.cache_min_tokens:
            return 0
        text = "".join(str(m.get("content") or "") for m in body.get("messages") or []).encode("utf-8")
        h = hashlib.sha256(str(body.get("model") or "").encode())
        cached, pos, boundary = 0, 0, self.cache_min_tokens
        digests = []
        while boundary <= prompt_tokens:
            end = boundary * 4
            h.update(text[pos:end])
            pos = end
            digests.append((boundary, h.copy().digest()))
            boundary += self.cache_block_tokens
        with self._lock:
            for n, digest in digests:
                if digest in self._prefixes:
                    cached = n
                else:
                    self._prefixes.add(digest)
            self.cached_tokens_served += cached
        return cached

    # ---- the Batch API ------------------------------------------------------------------------
    def _authorized(self, request: Request) -> bool:
        return self.api_key is None or request.headers.get("authorization") == f"Bearer {self.api_key}"

    def _new_file(self, filename: str, purpose: str, content: bytes) -> dict[str, Any]:
        fid = f"file-{uuid.uuid4().hex[:24]}"
        obj = {"id": fid, "object": "file", "bytes": len(content), "created_at": int(time.time()),
               "filename": filename, "purpose": purpose, "status": "processed", "expires_at": None,
               "status_details": None}
        with self._lock:
            self.files[fid] = {**obj, "_content": content}
        return obj

    @staticmethod
    def _public(obj: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in obj.items() if not k.startswith("_")}

    async def _files_create(self, request: Request) -> Response:
        if not self._authorized(request):
            return _error(401, "invalid API key (fake server)", "invalid_request_error", code="invalid_api_key")
        import email.parser
        import email.policy

        raw = await request.body()
        head = f"Content-Type: {request.headers.get('content-type', '')}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
        fields: dict[str, Any] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[name] = (part.get_filename(), part.get_payload(decode=True))
        if "file" not in fields or "purpose" not in fields:
            return _error(400, "file and purpose are required", "invalid_request_error")
        filename, content = fields["file"]
        purpose = fields["purpose"][1].decode()
        if purpose == "batch":
            for n, line in enumerate(content.splitlines(), 1):
                try:
                    item = json.loads(line)
                    assert item["method"] == "POST" and item["url"] == "/v1/chat/completions" and item["custom_id"]
                except Exception:  # noqa: BLE001
                    return _error(400, f"line {n} of the batch file is not a valid request", "invalid_request_error")
        return JSONResponse(self._new_file(filename or "upload.jsonl", purpose, content))

    async def _files_list(self, request: Request) -> Response:
        purpose = request.query_params.get("purpose")
        with self._lock:
            data = [self._public(f) for f in self.files.values() if purpose in (None, f["purpose"])]
        return JSONResponse({"object": "list", "data": data, "has_more": False,
                             "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})

    async def _files_get(self, request: Request) -> Response:
        f = self.files.get(request.path_params["file_id"])
        if f is None:
            return _error(404, "no such file", "invalid_request_error")
        return JSONResponse(self._public(f))

    async def _files_content(self, request: Request) -> Response:
        f = self.files.get(request.path_params["file_id"])
        if f is None:
            return _error(404, "no such file", "invalid_request_error")
        return Response(f["_content"], media_type="application/octet-stream")

    async def _batches_create(self, request: Request) -> Response:
        if not self._authorized(request):
            return _error(401, "invalid API key (fake server)", "invalid_request_error", code="invalid_api_key")
        body = json.loads(await request.body())
        f = self.files.get(body.get("input_file_id"))
        if f is None or f["purpose"] != "batch":
            return _error(400, "input_file_id is not a batch file", "invalid_request_error", param="input_file_id")
        if body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
            return _error(400, "unsupported endpoint or completion window", "invalid_request_error")
        now = int(time.time())
        bid = f"batch_{uuid.uuid4().hex[:24]}"
        lines = [ln for ln in f["_content"].splitlines() if ln.strip()]
        batch = {
            "id": bid, "object": "batch", "endpoint": body["endpoint"], "errors": None,
            "input_file_id": f["id"], "completion_window": "24h", "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
            "expires_at": now + 86400, "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": body.get("metadata"), "model": None,
        }
        with self._lock:
            self.batches[bid] = batch
            expire = self.expire_batches > 0
            if expire:
                self.expire_batches -= 1
        self._loop_state()
        task = asyncio.ensure_future(self._run_batch(bid, lines, expire))
        self._batch_tasks.add(task)
        task.add_done_callback(self._batch_tasks.discard)
        return JSONResponse(batch)

    async def _batches_list(self, request: Request) -> Response:
        with self._lock:
            data = sorted(self.batches.values(), key=lambda b: b["created_at"], reverse=True)
        data = [dict(b) for b in data]
        return JSONResponse({"object": "list", "data": data, "has_more": False,
                             "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})

    async def _batches_get(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["batch_id"])
        if batch is None:
            return _error(404, "no such batch", "invalid_request_error")
        return JSONResponse(batch)

    async def _batches_cancel(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["batch_id"])
        if batch is None:
            return _error(404, "no such batch", "invalid_request_error")
        if batch["status"] in ("validating", "in_progress"):
            batch["status"] = "cancelling"
            batch["cancelling_at"] = int(time.time())
        return JSONResponse(batch)

    def _batch_line_fails(self, raw: bytes) -> bool:
        if not self.batch_failure_rate:
            return False
        with self._lock:
            digest = hashlib.sha256(b"batch|" + raw).hexdigest()
            occurrence = self._seen[digest]
            self._seen[digest] += 1
        return random.Random(f"{self.seed}|{digest}|{occurrence}").random() < self.batch_failure_rate

    async def _run_batch(self, bid: str, lines: list[bytes], expire: bool) -> None:
        batch = self.batches[bid]
        step = self.batch_delay_s / 3
        await self._sleep(step)
        if batch["status"] != "cancelling":
            batch["status"], batch["in_progress_at"] = "in_progress", int(time.time())
        await self._sleep(step)
        out, err = [], []
        answer_upto = len(lines) // 2 if expire else len(lines)
        for n, line in enumerate(lines):
            item = json.loads(line)
            cid, body = item["custom_id"], item["body"]
            rid = f"batch_req_{uuid.uuid4().hex[:24]}"
            if batch["status"] == "cancelling" or n >= answer_upto:
                code = "batch_cancelled" if batch["status"] == "cancelling" else "batch_expired"
                msg = ("This request could not be executed before the completion window expired."
                       if code == "batch_expired" else "This request was cancelled.")
                err.append({"id": rid, "custom_id": cid, "response": None, "error": {"code": code, "message": msg}})
                continue
            raw = json.dumps(body, sort_keys=True).encode()
            if self._batch_line_fails(raw):
                err.append({"id": rid, "custom_id": cid, "error": None, "response": {
                    "status_code": 500, "request_id": uuid.uuid4().hex,
                    "body": {"error": {"message": "internal error (fake server)", "type": "server_error",
                                       "param": None, "code": None}}}})
                with self._lock:
                    self.batch_lines_failed += 1
                continue
            fault = self._pick_fault(raw, body)
            if fault in HTTP_FAULTS:
                fault = None  # a batch has no per-request HTTP faults here (batch_failure_rate stands for them)
            content = self._content(body, fault)
            with self._lock:
                self.batch_executions[cid] += 1
                self.bodies.append(body)
            out.append({"id": rid, "custom_id": cid, "error": None, "response": {
                "status_code": 200, "request_id": uuid.uuid4().hex, "body": self._completion(body, content)}})
            batch["request_counts"]["completed"] += 1
        batch["request_counts"]["failed"] = len(err)
        cancelled = batch["status"] == "cancelling"
        if not cancelled:
            batch["status"], batch["finalizing_at"] = "finalizing", int(time.time())
        await self._sleep(step)
        if out:
            batch["output_file_id"] = self._new_file(f"{bid}_output.jsonl", "batch_output",
                                                     _jsonl(out))["id"]
        if err:
            batch["error_file_id"] = self._new_file(f"{bid}_error.jsonl", "batch_output", _jsonl(err))["id"]
        now = int(time.time())
        if expire:
            batch["status"], batch["expired_at"] = "expired", now
            with self._lock:
                self.batches_expired += 1
        elif cancelled:
            batch["status"], batch["cancelled_at"] = "cancelled", now
        else:
            batch["status"], batch["completed_at"] = "completed", now

    def _completion(self, body: dict[str, Any], content: str) -> dict[str, Any]:
        prompt_chars = sum(len(str(m.get("content") or "")) for m in body.get("messages") or [])
        prompt_tokens = max(1, prompt_chars // 4)
        completion_tokens = max(1, len(content) // 4)
        cached_tokens = self._cached_tokens(body, prompt_tokens)
        return {
            "id": f"chatcmpl-fake-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
                "logprobs": None,
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached_tokens, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                              "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
            },
        }


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"


def _error(
    status: int,
    message: str,
    kind: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    # The OpenAI error envelope, so the openai client maps it to the right exception class.
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}},
        status_code=status,
        headers=dict(headers or {}),
    )


def serve_forever(**kwargs: Any) -> None:  # pragma: no cover - manual use: python -m radchain.testing.fake_openai
    """Run the fake server in the foreground (for poking at it with curl)."""
    server = FakeOpenAIServer(**kwargs).start()
    print(f"fake OpenAI server (test infrastructure) at {server.base_url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":  # pragma: no cover
    serve_forever()
