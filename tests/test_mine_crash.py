"""A mine run killed mid-way (SIGKILL) and run again: it finishes, with no duplicate or torn rows, and no
completed LLM call is made twice.

``radchain run --stages mine --extractor llm`` runs in a subprocess (its own session, so the
kill also takes the Prefect temporary API server it starts) against a fake OpenAI server in
this process (60 ms latency, 4 concurrent requests, a few 429s, malformed replies and
ungrounded chains). Once the server has seen about half of the run's requests the test
stalls the server (new requests wait; the ones already being answered finish), gives the
client a moment to store what it received, and SIGKILLs the process group. The stall makes
"completed" exact: without it a reply that reached the socket but was not yet written to
the cache when the process died would, correctly, be asked again, and the count below would
be off by that reply. The stage itself is not paused: it is killed with requests in flight,
some batches written and others not.

A completed call is one whose answer the fake model produced (a valid chain; malformed
replies are repaired within the same logical request and are not complete on their own).
The server side tracks them by request-body digest; the client side is the SQLite response
cache and the int_llm_calls ledger of the second run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

STUDIES = 40
BATCH_SIZE = 8  # reports per ingest partition: five mine batches
LATENCY_S = 0.06
FAULTS = dict(rate_limit=0.05, malformed_json=0.03, ungrounded=0.03)
KILL_AT = 0.45  # share of the expected requests seen by the server before the kill
RUN_TIMEOUT_S = 150


def body_digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class Recording:
    """Wraps a responder: which request bodies got a real answer, per phase."""

    def __init__(self, inner):
        self.inner = inner
        self.phase = 1
        self.completed: dict[int, list[str]] = {1: [], 2: []}
        self._lock = threading.Lock()

    def __call__(self, body: dict) -> str:
        out = self.inner(body)
        with self._lock:
            self.completed[self.phase].append(body_digest(body))
        return out


def radchain_run(home: Path, cwd: Path, env_extra: dict[str, str], corpus: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(env_extra)
    env.update(RADCHAIN_HOME=str(home), PREFECT_HOME=str(cwd / "prefect-home"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-c", "from flows.cli import app; app()",
           "run", "--source", str(corpus), "--stages", "mine", "--extractor", "llm"]
    with open(cwd / f"run-{time.monotonic_ns()}.log", "wb") as log:  # the child keeps its own copy of the fd
        # A new session: the kill goes to the whole group (the CLI and Prefect's temporary API server).
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def cache_hashes(home: Path) -> set[str]:
    path = home / "cache" / "llm-responses.sqlite3"
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {r[0] for r in con.execute("SELECT request_hash FROM llm_responses")}
    finally:
        con.close()


def test_killed_mine_run_resumes_without_duplicates_or_repeated_calls(tmp_path, monkeypatch):
    from extractors.synthetic import generate_corpus
    from flows.pipeline import make_context, run_stages
    from flows.stages.common import SourceSpec
    from flows.stages.mine import MineStage
    from radchain.settings import reset_settings_cache
    from radchain.testing import FakeOpenAIServer
    from flows.testing import chain_responder
    from warehouse import Warehouse

    corpus, home = tmp_path / "corpus", tmp_path / "home"
    generate_corpus(corpus, studies=STUDIES, seed=11, images=False)
    monkeypatch.setenv("RADCHAIN_HOME", str(home))
    monkeypatch.setenv("RADCHAIN_BATCH_SIZE", str(BATCH_SIZE))
    reset_settings_cache()
    ctx = make_context(source=SourceSpec(path=corpus), extractor="rules", show_progress=False)
    run_stages(ctx, ["ingest", "label", "tasks"])
    wh = ctx.warehouse
    samples = wh.read("int_vqa_samples")
    n_batches = len(MineStage(ctx).plan())
    assert n_batches >= 4

    recording = Recording(chain_responder(wh).warm())
    server = FakeOpenAIServer(responder=recording, latency_s=LATENCY_S, faults=FAULTS, seed=3, retry_after_s=0.05)
    server.start()
    env = {"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "sk-test-crash", "RADCHAIN_LLM_MAX_CONCURRENCY": "4",
           "RADCHAIN_LLM_REQUESTS_PER_MINUTE": "0", "RADCHAIN_LLM_TOKENS_PER_MINUTE": "0",
           "RADCHAIN_LLM_TIMEOUT_S": "20"}
    procs: list[subprocess.Popen] = []
    try:
        # ---- run 1: killed mid-stage -----------------------------------------------------------
        first = radchain_run(home, tmp_path, env, corpus)
        procs.append(first)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while server.requests < KILL_AT * samples.height:
            assert first.poll() is None, "the run ended before it could be killed: " + _log_tail(tmp_path)
            assert time.monotonic() < deadline, "the run made too few requests in time: " + _log_tail(tmp_path)
            time.sleep(0.02)
        server.latency_s = 3600.0  # stall new requests; those already sleeping finish and are answered
        time.sleep(1.0)  # the client stores every answer it received
        os.killpg(first.pid, signal.SIGKILL)
        assert first.wait(timeout=30) == -signal.SIGKILL
        in_flight_at_kill = server.in_flight

        written = wh.partitions("int_chains")
        assert 0 < len(written) < n_batches, f"killed mid-stage: {len(written)} of {n_batches} batches written"
        cached_after_kill = cache_hashes(home)
        completed1 = list(recording.completed[1])
        assert completed1 and len(cached_after_kill) > 0
        assert in_flight_at_kill > 0, "requests were in flight when the process died"

        # ---- run 2: to completion --------------------------------------------------------------
        server.latency_s = LATENCY_S
        server.reset_counters()
        recording.phase = 2
        second = radchain_run(home, tmp_path, env, corpus)
        procs.append(second)
        assert second.wait(timeout=RUN_TIMEOUT_S) == 0, _log_tail(tmp_path)
        run2_bodies = [body_digest(b) for b in server.bodies]
        run2_requests = server.requests
        completed2 = list(recording.completed[2])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
        server.stop()

    # ---- no half-written Parquet, no duplicates -----------------------------------------------------
    Warehouse(wh.root).ensure()
    assert not list(wh.parquet_dir.rglob(".*.tmp-*"))
    for f in wh.parquet_dir.rglob("*.parquet"):
        pq.read_table(f)  # every file is whole
    chains, steps = wh.read("int_chains"), wh.read("int_chain_steps")
    rejections = wh.read("int_rejections").filter(pl.col("stage") == "mine")
    assert chains["chain_id"].n_unique() == chains.height == chains["sample_id"].n_unique()
    assert steps.select("chain_id", "step_index").unique().height == steps.height
    assert rejections["entity_id"].n_unique() == rejections.height
    accepted, rejected = set(chains["sample_id"].to_list()), set(rejections["entity_id"].to_list())
    assert not accepted & rejected and accepted | rejected == set(samples["sample_id"].to_list())
    audit = wh.read("audit_stage_counts").filter(pl.col("stage") == "mine")
    assert audit.height == n_batches and audit["inputs"].sum() == samples.height
    assert audit["run_id"].n_unique() == 1  # every batch's audit row is the finishing run's
    run2_id = audit["run_id"][0]

    # ---- completed calls are not repeated (server side) ---------------------------------------------
    repeated = Counter(d for d in run2_bodies if d in set(completed1))
    assert sum(repeated.values()) == 0, f"{sum(repeated.values())} completed requests were sent again"
    both = completed1 + completed2
    assert len(both) == len(set(both)), "every request was answered exactly once across the two runs"
    assert completed2, "the second run did have work left"

    # ---- ... and the ledger of run 2 says so (client side) ------------------------------------------
    calls = wh.read("int_llm_calls").filter(pl.col("run_id") == run2_id)
    hits = calls.filter(pl.col("cache_hit"))
    assert hits.height > 0
    fresh = calls.filter(~pl.col("cache_hit"))
    # Every answer cached before the kill is reused; any other hit is of an answer run 2 itself obtained.
    assert set(hits["request_hash"].to_list()) - cached_after_kill <= set(fresh["request_hash"].to_list())
    assert cached_after_kill <= set(hits["request_hash"].to_list())
    assert calls.filter(pl.col("request_hash").is_in(list(cached_after_kill)))["cache_hit"].all()
    assert fresh["attempts"].sum() == run2_requests
    assert not set(fresh["request_hash"].to_list()) & cached_after_kill

    # ---- ... and the killed run's spend is in the ledger too, under its own run id ------------------
    # Batches it finished wrote their ledger partition; the calls of the batches it was killed in were
    # journaled as they were made and written by run 2 (warehouse/llm_journal.py).
    run1 = wh.read("int_llm_calls").filter(pl.col("run_id") != run2_id)
    assert run1["run_id"].n_unique() == 1 and not run1["cache_hit"].any()
    run1_ok = run1.filter(pl.col("status") == "ok")
    assert run1_ok["request_hash"].n_unique() == run1_ok.height, "no call recorded twice"
    # Every answer the killed run received and cached is a row of its own (a repaired answer is cached
    # under the hash of the request whose first answer was invalid).
    assert cached_after_kill <= set(run1_ok["request_hash"].to_list()) | _repaired_originals(run1)
    killed_batches = set(run1["batch_id"].to_list()) - set(written)
    assert killed_batches, "some of run 1's ledger rows came from the journal"
    assert int(run1["prompt_tokens"].sum()) > 0 and float(run1["cost_usd"].sum()) >= 0.0
    assert not list((home / "cache").glob("*.sqlite3-journal"))
    con = sqlite3.connect(f"file:{home / 'cache' / 'llm-call-journal.sqlite3'}?mode=ro", uri=True)
    try:
        assert con.execute("SELECT count(*) FROM llm_call_journal").fetchone()[0] == 0, "journal emptied"
    finally:
        con.close()


def _repaired_originals(calls: pl.DataFrame) -> set[str]:
    """Hashes whose first answer was invalid and repaired: the cache holds them under the original hash."""
    return set(calls.filter(pl.col("status") == "invalid")["request_hash"].to_list())


def _log_tail(folder: Path) -> str:
    logs = sorted(folder.glob("run-*.log"))
    return logs[-1].read_text(errors="replace")[-3000:] if logs else "(no log)"


@pytest.fixture(autouse=True)
def _settings_cache():
    from radchain.settings import reset_settings_cache

    reset_settings_cache()
    yield
    reset_settings_cache()
