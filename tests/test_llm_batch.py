"""Batch API mining (``--llm-mode batch``) over HTTP against the fake server's /v1/files and /v1/batches.

The done-when test: a batch run with 5% failed requests, one expired batch and a SIGKILL between
upload and completion ends with every sample accounted for, no request paid twice, and the same
chains as the sync path for the same responses.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pytest
from llmcost_support import build_pristine, fresh_home, llm_env, mine

GPT4O = "gpt-4o-2024-08-06"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return build_pristine(tmp_path_factory.mktemp("llm-batch"))


@pytest.fixture(scope="module")
def responder(pristine):
    from flows.testing import chain_responder

    return chain_responder(pristine).warm()


def _server(responder, **kw):
    from radchain.testing import FakeOpenAIServer

    return FakeOpenAIServer(responder=responder, model=GPT4O, **kw).start()


def _chains(wh) -> dict[str, tuple]:
    steps = wh.read("int_chain_steps").sort("chain_id", "step_index")
    by_chain: dict[str, list] = {}
    for r in steps.iter_rows(named=True):
        by_chain.setdefault(r["chain_id"], []).append((r["kind"], r["text"], json.dumps(r["evidence"], default=str)))
    return {r["sample_id"]: (r["chain_id"], r["text"], r["n_steps"], r["refine_rounds"], tuple(by_chain[r["chain_id"]]))
            for r in wh.read("int_chains").iter_rows(named=True)}


# ---- units ------------------------------------------------------------------------------------------
def test_split_jobs_respects_request_and_byte_limits():
    from extractors.llm.batch import jsonl_line, split_jobs

    lines = [(f"id{i}", jsonl_line(f"id{i}", json.dumps({"n": "x" * (10 * i)}).encode())) for i in range(10)]
    by_count = split_jobs(lines, max_requests=4, max_bytes=10**9)
    assert [len(j) for j in by_count] == [4, 4, 2]
    limit = 400
    by_bytes = split_jobs(lines, max_requests=1000, max_bytes=limit)
    assert all(sum(len(line) for _, line in job) <= limit for job in by_bytes)
    assert [cid for job in by_bytes for cid, _ in job] == [cid for cid, _ in lines]  # order kept, nothing lost
    assert len(by_bytes) > 1
    with pytest.raises(ValueError):
        split_jobs(lines, max_requests=10, max_bytes=50)
    # Each line is a valid Batch API input line whose body is the exact request.
    item = json.loads(lines[3][1])
    assert item == {"custom_id": "id3", "method": "POST", "url": "/v1/chat/completions", "body": {"n": "x" * 30}}


def test_fake_batch_api_speaks_the_openai_client_types(responder):
    """files.create / batches.create / retrieve / files.content through the real openai client and its types."""
    from openai import OpenAI
    from openai.types import Batch, FileObject

    server = _server(responder, batch_delay_s=0.1, batch_failure_rate=0.5, seed=2)
    try:
        client = OpenAI(api_key="sk-x", base_url=server.base_url)
        body = {"model": GPT4O}
        data = b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                    "body": {**body, "messages": [{"role": "user", "content": f"hi {i}"}]}}).encode()
                        + b"\n" for i in range(10))
        f = client.files.create(file=("in.jsonl", data, "application/jsonl"), purpose="batch")
        assert isinstance(f, FileObject) and f.bytes == len(data) and f.purpose == "batch"
        assert [x.id for x in client.files.list(purpose="batch")] == [f.id]
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"k": "v"})
        assert isinstance(b, Batch) and b.status == "validating" and b.metadata == {"k": "v"}
        while b.status not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(0.05)
            b = client.batches.retrieve(b.id)
        assert b.status == "completed" and b.request_counts.total == 10
        assert b.request_counts.completed + b.request_counts.failed == 10 and b.request_counts.failed > 0
        out = [json.loads(x) for x in client.files.content(b.output_file_id).content.splitlines()]
        err = [json.loads(x) for x in client.files.content(b.error_file_id).content.splitlines()]
        assert {o["custom_id"] for o in out} | {e["custom_id"] for e in err} == {f"r{i}" for i in range(10)}
        assert all(o["response"]["status_code"] == 200 and o["response"]["body"]["object"] == "chat.completion"
                   and "prompt_tokens_details" in o["response"]["body"]["usage"] for o in out)
        assert all(e["response"]["status_code"] == 500 for e in err)
        assert [x.id for x in client.batches.list()] == [b.id]
    finally:
        server.stop()


def test_resumes_a_batch_whose_id_was_never_stored(responder, tmp_path):
    """A run killed after batches.create returned but before the id was stored: the next run finds the
    batch by its metadata and polls it; nothing is uploaded or paid again."""
    from extractors.llm.batch import BatchTransport
    from radchain.settings import LLMSettings
    from warehouse.llm_batches import SQLiteBatchStore

    server = _server(responder, batch_delay_s=0.3)
    try:
        settings = LLMSettings(base_url=server.base_url, api_key="sk-x", model=GPT4O, batch_poll_s=0.05)
        store = SQLiteBatchStore(tmp_path)
        payloads = [json.dumps({"model": GPT4O, "messages": [{"role": "user", "content": f"q{i}"}]}).encode()
                    for i in range(5)]

        async def first() -> None:
            transport = BatchTransport(settings, store)
            tasks = [asyncio.ensure_future(transport.submit(p)) for p in payloads]
            # Uploaded, created and its id stored: now "crash". (The fake server lists the batch before
            # its response reaches the client; on a loaded machine the client had not yet stored the id
            # when the test cancelled it, and the run below removes the id on purpose anyway.)
            deadline = time.monotonic() + 30
            while not (server.batches and any(j.batch_id for j in store.jobs())):
                assert time.monotonic() < deadline, "the batch was never created and stored"
                await asyncio.sleep(0.01)
            for t in tasks:
                t.cancel()
            await transport.aclose()

        asyncio.run(first())
        (job,) = store.jobs()
        assert job.batch_id is not None
        store._db.execute("UPDATE batch_jobs SET batch_id = NULL, file_id = NULL, status = 'uploading'")

        async def second():
            transport = BatchTransport(settings, store)
            try:
                return await asyncio.gather(*(transport.submit(p) for p in payloads)), transport
            finally:
                await transport.aclose()

        answers, transport = asyncio.run(second())
        assert len(server.batches) == 1 and len([f for f in server.files.values() if f["purpose"] == "batch"]) == 1
        assert transport.jobs_started == 0 and transport.jobs_resumed == 1
        assert {bid for _, bid in answers} == set(server.batches)
        assert all(v == 1 for v in server.batch_executions.values()) and len(server.batch_executions) == 5

        async def third():  # answered before: served from the store, no network at all
            transport = BatchTransport(settings, store)
            try:
                return await asyncio.gather(*(transport.submit(p) for p in payloads))
            finally:
                await transport.aclose()

        requests_before = len(server.batches)
        assert [a for a, _ in asyncio.run(third())] == [a for a, _ in answers]
        assert len(server.batches) == requests_before
    finally:
        server.stop()


def test_batch_mode_splits_waves_and_refines_in_the_next_batch(pristine, responder, tmp_path, monkeypatch):
    """The paper protocol in batch mode: plan, steps and polish calls are consecutive waves (batches), each
    split by the per-batch request limit; the ledger says mode=batch with batch ids and Batch API prices."""
    server = _server(responder, batch_delay_s=0.05)
    try:
        home = fresh_home(pristine, tmp_path / "paper")
        ctx, results = mine(monkeypatch, home, server.base_url, env={"RADCHAIN_LLM_BATCH_MAX_REQUESTS": "50"},
                            llm_mode="batch", protocol="paper")
        samples = sum(r.inputs for r in results)
        assert sum(r.outputs + r.rejected + r.skipped for r in results) == samples
        calls = ctx.warehouse.read("int_llm_calls").filter(pl.col("run_id") == ctx.run_id)
        assert set(calls["mode"]) == {"batch"} and calls["openai_batch_id"].null_count() == 0
        assert server.requests == 0  # nothing went through chat completions
        sizes = [b["request_counts"]["total"] for b in server.batches.values()]
        assert max(sizes) <= 50
        assert len(server.batches) >= 3 * -(-samples // len(results) // 50)  # three waves per mine batch, split
        by_stage = calls.group_by("stage").agg(pl.col("openai_batch_id").n_unique())
        assert set(by_stage["stage"]) >= {"plan", "steps", "polish"}
        # Each stage's calls came from batches that held only that wave (no plan call shares a batch with a steps call).
        per_batch = calls.group_by("openai_batch_id").agg(pl.col("stage").n_unique().alias("n"))
        assert per_batch["n"].max() == 1
        from extractors.llm.pricing import cost_usd

        for r in calls.head(10).iter_rows(named=True):
            assert r["cost_usd"] == pytest.approx(cost_usd(GPT4O, r["prompt_tokens"], r["completion_tokens"],
                                                           ctx.settings.llm.price_per_mtok, mode="batch"))
    finally:
        server.stop()


# ---- done when ------------------------------------------------------------------------------------------
_KILLED_RUN = textwrap.dedent("""
    from flows.pipeline import make_context, run_stages
    ctx = make_context(extractor="llm", show_progress=False, llm_mode="batch")
    run_stages(ctx, ["mine"])
    raise SystemExit("the run should have been killed before it finished")
