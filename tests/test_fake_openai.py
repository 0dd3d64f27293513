"""The fake OpenAI-compatible server: endpoints, faults, counters, concurrency."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from openai import AsyncOpenAI

from extractors.llm import LLMClient
from radchain.testing import FakeOpenAIServer, llm_settings_for
from radchain.testing.fake_openai import UNGROUNDED_QUOTE, default_responder
from schemas.chains import ReasoningChain

REPORT = " FINDINGS: Small left pleural effusion.\n IMPRESSION: Left effusion."
USER = f"Report:\n```\n{REPORT}\n```\nQuestion: effusion?"


def chat_body(content: str = USER, json_mode: bool = True, **extra) -> dict:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": content}], **extra}
    if json_mode:
        body["response_format"] = {"type": "json_object"}
    return body


@pytest.fixture
def server():
    srv = FakeOpenAIServer().start()
    yield srv
    srv.stop()


def post(server: FakeOpenAIServer, body: dict, client: httpx.Client | None = None) -> httpx.Response:
    return (client or httpx).post(f"{server.base_url}/chat/completions", json=body, timeout=10)


def test_models_and_chat_through_the_official_client(server):
    async def run():
        api = AsyncOpenAI(api_key="x", base_url=server.base_url, max_retries=0)
        models = await api.models.list()
        completion = await api.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": USER}], response_format={"type": "json_object"}
        )
        await api.close()
        return models, completion

    models, completion = asyncio.run(run())
    assert [m.id for m in models.data] == ["fake-model"]
    chain = ReasoningChain.model_validate_json(completion.choices[0].message.content)
    # The default responder quotes the report's first line, so its evidence is grounded.
    assert chain.steps[0].evidence[0].quote in REPORT
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert server.requests == 1 and server.model_requests == 1


def test_text_requests_get_text_and_bodies_are_recorded(server):
    r = post(server, chat_body("plan please", json_mode=False))
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"].startswith("Plan:")
    assert server.bodies[0]["messages"][0]["content"] == "plan please"
    assert "plan please" in server.received_text()


def test_scripted_http_faults(server):
    server.retry_after_s = 2
    server.enqueue_faults("rate_limit", "server_error", "ok")
    r1, r2, r3 = post(server, chat_body()), post(server, chat_body()), post(server, chat_body())
    assert r1.status_code == 429 and r1.headers["retry-after"] == "2"
    assert r1.json()["error"]["type"] == "rate_limit_error"
    assert r2.status_code == 500
    assert r3.status_code == 200
    assert server.faults_served == {"rate_limit": 1, "server_error": 1}
    assert server.statuses == {429: 1, 500: 1, 200: 1}


def test_content_faults():
    def responder(body):
        return json.dumps({"steps": [
            {"kind": "observation", "text": "Effusion.", "findings": [{"observation": "Pleural Effusion", "status": "present"}],
             "evidence": [{"quote": "Small left pleural effusion."}]},
            {"kind": "conclusion", "text": "So yes.", "findings": [], "evidence": []},
        ]})

    with FakeOpenAIServer(responder=responder) as server:
        server.enqueue_faults("malformed_json", "schema_invalid", "ungrounded", "contradiction")
        contents = [post(server, chat_body()).json()["choices"][0]["message"]["content"] for _ in range(4)]
    with pytest.raises(json.JSONDecodeError):
        json.loads(contents[0])
    with pytest.raises(ValueError):
        ReasoningChain.model_validate_json(contents[1])
    ungrounded = ReasoningChain.model_validate_json(contents[2])
    assert [e.quote for s in ungrounded.steps for e in s.evidence] == [UNGROUNDED_QUOTE]
    assert UNGROUNDED_QUOTE not in REPORT
    contradicted = ReasoningChain.model_validate_json(contents[3])
    assert contradicted.steps[0].findings[0].status == "absent"
    assert "wrong" in contradicted.steps[-1].text


def test_random_faults_are_reproducible_from_the_seed():
    def served(seed: int) -> list[int]:
        with FakeOpenAIServer(faults={"server_error": 0.5}, seed=seed) as server, httpx.Client() as client:
            return [post(server, chat_body(f"q{i}"), client).status_code for i in range(30)]

    first, again, other = served(7), served(7), served(8)
    assert first == again
    assert first != other
    assert 5 < first.count(500) < 25  # roughly half


def test_rejects_json_schema_when_asked(server):
    server.reject_json_schema = True
    schema_fmt = {"type": "json_schema", "json_schema": {"name": "X", "schema": {"type": "object"}}}
    r = post(server, chat_body(json_mode=False, response_format=schema_fmt))
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    assert post(server, chat_body()).status_code == 200  # JSON mode still works
    assert server.faults_served["json_schema_rejected"] == 1


def test_api_key_is_checked_when_configured():
    with FakeOpenAIServer(api_key="right") as server:
        assert post(server, chat_body()).status_code == 401
        ok = httpx.post(f"{server.base_url}/chat/completions", json=chat_body(),
                        headers={"Authorization": "Bearer right"}, timeout=10)
        assert ok.status_code == 200


def test_serves_32_concurrent_requests_without_being_the_bottleneck():
    """64 requests, 100 ms each, 32 at a time: ideally 0.2 s; one at a time would be 6.4 s."""
    with FakeOpenAIServer(latency_s=0.1) as server:
        settings = llm_settings_for(server, max_concurrency=32, requests_per_minute=0, tokens_per_minute=0)

        async def run():
            client = LLMClient(settings)
            t0 = time.perf_counter()
            results = await asyncio.gather(*(
                client.complete_text([{"role": "user", "content": f"q{i}"}], stage="plan", sample_id=str(i),
                                     prompt_version="t") for i in range(64)
            ))
            elapsed = time.perf_counter() - t0
            await client.aclose()
            return results, elapsed

        results, elapsed = asyncio.run(run())
        assert all(r.ok for r in results)
        assert server.max_in_flight == 32
        assert elapsed < 2.0, f"64 requests took {elapsed:.2f}s"


def test_server_side_concurrency_limit_queues_requests():
    with FakeOpenAIServer(latency_s=0.1, max_concurrency=2) as server:
        settings = llm_settings_for(server, max_concurrency=8, requests_per_minute=0, tokens_per_minute=0)

        async def run():
            client = LLMClient(settings)
            t0 = time.perf_counter()
            await asyncio.gather(*(
                client.complete_text([{"role": "user", "content": f"q{i}"}], stage="plan", sample_id=str(i),
                                     prompt_version="t") for i in range(6)
            ))
            await client.aclose()
            return time.perf_counter() - t0

        elapsed = asyncio.run(run())
    assert elapsed >= 0.29  # 6 requests, 2 at a time, 0.1 s each: three rounds


def test_default_responder_without_a_report_is_still_a_valid_chain():
    content = default_responder({"messages": [{"role": "user", "content": "no fences"}],
                                 "response_format": {"type": "json_object"}})
    chain = ReasoningChain.model_validate_json(content)
    assert chain.steps[-1].kind == "conclusion"
