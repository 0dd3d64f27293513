"""An OpenAI-compatible chat client built for batch mining: throttled, retried, cached, accounted.

One ``LLMClient`` talks to one endpoint (``settings.base_url``; the caller passes its settings in,
see ``EndpointSettings``; a hosted API, vLLM, or the fake server in radchain.testing) through the
official ``openai.AsyncOpenAI`` client, whose own retries are switched off (``max_retries=0``) so
that every attempt is counted here and shows up in the ``attempts`` column of int_llm_calls.

What happens to one request (``complete_structured``):

1. its hash (model, prompt version, schema version, messages, sampling parameters) is
   looked up in the response cache; a hit returns at once and costs nothing;
2. otherwise it is sent through the throttle (concurrency, requests/min, tokens/min) with
   retries: 429 (waiting as long as ``Retry-After`` asks), 5xx, 408/409, timeouts and
   dropped connections are retried with exponential backoff and jitter, up to
   ``max_attempts`` HTTP attempts; other 4xx fail at once;
3. structured output is requested with ``response_format=json_schema``; a server that
   answers 400 to that is asked again in JSON mode (``json_object``, the schema put in a
   system message), and the client remembers to use JSON mode from then on;
4. the reply is parsed and validated with the pydantic model; a reply that is not JSON or
   does not fit gets exactly one repair request that sends the error back to the model;
5. a valid answer is written to the cache, keyed by the hash of step 1.

A circuit breaker stops a dead endpoint from costing every request its retries: after
``breaker_failures`` consecutive attempts that could not connect (or a failed ``preflight``),
``circuit_open`` is set and every later request fails at once with ``ENDPOINT_DOWN``.

Every HTTP-level request (the first one and the repair) yields one int_llm_calls row dict, with
``cached_tokens`` (``usage.prompt_tokens_details.cached_tokens``: input served from the provider's
prompt cache, priced at the cached rate), ``mode`` and, in batch mode, ``openai_batch_id``.

With a ``transport`` (extractors.llm.batch.BatchTransport: ``--llm-mode batch``), step 2 hands the
request body to the transport instead of posting it: it goes out in the next OpenAI Batch API job,
and a request the job failed is retried in a later one (no throttle, no backoff wait: a batch is
its own queue). Steps 1 and 3-5 are unchanged, so the same answers give the same results.

The API key is handed to ``AsyncOpenAI`` and to nothing else: it is not part of any hash,
row, cache entry or log line.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Protocol

import openai
from openai import AsyncOpenAI
from pydantic import BaseModel
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from extractors.llm import hashing
from extractors.llm.cache import CachedResponse, ResponseCache
from extractors.llm.limits import Throttle, estimate_tokens
from extractors.llm.pricing import cost_usd
from extractors.llm.structured import (
    json_mode_instruction,
    json_schema_response_format,
    parse_structured,
    repair_message,
)

log = logging.getLogger("radchain.llm")


class EndpointSettings(Protocol):
    """What the client reads of its settings; the caller passes them in (``radchain.settings.LLMSettings``
    in the pipeline). Extractors are plain code and do not load the application's settings themselves."""

    base_url: str | None
    api_key: Any  # a pydantic SecretStr (``get_secret_value()``) or None
    model: str
    temperature: float
    timeout_s: float
    max_attempts: int
    backoff_initial_s: float
    backoff_max_s: float
    breaker_failures: int
    max_concurrency: int
    requests_per_minute: int
    tokens_per_minute: int
    price_per_mtok: Mapping[str, Any]  # model -> ModelPrice (or its dict), see extractors.llm.pricing

Message = Mapping[str, Any]

# Error codes that end up in int_llm_calls.error_code and in StructuredResult.error_code.
RATE_LIMITED = "RATE_LIMITED"
SERVER_ERROR = "SERVER_ERROR"
TIMEOUT = "TIMEOUT"
CONNECTION = "CONNECTION"
AUTH_FAILED = "AUTH_FAILED"
HTTP_4XX = "HTTP_4XX"
API_ERROR = "API_ERROR"
BLOCKED = "BLOCKED"
MALFORMED_JSON = "MALFORMED_JSON"
SCHEMA_INVALID = "SCHEMA_INVALID"
EMPTY_RESPONSE = "EMPTY_RESPONSE"
ENDPOINT_DOWN = "ENDPOINT_DOWN"  # not sent: the circuit breaker is open (see LLMClient.circuit_open)
# Failures that a later re-run may well not hit again (the cache never stores them, so it will ask again).
TRANSIENT_ERROR_CODES = frozenset({RATE_LIMITED, SERVER_ERROR, TIMEOUT, CONNECTION, ENDPOINT_DOWN})