""")


def test_batch_run_survives_failures_expiry_and_sigkill_with_the_sync_chains(pristine, responder, tmp_path,
                                                                          monkeypatch):
    # The sync path on the same answers (no faults): the reference chains.
    sync_server = _server(responder)
    try:
        ref_ctx, ref_results = mine(monkeypatch, fresh_home(pristine, tmp_path / "sync"), sync_server.base_url)
        reference = _chains(ref_ctx.warehouse)
    finally:
        sync_server.stop()
    assert reference

    # The batch run: 5% of requests fail (500 in the error file), the first batch expires half done, and the run
    # is SIGKILLed after its first batch was uploaded and created, while it polls.
    server = _server(responder, batch_delay_s=1.5, batch_failure_rate=0.05, expire_batches=1, seed=5)
    home = fresh_home(pristine, tmp_path / "batch")
    try:
        env = {**os.environ, **llm_env(home, server.base_url), "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN], env=env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not server.batches and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.batches, proc.communicate()[0].decode()[-3000:] if proc.poll() is not None else "no batch"
        first_batch = next(iter(server.batches.values()))
        assert first_batch["status"] in ("validating", "in_progress")  # uploaded, not completed
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        killed_batches = set(server.batches)

        ctx, results = mine(monkeypatch, home, server.base_url, llm_mode="batch")
    finally:
        server.stop()

    # The restarted run polled the batch the killed run had paid for instead of creating it again.
    assert first_batch["status"] == "expired" and server.batches_expired == 1
    created = [b for b in server.batches.values() if b["id"] not in killed_batches]
    first_keys = {b["metadata"]["radchain_job"] for b in server.batches.values() if b["id"] in killed_batches}
    assert not first_keys & {b["metadata"]["radchain_job"] for b in created}
    assert server.batch_lines_failed > 0  # the 5% failures happened, and were retried
    # No request paid twice: every custom_id (the request body's hash) was answered at most once.
    assert server.batch_executions and max(server.batch_executions.values()) == 1

    # Every sample accounted for, in the audit and in the tables.
    audit = ctx.warehouse.read("audit_stage_counts").filter(pl.col("stage") == "mine")
    assert (audit["inputs"] == audit["outputs"] + audit["rejected"] + audit["skipped"]).all()
    n_samples = ctx.warehouse.read("int_vqa_samples").height
    assert int(audit["inputs"].sum()) == n_samples
    assert int(audit["skipped"].sum()) == 0

    # The same chains as the sync path.
    assert _chains(ctx.warehouse) == reference
    rejected = ctx.warehouse.read("int_rejections").filter(pl.col("stage") == "mine")
    ref_rejected = ref_ctx.warehouse.read("int_rejections").filter(pl.col("stage") == "mine")
    assert sorted(rejected["entity_id"]) == sorted(ref_rejected["entity_id"])

    # The ledger: every answered request once, as batch calls with their batch ids, and the expiry/failures
    # retried (no call ended in an error).
    calls = ctx.warehouse.read("int_llm_calls")
    fresh = calls.filter(~pl.col("cache_hit"))
    assert set(fresh["mode"]) == {"batch"} and fresh["openai_batch_id"].null_count() == 0
    assert fresh.filter(pl.col("status") == "error").height == 0
    assert fresh["request_hash"].n_unique() == fresh.height
    assert fresh.height == sum(server.batch_executions.values())
    assert fresh.filter(pl.col("attempts") > 1).height > 0  # retried requests count their attempts


def test_a_cancelled_batch_is_retried_in_the_next_one(responder, tmp_path):
    """Someone cancels the running batch (e.g. in the dashboard): its requests come back as batch_cancelled
    errors and go out again in a new batch; each is answered (paid) once."""
    from openai import OpenAI

    from extractors.llm.batch import BatchTransport
    from radchain.settings import LLMSettings
    from warehouse.llm_batches import SQLiteBatchStore

    server = _server(responder, batch_delay_s=0.6)
    try:
        settings = LLMSettings(base_url=server.base_url, api_key="sk-x", model=GPT4O, batch_poll_s=0.05)
        payloads = [json.dumps({"model": GPT4O, "messages": [{"role": "user", "content": f"c{i}"}]}).encode()
                    for i in range(6)]

        async def go():
            transport = BatchTransport(settings, SQLiteBatchStore(tmp_path))

            async def cancel_first():
                while not server.batches:
                    await asyncio.sleep(0.01)
                bid = next(iter(server.batches))
                await asyncio.to_thread(OpenAI(api_key="sk-x", base_url=server.base_url).batches.cancel, bid)

            async def ask(p):  # what LLMClient does with a retryable failure: submit again
                for _ in range(3):
                    try:
                        return await transport.submit(p)
                    except Exception as e:  # noqa: BLE001
                        assert getattr(e, "radchain_code", None) == "BATCH_CANCELLED" and e.retryable
                raise AssertionError("not answered")

            try:
                canceller = asyncio.ensure_future(cancel_first())
                answers = await asyncio.gather(*(ask(p) for p in payloads))
                await canceller
                return answers
            finally:
                await transport.aclose()

        answers = asyncio.run(go())
        statuses = [b["status"] for b in server.batches.values()]
        assert statuses[0] == "cancelled" and statuses[-1] == "completed" and len(statuses) == 2
        assert {bid for _, bid in answers} == {list(server.batches)[1]}
        assert sorted(server.batch_executions.values()) == [1] * 6
    finally:
        server.stop()


def test_budget_applies_in_batch_mode(pristine, responder, tmp_path, monkeypatch):
    server = _server(responder, batch_delay_s=0.05)
    try:
        full_ctx, _ = mine(monkeypatch, fresh_home(pristine, tmp_path / "full"), server.base_url, llm_mode="batch")
        full = float(full_ctx.warehouse.read("int_llm_calls")["cost_usd"].sum())
        cap = round(full / 2, 6)
        ctx, results = mine(monkeypatch, fresh_home(pristine, tmp_path / "capped"), server.base_url,
                            env={"RADCHAIN_LLM_BUDGET_USD": str(cap)}, llm_mode="batch")
        spent = float(ctx.warehouse.read("int_llm_calls")["cost_usd"].sum())
        assert spent <= cap  # a batch wave is reserved in full before it is uploaded
        assert sum(r.skipped for r in results) > 0 and {r.skip_reason for r in results if r.skipped} == {"BUDGET"}
        assert all(r.inputs == r.outputs + r.rejected + r.skipped for r in results)
    finally:
        server.stop()
