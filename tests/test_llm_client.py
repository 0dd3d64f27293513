"""LLM client against the fake server: retries, fallbacks, repair, cache, cost, throttles, secrecy."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from types import SimpleNamespace

import pytest

from extractors.llm import (
    CachedResponse,
    LLMClient,
    MemoryResponseCache,
    RequestBlocked,
    cost_usd,
    price_for,
    request_hash,
    retry_after_seconds,
    strict_json_schema,
)
from radchain.testing import FakeOpenAIServer, llm_settings_for
from schemas.chains import ReasoningChain
from schemas.llm import LlmCall
from warehouse.llm_cache import SQLiteResponseCache

REPORT = " FINDINGS: Small left pleural effusion.\n IMPRESSION: Left effusion."
SECRET = "sk-" + "test-SECRET-7f3a9c2e5b"  # split so secret scanners do not flag a fake key


def messages(tag: str = "q") -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You write reasoning chains."},
        {"role": "user", "content": f"Report:\n```\n{REPORT}\n```\nQuestion {tag}: effusion?"},
    ]


@pytest.fixture
def server():
    srv = FakeOpenAIServer().start()
    yield srv
    srv.stop()


def make_client(server: FakeOpenAIServer, cache=None, **overrides) -> LLMClient:
    settings = llm_settings_for(server, api_key=overrides.pop("api_key", SECRET), **overrides)
    return LLMClient(settings, cache, backoff_initial_s=0.01, backoff_max_s=0.05)


def structured(client: LLMClient, tag: str = "q", **kw):
    return client.complete_structured(
        messages(tag), schema=ReasoningChain, stage="single", sample_id=f"s-{tag}", prompt_version="test-v1", **kw
    )


def run(coro_factory):
    """Run a coroutine function; each test uses asyncio.run (no pytest-asyncio needed)."""
    return asyncio.run(coro_factory())


def one(client: LLMClient, tag: str = "q"):
    async def go():
        try:
            return await structured(client, tag)
        finally:
            await client.aclose()

    return run(go)


def assert_valid_rows(rows):
    """Every row is a valid int_llm_calls record once lineage is added."""
    for row in rows:
        LlmCall(**row, run_id="r", batch_id="b", code_version="c")


# ---- retries ------------------------------------------------------------------------------
def test_retry_after_is_honoured(server):
    server.retry_after_s = 1
    server.enqueue_faults("rate_limit")
    t0 = time.perf_counter()
    result = one(make_client(server))
    waited = time.perf_counter() - t0
    assert result.ok and isinstance(result.parsed, ReasoningChain)
    assert waited >= 1.0, "the client must wait at least as long as Retry-After asks"
    assert waited < 3.0
    (row,) = result.calls
    assert row["attempts"] == 2 and row["status"] == "ok" and row["error_code"] is None
    assert server.statuses == {429: 1, 200: 1}
    assert_valid_rows(result.calls)


def test_rate_limit_exhausted_reports_rate_limited(server):
    server.retry_after_s = 0
    server.enqueue_faults("rate_limit", "rate_limit", "rate_limit")
    result = one(make_client(server, max_attempts=3))
    assert result.error_code == "RATE_LIMITED" and result.parsed is None
    assert result.calls[0]["attempts"] == 3 and result.calls[0]["status"] == "error"
    assert server.requests == 3


def test_server_errors_are_retried(server):
    server.enqueue_faults("server_error", "server_error")
    result = one(make_client(server))
    assert result.ok
    assert result.calls[0]["attempts"] == 3
    assert server.statuses == {500: 2, 200: 1}


def test_server_errors_exhausted(server):
    server.enqueue_faults(*["server_error"] * 3)
    result = one(make_client(server, max_attempts=3))
    assert result.error_code == "SERVER_ERROR"
    (row,) = result.calls
    assert (row["attempts"], row["status"], row["cost_usd"]) == (3, "error", 0.0)
    assert_valid_rows(result.calls)


def test_timeouts_are_retried(server):
    server.timeout_sleep_s = 1.5
    server.enqueue_faults("timeout")
    t0 = time.perf_counter()
    result = one(make_client(server, timeout_s=0.3))
    assert result.ok
    assert result.calls[0]["attempts"] == 2
    assert time.perf_counter() - t0 >= 0.3


def test_timeouts_exhausted_report_timeout(server):
    server.timeout_sleep_s = 1.0
    server.enqueue_faults("timeout", "timeout")
    result = one(make_client(server, timeout_s=0.2, max_attempts=2))
    assert result.error_code == "TIMEOUT" and result.calls[0]["attempts"] == 2


def test_dropped_connections_are_retried_then_reported():
    srv = FakeOpenAIServer().start()
    settings = llm_settings_for(srv, api_key=SECRET, max_attempts=3)
    srv.stop()  # nothing listens on that port any more: connection refused
    client = LLMClient(settings, backoff_initial_s=0.01, backoff_max_s=0.02)
    result = one(client)
    assert result.error_code == "CONNECTION"
    assert result.calls[0]["attempts"] == 3


def test_backoff_comes_from_settings(server):
    settings = llm_settings_for(server, api_key=SECRET, backoff_initial_s=0.03, backoff_max_s=0.07)
    client = LLMClient(settings)
    assert (client.backoff_initial_s, client.backoff_max_s) == (0.03, 0.07)
    # Exponential from the initial value, capped (jitter included) at the maximum.
    waits = [client.backoff_s(None, n) for n in range(1, 8)]
    assert 0.03 <= waits[0] <= 0.06 and all(w <= 0.07 for w in waits) and max(waits) == 0.07
    server.enqueue_faults("server_error", "server_error")
    t0 = time.perf_counter()
    assert one(client).ok
    assert time.perf_counter() - t0 < 1.0  # not the default 1 s + 2 s of backoff
    assert LLMClient(settings, backoff_initial_s=0.5).backoff_initial_s == 0.5  # an argument overrides
    defaults = LLMClient(llm_settings_for(server, api_key=SECRET))
    assert (defaults.backoff_initial_s, defaults.backoff_max_s) == (1.0, 30.0)


def test_auth_errors_are_not_retried():
    with FakeOpenAIServer(api_key="the-right-key") as srv:
        result = one(make_client(srv, api_key="a-wrong-key"))
        assert result.error_code == "AUTH_FAILED"
        assert result.calls[0]["attempts"] == 1 and srv.requests == 1


def test_retry_after_header_forms():
    def exc(headers):
        return SimpleNamespace(response=SimpleNamespace(headers=headers))

    assert retry_after_seconds(exc({"retry-after": "3"})) == 3.0
    assert retry_after_seconds(exc({"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    future = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= retry_after_seconds(exc({"retry-after": future})) <= 31
    assert retry_after_seconds(exc({})) is None
    assert retry_after_seconds(ValueError("no response")) is None


# ---- structured output: repair and JSON-mode fallback -----------------------------------
@pytest.mark.parametrize("fault,code", [("malformed_json", "MALFORMED_JSON"), ("schema_invalid", "SCHEMA_INVALID")])
def test_invalid_output_gets_one_repair_request(server, fault, code):
    server.enqueue_faults(fault)
    cache = MemoryResponseCache()
    result = one(make_client(server, cache))
    assert result.ok and isinstance(result.parsed, ReasoningChain)
    first, repair = result.calls
    assert (first["stage"], first["status"], first["error_code"]) == ("single", "invalid", code)
    assert (repair["stage"], repair["status"], repair["error_code"]) == ("repair", "ok", None)
    assert first["request_hash"] != repair["request_hash"]
    # The repair request carries the bad reply and what was wrong with it.
    repair_body = server.bodies[1]["messages"]
    assert repair_body[-2]["role"] == "assistant"
    assert "could not be used" in repair_body[-1]["content"]
    if code == "SCHEMA_INVALID":
        assert "steps.0.kind" in repair_body[-1]["content"]
    else:
        assert "not valid JSON" in repair_body[-1]["content"]
    assert_valid_rows(result.calls)
    # The repaired answer is cached under the original request: a re-run repeats nothing.
    again = one(make_client(server, cache))
    assert again.ok and again.calls[0]["cache_hit"] and server.requests == 2


def test_failed_repair_is_reported_and_not_cached(server):
    server.enqueue_faults("schema_invalid", "malformed_json")
    cache = MemoryResponseCache()
    result = one(make_client(server, cache))
    assert result.parsed is None and result.error_code == "MALFORMED_JSON"
    assert [c["status"] for c in result.calls] == ["invalid", "invalid"]
    assert result.text and result.text.startswith('{"steps"')  # the raw reply, for the dead-letter table
    assert len(cache) == 0
    assert one(make_client(server, cache)).ok  # asked again, not served a failure from the cache
    assert server.requests == 3


def test_json_schema_is_sent_strict(server):
    assert one(make_client(server)).ok
    fmt = server.bodies[0]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["name"] == "ReasoningChain"
    evidence = fmt["json_schema"]["schema"]["$defs"]["Evidence"]
    assert set(evidence["required"]) == {"quote", "start", "end"}
    assert evidence["additionalProperties"] is False


def test_strict_schema_form():
    schema = strict_json_schema(ReasoningChain)

    def objects(node):
        if isinstance(node, dict):
            if node.get("type") == "object":
                yield node
            for v in node.values():
                yield from objects(v)
        elif isinstance(node, list):
            for v in node:
                yield from objects(v)

    found = list(objects(schema))
    assert len(found) == 4  # chain, step, finding, evidence
    for obj in found:
        assert obj["additionalProperties"] is False and set(obj["required"]) == set(obj["properties"])
    assert '"default"' not in str(schema).replace("'", '"')


def test_json_schema_rejection_falls_back_to_json_mode(server):
    server.reject_json_schema = True
    client = make_client(server)

    async def go():
        first = await structured(client, "a")
        second = await structured(client, "b")
        await client.aclose()
        return first, second

    first, second = run(go)
    assert first.ok and second.ok
    assert first.calls[0]["attempts"] == 2  # the refused json_schema attempt, then JSON mode
    assert second.calls[0]["attempts"] == 1  # the client remembered: straight to JSON mode
    assert server.faults_served["json_schema_rejected"] == 1
    assert [b["response_format"]["type"] for b in server.bodies] == ["json_schema", "json_object", "json_object"]
    # In JSON mode the schema travels in a system message (and the word JSON, which OpenAI requires).
    assert "JSON Schema" in server.bodies[1]["messages"][0]["content"]
    assert '"steps"' in server.bodies[1]["messages"][0]["content"]


def test_text_completion(server):
    client = make_client(server)

    async def go():
        r = await client.complete_text([{"role": "user", "content": "plan"}], stage="plan", sample_id="s",
                                       prompt_version="p-v1")
        await client.aclose()
        return r

    result = run(go)
    assert result.ok and result.parsed is None and result.text.startswith("Plan:")
    assert "response_format" not in server.bodies[0]
    assert result.calls[0]["stage"] == "plan"


# ---- cache --------------------------------------------------------------------------------
def test_cache_hit_makes_no_request_and_survives_a_new_client(server, tmp_path):
    cache_dir = tmp_path / "cache"
    first = one(make_client(server, SQLiteResponseCache(cache_dir)))
    assert first.ok and server.requests == 1

    second = one(make_client(server, SQLiteResponseCache(cache_dir)))  # a new process would do the same
    assert server.requests == 1, "a cached request must not reach the server"
    assert second.parsed == first.parsed
    (row,) = second.calls
    assert row["cache_hit"] is True and row["attempts"] == 0 and row["cost_usd"] == 0.0
    assert row["request_hash"] == first.calls[0]["request_hash"]
    assert_valid_rows(second.calls)

    # Anything that changes the question misses: another prompt version, other messages.
    async def variants():
        client = make_client(server, SQLiteResponseCache(cache_dir))
        a = await client.complete_structured(messages(), schema=ReasoningChain, stage="single", sample_id="s-q",
                                             prompt_version="test-v2")
        b = await structured(client, "other")
        await client.aclose()
        return a, b

    a, b = run(variants)
    assert not a.calls[0]["cache_hit"] and not b.calls[0]["cache_hit"]
    assert server.requests == 3


def test_sqlite_cache_commits_each_entry_and_uses_wal(tmp_path):
    cache = SQLiteResponseCache(tmp_path)
    entry = CachedResponse("h1", "m", "v1", "S-1", "single", '{"steps": []}', 10, 5, datetime.now(UTC))
    cache.put(entry)
    # A second, independent connection sees it before the cache is closed: committed, not buffered.
    with sqlite3.connect(cache.path) as other:
        assert other.execute("SELECT text FROM llm_responses WHERE request_hash='h1'").fetchone() == ('{"steps": []}',)
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert cache.get("h1") == entry
    assert cache.get("missing") is None
    cache.close()
    assert SQLiteResponseCache(tmp_path).get("h1") == entry


def test_sqlite_cache_is_safe_across_threads(tmp_path):
    cache = SQLiteResponseCache(tmp_path)

    def writer(k: int) -> None:
        for i in range(50):
            cache.put(CachedResponse(f"h{k}-{i}", "m", "v", None, "s", "t", 1, 1, datetime.now(UTC)))
            assert cache.get(f"h{k}-{i}") is not None

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 200


def test_request_hash_covers_every_part():
    base = dict(model="m", prompt_version="v1", schema_version="S-1", messages=[{"role": "user", "content": "x"}],
                params={"temperature": 0.0})
    h = request_hash(**base)
    assert h == request_hash(**{**base, "params": {"temperature": 0.0}})
    assert h == request_hash(**{**base, "messages": [{"content": "x", "role": "user"}]})  # key order is irrelevant
    for change in (dict(model="m2"), dict(prompt_version="v2"), dict(schema_version="S-2"),
                   dict(messages=[{"role": "user", "content": "y"}]), dict(params={"temperature": 0.7})):
        assert request_hash(**{**base, **change}) != h


# ---- cost ---------------------------------------------------------------------------------
def test_cost_from_usage_and_price_table(server):
    result = one(make_client(server, model="gpt-4o-mini"))
    (row,) = result.calls
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
    expected = (row["prompt_tokens"] * 0.15 + row["completion_tokens"] * 0.6) / 1_000_000
    assert row["cost_usd"] == pytest.approx(expected)
    assert result.cost_usd == pytest.approx(expected)


def test_price_lookup():
    table = {"gpt-4o": (2.5, 10.0), "gpt-4o-mini": (0.15, 0.6)}
    assert cost_usd("gpt-4o", 1_000_000, 1_000_000, table) == pytest.approx(12.5)
    assert price_for("gpt-4o-mini-2024-07-18", table) == (0.15, 0.6)  # longest prefix wins
    assert price_for("gpt-4o-2024-11-20", table) == (2.5, 10.0)
    assert cost_usd("local-llama", 10_000, 10_000, table) == 0.0


# ---- throttles ----------------------------------------------------------------------------
def test_concurrency_bound_is_respected():
    with FakeOpenAIServer(latency_s=0.05) as srv:
        client = make_client(srv, max_concurrency=4, requests_per_minute=0, tokens_per_minute=0)

        async def go():
            results = await asyncio.gather(*(structured(client, str(i)) for i in range(24)))
            await client.aclose()
            return results

        results = run(go)
        assert all(r.ok for r in results)
        assert srv.max_in_flight == 4  # reached, never exceeded
        assert client.throttle is None or client.throttle.max_in_flight <= 4


def test_requests_per_minute_limit():
    """600/min with a 1 s bucket: 10 at once, then 10 a second. 25 requests need >= 1.5 s."""
    with FakeOpenAIServer() as srv:
        client = make_client(srv, max_concurrency=32, requests_per_minute=600, tokens_per_minute=0)

        async def go():
            t0 = time.perf_counter()
            results = await asyncio.gather(*(structured(client, str(i)) for i in range(25)))
            await client.aclose()
            return results, time.perf_counter() - t0

        results, elapsed = run(go)
    assert all(r.ok for r in results)
    assert elapsed >= 1.3, f"25 requests at 600/min finished in {elapsed:.2f}s"
    assert elapsed < 4.0


def test_tokens_per_minute_limit():
    """60k tokens/min = 1000/s; each request is charged ~420 tokens, 5 of them ~2100: > 1 s."""
    with FakeOpenAIServer() as srv:
        client = make_client(srv, requests_per_minute=0, tokens_per_minute=60_000)

        async def go():
            t0 = time.perf_counter()
            results = await asyncio.gather(*(structured(client, str(i), max_tokens=400) for i in range(5)))
            await client.aclose()
            return results, time.perf_counter() - t0

        results, elapsed = run(go)
    assert all(r.ok for r in results)
    assert elapsed >= 0.9
    assert srv.bodies[0]["max_tokens"] == 400


# ---- secrecy, guard, event loops ----------------------------------------------------------
def test_api_key_never_leaks(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # everything, including openai/httpx debug logs
    with FakeOpenAIServer(api_key=SECRET, retry_after_s=0) as srv:
        srv.enqueue_faults("rate_limit", "server_error", "ok", "malformed_json")
        cache = SQLiteResponseCache(tmp_path / "cache")
        client = make_client(srv, cache)

        async def go():
            a = await structured(client, "a")
            b = await structured(client, "b")
            c = await structured(client, "a")  # cache hit
            await client.aclose()
            return [a, b, c]

        results = run(go)
        assert all(r.ok for r in results)  # the key was used: the server checks it
        received = srv.received_text()
    cache.close()
    assert SECRET not in caplog.text
    assert SECRET not in repr([r.calls for r in results]) and SECRET not in repr(results)
    assert SECRET not in received  # request bodies never carry it (only the Authorization header)
    for f in (tmp_path / "cache").iterdir():
        assert SECRET.encode() not in f.read_bytes(), f.name
    assert SECRET not in repr(client.settings)


def test_request_guard_blocks_before_sending(server):
    def guard(msgs, base_url):
        if any("effusion" in m["content"] for m in msgs):
            raise RequestBlocked("flagged text for a non-allowed host")

    client = LLMClient(llm_settings_for(server), request_guard=guard)
    result = one(client)
    assert result.error_code == "BLOCKED" and result.calls[0]["attempts"] == 0
    assert server.requests == 0


def test_client_works_across_event_loops(server):
    client = make_client(server)
    assert one(client).ok
    assert one(client).ok  # a second asyncio.run: a fresh session, no 'event loop is closed'
    assert server.requests == 2