_COMPLETIONS_PATH = "/chat/completions"


@lru_cache(maxsize=128)
def _json_fragment(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def request_body(model: str, messages_json: str, params: Mapping[str, Any],
                 response_format: dict[str, Any] | None) -> bytes:
    """The chat-completions JSON body, from the already serialised messages.

    ``response_format`` dicts come from ``json_schema_response_format`` (cached, never mutated),
    so their JSON is cached by identity; any other dict is serialised each time.
    """
    parts = ['{"model":', _json_fragment(model), ',"messages":', messages_json]
    for key, value in params.items():
        parts += [",", _json_fragment(key), ":", json.dumps(value)]
    if response_format is not None:
        parts += [',"response_format":', _format_json(response_format)]
    parts.append("}")
    return "".join(parts).encode("utf-8")


_FORMAT_JSON: dict[int, tuple[dict[str, Any], str]] = {}


def _format_json(response_format: dict[str, Any]) -> str:
    hit = _FORMAT_JSON.get(id(response_format))
    if hit is not None and hit[0] is response_format:
        return hit[1]
    text = json.dumps(response_format, ensure_ascii=False, separators=(",", ":"))
    if len(_FORMAT_JSON) < 256:
        _FORMAT_JSON[id(response_format)] = (response_format, text)  # holds the dict: its id stays unique
    return text


def parse_completion(raw: bytes | str) -> _Reply:
    """Content and token usage of a chat-completions reply (a body that is not one gives no content)."""
    try:
        data = json.loads(raw)
    except ValueError:
        return _Reply(None, 0, 0)
    if not isinstance(data, dict):
        return _Reply(None, 0, 0)
    text = None
    choices = data.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        if isinstance(message, dict):
            content = message.get("content")
            text = content if isinstance(content, str) else None
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    details = usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), dict) else {}
    return _Reply(text, _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")),
                  _int(details.get("cached_tokens")))


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


class RequestBlocked(Exception):
    """Raised by a request guard (e.g. a PHI guard) to stop a request before it is sent."""


class _EndpointDown(Exception):
    """The circuit breaker is open: no further request is sent (ends the retry loop at once)."""


RequestGuard = Callable[[Sequence[Message], str | None], None]


@dataclass
class StructuredResult:
    """What one logical request produced.

    ``parsed`` is the validated model (structured calls) or None; ``text`` is the last raw
    reply (kept for the dead-letter table when nothing valid came back); ``calls`` are the
    int_llm_calls row dicts (without lineage columns); ``error_code`` is None on success.
    """

    parsed: BaseModel | None
    text: str | None
    calls: list[dict[str, Any]]
    error_code: str | None
    request_hash: str
    error_detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_code is None

    @property
    def cost_usd(self) -> float:
        return sum(c["cost_usd"] for c in self.calls)


@dataclass
class _Reply:
    text: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens (part of prompt_tokens)
    openai_batch_id: str | None = None  # the Batch API batch that answered (batch mode)


class _CallFailed(Exception):
    def __init__(self, code: str, attempts: int, status: int | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.attempts = attempts
        self.status = status


@dataclass
class _CallOutcome:
    text: str | None
    prompt_tokens: int
    completion_tokens: int
    attempts: int
    error_code: str | None
    cached_tokens: int = 0
    openai_batch_id: str | None = None

    @classmethod
    def of(cls, reply: _Reply, attempts: int) -> "_CallOutcome":
        return cls(reply.text, reply.prompt_tokens, reply.completion_tokens, attempts, None, reply.cached_tokens,
                   reply.openai_batch_id)


@dataclass(eq=False)
class _Session:
    """The per-event-loop half of the client (httpx pools and asyncio primitives are loop-bound).

    It must not reference its loop: it is the value of a WeakKeyDictionary keyed by that loop.
    """

    api: AsyncOpenAI
    throttle: Throttle


def classify(exc: BaseException) -> tuple[str, bool, int | None]:
    """(error code, retryable, HTTP status) for an exception raised by the openai client."""
    code = getattr(exc, "radchain_code", None)  # a failed Batch API request (extractors.llm.batch.BatchItemError)
    if code is not None:
        return code, bool(getattr(exc, "retryable", False)), getattr(exc, "status", None)
    if isinstance(exc, openai.APITimeoutError):  # before APIConnectionError: it is a subclass
        return TIMEOUT, True, None
    if isinstance(exc, openai.APIConnectionError):
        return CONNECTION, True, None
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status == 429:
            return RATE_LIMITED, True, status
        if status >= 500:
            return SERVER_ERROR, True, status
        if status == 408:
            return TIMEOUT, True, status
        if status == 409:  # a conflict/lock on the server side; OpenAI documents it as retryable
            return HTTP_4XX, True, status
        if status in (401, 403):
            return AUTH_FAILED, False, status
        return HTTP_4XX, False, status
    return API_ERROR, False, None


def retry_after_seconds(exc: BaseException | None) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms`` or ``Retry-After``), if it did."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:  # the HTTP-date form
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class LLMClient:
    """Chat completions with throttling, retries, structured output, caching and accounting.

    ``cache`` is anything with ``get(hash)``/``put(entry)`` (extractors.llm.cache.ResponseCache;
    warehouse.llm_cache.SQLiteResponseCache in production). ``request_guard`` is called with
    the messages and base URL before a request is sent and may raise ``RequestBlocked``.
    ``call_log`` gets each fresh call's ledger row as soon as it is made, before its answer is
    cached (the mine stage journals them durably, so a killed run's spend is not lost).
    Backoff parameters come from the settings (``backoff_initial_s``, ``backoff_max_s``); the
    constructor arguments override them (tests shrink them).
    """

    def __init__(
        self,
        settings: EndpointSettings,
        cache: ResponseCache | None = None,
        *,
        strict_schema: bool = True,
        backoff_initial_s: float | None = None,
        backoff_max_s: float | None = None,
        retry_after_cap_s: float = 120.0,
        completion_tokens_estimate: int = 1024,
        limiter_window_s: float = 1.0,
        seed: int | None = None,
        request_guard: RequestGuard | None = None,
        call_log: Callable[[dict[str, Any]], None] | None = None,
        transport: Any | None = None,
    ) -> None:
        self.settings = settings
        # Batch mode (extractors.llm.batch.BatchTransport): requests are queued into OpenAI Batch API jobs instead
        # of being posted one by one; everything else (cache, structured output, repair, rows) is the same.
        self.transport = transport
        self.call_log = call_log
        self.cache = cache
        self.strict_schema = strict_schema
        # None: settings.backoff_initial_s / backoff_max_s (1 s and 30 s by default).
        self.backoff_initial_s = settings.backoff_initial_s if backoff_initial_s is None else backoff_initial_s
        self.backoff_max_s = settings.backoff_max_s if backoff_max_s is None else backoff_max_s
        self.retry_after_cap_s = retry_after_cap_s
        self.completion_tokens_estimate = completion_tokens_estimate
        self.limiter_window_s = limiter_window_s
        self.seed = seed
        self.request_guard = request_guard
        # Flipped to False the first time the server refuses json_schema (then JSON mode for the rest).
        self.json_schema_supported = True
        # Circuit breaker: after ``settings.breaker_failures`` consecutive attempts that could not reach the
        # server (connection refused/reset, DNS; a timeout is not counted), or a failed ``preflight``, no request
        # is sent any more (ENDPOINT_DOWN, no attempt); cache hits are still served. 0 turns it off.
        self.connection_failures = 0
        self.circuit_open = False
        self.breaker_refused = 0
        self.breaker_reason: str | None = None  # why it opened, in words
        # One session per event loop: httpx pools and asyncio primitives cannot cross loops, and a
        # flow may call asyncio.run once per batch (or run loops in several threads).
        self._sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Session] = weakref.WeakKeyDictionary()

    @property
    def model(self) -> str:
        return self.settings.model

    @property
    def mode(self) -> str:
        return "batch" if self.transport is not None else "sync"

    # ---- session (per event loop) --------------------------------------------------------
    def _current_session(self) -> _Session:
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None:
            session = self._sessions[loop] = _Session(api=self._new_api(), throttle=self._new_throttle())
        return session

    def _new_api(self) -> AsyncOpenAI:
        base_url = self.settings.base_url
        secret = self.settings.api_key.get_secret_value() if self.settings.api_key else None
        if secret is None:
            if base_url is None:
                raise ValueError("no API key: set OPENAI_API_KEY (or OPENAI_BASE_URL for a local server)")
            # Local OpenAI-compatible servers (vLLM, llama.cpp) ignore the key, but the client wants one.
            secret = "EMPTY"
        return AsyncOpenAI(
            api_key=secret,
            base_url=base_url,
            timeout=self.settings.timeout_s,
            max_retries=0,  # attempts are counted (and backed off) here, not inside the openai client
        )

    def _new_throttle(self) -> Throttle:
        s = self.settings
        return Throttle(
            max_concurrency=s.max_concurrency,
            requests_per_minute=s.requests_per_minute or None,
            tokens_per_minute=s.tokens_per_minute or None,
            window_s=self.limiter_window_s,
        )

    @property
    def throttle(self) -> Throttle | None:
        """The throttle of the most recently started session (for inspection in tests and benchmarks)."""
        sessions = list(self._sessions.values())
        return sessions[-1].throttle if sessions else None

    async def aclose(self) -> None:
        """Close the HTTP pool of the running loop's session (sessions of finished loops are dropped with them)."""
        session = self._sessions.pop(asyncio.get_running_loop(), None)
        if session is not None:
            await session.api.close()

    async def __aenter__(self) -> "LLMClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- public calls --------------------------------------------------------------------
    def sampling_params(self, max_tokens: int | None = None) -> dict[str, Any]:
        """The parameters that shape the answer; they are part of the request hash."""
        params: dict[str, Any] = {"temperature": self.settings.temperature}
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        if self.seed is not None:
            params["seed"] = self.seed
        return params

    def hash_request(
        self,
        messages: Sequence[Message],
        *,
        prompt_version: str,
        schema: type[BaseModel] | None = None,
        schema_version: str | None = None,
        max_tokens: int | None = None,
    ) -> str:
        if schema is not None and schema_version is None:
            schema_version = hashing.schema_version(schema)
        return hashing.request_hash(
            model=self.model,
            prompt_version=prompt_version,
            schema_version=schema_version,
            messages=messages,
            params=self.sampling_params(max_tokens),
        )

    async def complete_structured(
        self,
        messages: Sequence[Message],
        *,
        schema: type[BaseModel],
        stage: str,
        sample_id: str,
        prompt_version: str,
        schema_version: str | None = None,
        max_tokens: int | None = None,
    ) -> StructuredResult:
        """Ask for one object of ``schema``; see the module docstring for the steps."""
        schema_version = schema_version or hashing.schema_version(schema)
        messages = [dict(m) for m in messages]
        key = self.hash_request(
            messages, prompt_version=prompt_version, schema_version=schema_version, max_tokens=max_tokens
        )
        row_base = dict(sample_id=sample_id, prompt_version=prompt_version)

        hit = self._from_cache(key, schema, stage, row_base)
        if hit is not None:
            return hit

        started = time.perf_counter()
        first = await self._call(messages, schema=schema, max_tokens=max_tokens)
        if first.error_code is not None:
            row = self._row(key, stage, first, "error", started, **row_base)
            return StructuredResult(None, first.text, [row], first.error_code, key)
        parsed, code, detail = parse_structured(first.text, schema)
        if parsed is not None:
            row = self._row(key, stage, first, "ok", started, **row_base)  # logged before the answer is cached
            self._store(key, stage, prompt_version, schema_version, first.text or "", first)
            return StructuredResult(parsed, first.text, [row], None, key)

        # One repair turn: the model sees its own reply and what was wrong with it.
        first_row = self._row(key, stage, first, "invalid", started, error_code=code, **row_base)
        log.info("llm %s sample=%s: %s; sending one repair request", stage, sample_id, code)
        repair_messages = [*messages, {"role": "assistant", "content": first.text or ""}, repair_message(detail or "")]
        repair_key = self.hash_request(
            repair_messages, prompt_version=prompt_version, schema_version=schema_version, max_tokens=max_tokens
        )
        started = time.perf_counter()
        second = await self._call(repair_messages, schema=schema, max_tokens=max_tokens)
        if second.error_code is not None:
            row = self._row(repair_key, "repair", second, "error", started, **row_base)
            return StructuredResult(None, first.text, [first_row, row], second.error_code, key, detail)
        parsed, code2, detail2 = parse_structured(second.text, schema)
        if parsed is None:
            row = self._row(repair_key, "repair", second, "invalid", started, error_code=code2, **row_base)
            return StructuredResult(None, second.text, [first_row, row], code2, key, detail2)
        row = self._row(repair_key, "repair", second, "ok", started, **row_base)
        # Cached under the original request's hash: a re-run gets the repaired answer without repeating the repair.
        self._store(key, stage, prompt_version, schema_version, second.text or "", first, second)
        return StructuredResult(parsed, second.text, [first_row, row], None, key)

    async def complete_text(
        self,
        messages: Sequence[Message],
        *,
        stage: str,
        sample_id: str,
        prompt_version: str,
        max_tokens: int | None = None,
    ) -> StructuredResult:
        """A free-text answer (the paper protocol's plan call), with the same retries, cache and rows."""
        messages = [dict(m) for m in messages]
        key = self.hash_request(messages, prompt_version=prompt_version, max_tokens=max_tokens)
        row_base = dict(sample_id=sample_id, prompt_version=prompt_version)
        hit = self._from_cache(key, None, stage, row_base)
        if hit is not None:
            return hit
        started = time.perf_counter()
        out = await self._call(messages, schema=None, max_tokens=max_tokens)
        if out.error_code is None and not (out.text or "").strip():
            out.error_code = EMPTY_RESPONSE
        if out.error_code is not None:
            status = "invalid" if out.error_code == EMPTY_RESPONSE else "error"
            return StructuredResult(None, out.text, [self._row(key, stage, out, status, started, **row_base)],
                                    out.error_code, key)
        row = self._row(key, stage, out, "ok", started, **row_base)
        self._store(key, stage, prompt_version, None, out.text or "", out)
        return StructuredResult(None, out.text, [row], None, key)

    # ---- one logical request over HTTP (with the JSON-mode fallback) ----------------------
    async def _call(
        self, messages: list[dict[str, Any]], *, schema: type[BaseModel] | None, max_tokens: int | None
    ) -> _CallOutcome:
        if self.request_guard is not None:
            try:
                self.request_guard(messages, self.settings.base_url)
            except RequestBlocked as e:
                log.warning("llm request blocked before sending: %s", e)
                return _CallOutcome(None, 0, 0, 0, BLOCKED)
        attempts = 0
        refused_json_schema = False
        try:
            if schema is not None and self.json_schema_supported:
                try:
                    reply, n = await self._send(
                        messages, json_schema_response_format(schema, self.strict_schema), max_tokens
                    )
                    return _CallOutcome.of(reply, n)
                except _CallFailed as e:
                    if e.status != 400:
                        raise
                    attempts += e.attempts
                    refused_json_schema = True
            if schema is not None:
                json_messages = [json_mode_instruction(schema), *messages]
                reply, n = await self._send(json_messages, {"type": "json_object"}, max_tokens)
                if refused_json_schema and self.json_schema_supported:
                    # Only now is it clear the 400 was about json_schema (and not, say, an over-long prompt).
                    self.json_schema_supported = False
                    log.warning("server refused response_format=json_schema (HTTP 400); using JSON mode from now on")
            else:
                reply, n = await self._send(messages, None, max_tokens)
            return _CallOutcome.of(reply, attempts + n)
        except _CallFailed as e:
            return _CallOutcome(None, 0, 0, attempts + e.attempts, e.code)

    async def _send(
        self, messages: list[dict[str, Any]], response_format: dict[str, Any] | None, max_tokens: int | None
    ) -> tuple[_Reply, int]:
        """One request with retries; returns the reply and the number of HTTP attempts made.

        The body is serialised here, once (``request_body``), and posted with the official
        client's ``post("/chat/completions", content=..., cast_to=bytes)``: the same client,
        headers, timeout and error classes as ``chat.completions.create``, without its
        per-request parameter transform (about 2 ms of CPU per request, the largest cost of
        this path) or its pydantic response model; the reply is parsed once (``parse_completion``).
        """
        messages_json = json.dumps(messages, ensure_ascii=False, separators=(",", ":"))
        payload = request_body(self.model, messages_json, self.sampling_params(max_tokens), response_format)
        if self.transport is not None:
            return await self._send_batched(payload)
        session = self._current_session()
        estimate = estimate_tokens(len(messages_json), max_tokens or self.completion_tokens_estimate)
        attempts = 0

        def log_retry(state: RetryCallState) -> None:
            code, _, status = classify(state.outcome.exception())
            # Only the code and status: exception messages can echo request content.
            log.warning("llm attempt %d failed (%s%s); retrying in %.2fs", state.attempt_number, code,
                        f" HTTP {status}" if status else "", state.next_action.sleep if state.next_action else 0.0)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(max(1, self.settings.max_attempts)),
            retry=retry_if_exception(lambda e: isinstance(e, openai.OpenAIError) and classify(e)[1]
                                     and not self.circuit_open),
            wait=lambda state: self.backoff_s(state.outcome.exception(), state.attempt_number),
            before_sleep=log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if self.circuit_open:
                        raise _EndpointDown
                    async with session.throttle.slot(estimate):
                        if self.circuit_open:  # opened while this request waited for its slot
                            raise _EndpointDown
                        attempts += 1
                        raw = await self._post(session, payload)
        except _EndpointDown:
            self.breaker_refused += 1
            raise _CallFailed(ENDPOINT_DOWN, attempts) from None
        except openai.OpenAIError as e:
            code, _, status = classify(e)
            raise _CallFailed(code, attempts, status) from None  # `from None`: error text may echo request data
        # Yield once: the request waiting for the slot just freed goes out now, before this answer is
        # parsed, cached and verified (about 1 ms of CPU that would otherwise delay it).
        await asyncio.sleep(0)
        return parse_completion(raw), attempts

    async def _post(self, session: _Session, payload: bytes) -> bytes:
        """One HTTP attempt, counted by the circuit breaker (an attempt that reached the server resets it)."""
        try:
            raw = await session.api.post(_COMPLETIONS_PATH, cast_to=bytes, content=payload)
        except openai.APITimeoutError:  # a slow server is still a server: not counted
            raise
        except openai.APIConnectionError:  # refused, reset, DNS: the server was not reached
            self.connection_failures += 1
            limit = self.settings.breaker_failures
            if limit and self.connection_failures >= limit and not self.circuit_open:
                self.circuit_open = True
                self.breaker_reason = f"{self.connection_failures} consecutive connection failures"
                log.error("llm endpoint unreachable: %d consecutive connection failures; circuit breaker open, no "
                          "further request is sent", self.connection_failures)
            raise
        except openai.APIStatusError:
            self.connection_failures = 0  # an HTTP answer: the server is there
            raise
        self.connection_failures = 0
        return raw

    async def preflight(self, timeout_s: float = 5.0) -> str | None:
        """One cheap request (``GET /models``, no retries) before a large batch: None when the server answered
        (any HTTP status), else the error code, with the circuit breaker opened (a dead endpoint fails in
        seconds instead of after every sample's retries)."""
        session = self._current_session()
        try:
            await session.api.with_options(timeout=min(timeout_s, self.settings.timeout_s)).models.list()
        except openai.APIStatusError:
            return None
        except openai.APIConnectionError as e:
            self.circuit_open = True
            code = classify(e)[0]
            self.breaker_reason = f"the preflight request GET /models failed ({code})"
            log.error("llm endpoint preflight failed (%s): circuit breaker open", code)
            return code
        return None

    async def _send_batched(self, payload: bytes) -> tuple[_Reply, int]:
        """Batch mode: the request goes into the transport's next Batch API job; a request that job
        failed (error file, expiry, cancellation) is retried in a later job, up to ``max_attempts``."""
        attempts = 0
        while True:
            attempts += 1
            try:
                raw, batch_id = await self.transport.submit(payload)
            except openai.OpenAIError as e:
                code, retryable, status = classify(e)
                if retryable and attempts < max(1, self.settings.max_attempts):
                    log.info("batch request failed (%s%s); retrying in the next batch", code,
                                f" HTTP {status}" if status else "")
                    continue
                raise _CallFailed(code, attempts, status) from None
            reply = parse_completion(raw)
            reply.openai_batch_id = batch_id
            return reply, attempts

    def backoff_s(self, exc: BaseException | None, attempt_number: int) -> float:
        """Seconds to wait after failed attempt ``attempt_number`` (1-based): Retry-After when the server
        gave one (never shorter), else exponential backoff with jitter."""
        asked = retry_after_seconds(exc)
        if asked is not None:
            asked = min(asked, self.retry_after_cap_s)
            return asked + random.uniform(0, min(1.0, 0.1 * asked))
        ceiling = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (attempt_number - 1))
        return min(self.backoff_max_s, ceiling + random.uniform(0, self.backoff_initial_s))

    # ---- cache and rows ------------------------------------------------------------------
    def _from_cache(
        self, key: str, schema: type[BaseModel] | None, stage: str, row_base: dict[str, str]
    ) -> StructuredResult | None:
        """The cached answer as a result with its cache-hit ledger row, or None (ask the model)."""
        if self.cache is None:
            return None
        t0 = time.perf_counter()
        entry = self.cache.get(key)
        if entry is None:
            return None
        parsed = None
        if schema is not None:
            parsed, code, _ = parse_structured(entry.text, schema)
            if parsed is None:  # a stale or damaged entry: ask the model again
                log.warning("ignoring a cached answer that no longer validates (%s)", code)
                return None
        row = self._hit_row(key, stage, (time.perf_counter() - t0) * 1000, **row_base)
        return StructuredResult(parsed, entry.text, [row], None, key)

    def _store(
        self, key: str, stage: str, prompt_version: str, schema_version: str | None, text: str, *outs: _CallOutcome
    ) -> None:
        if self.cache is None:
            return
        self.cache.put(CachedResponse(
            request_hash=key,
            model=self.model,
            prompt_version=prompt_version,
            schema_version=schema_version,
            stage=stage,
            text=text,
            prompt_tokens=sum(o.prompt_tokens for o in outs),
            completion_tokens=sum(o.completion_tokens for o in outs),
            created_at=datetime.now(UTC),
        ))

    def _row(
        self,
        key: str,
        stage: str,
        out: _CallOutcome,
        status: str,
        started: float,
        *,
        sample_id: str,
        prompt_version: str,
        error_code: str | None = None,
    ) -> dict[str, Any]:
        """The ledger row of one fresh call (after its retries), handed to ``call_log`` too."""
        row = dict(
            request_hash=key,
            sample_id=sample_id,
            stage=stage,
            model=self.model,
            prompt_version=prompt_version,
            status=status,
            cache_hit=False,
            attempts=out.attempts,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            latency_ms=(time.perf_counter() - started) * 1000,
            cost_usd=cost_usd(self.model, out.prompt_tokens, out.completion_tokens, self.settings.price_per_mtok,
                              cached_tokens=out.cached_tokens, mode=self.mode),
            error_code=error_code if error_code is not None else out.error_code,
            created_at=datetime.now(UTC),
            cached_tokens=out.cached_tokens,
            mode=self.mode,
            openai_batch_id=out.openai_batch_id,
        )
        if self.call_log is not None:
            self.call_log(row)
        return row

    def _hit_row(self, key: str, stage: str, lookup_ms: float, *, sample_id: str, prompt_version: str) -> dict[str, Any]:
        # Tokens and cost are what this call spent: nothing. The original spend is on the row that filled the cache.
        return dict(
            request_hash=key, sample_id=sample_id, stage=stage, model=self.model, prompt_version=prompt_version,
            status="ok", cache_hit=True, attempts=0, prompt_tokens=0, completion_tokens=0,
            latency_ms=lookup_ms, cost_usd=0.0, error_code=None, created_at=datetime.now(UTC),
            cached_tokens=0, mode=self.mode, openai_batch_id=None,
        )
