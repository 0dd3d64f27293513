"""LLM cost controls against the fake OpenAI server over HTTP: the price table, prompt caching
(cached_tokens in the ledger), the run budget (BUDGET skips), and `radchain estimate`."""

from __future__ import annotations

import asyncio
import json
import time

import polars as pl
import pytest
from llmcost_support import build_pristine, fresh_home, llm_env, mine

from radchain.settings import LLMSettings, ModelPrice

GPT4O = "gpt-4o-2024-08-06"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return build_pristine(tmp_path_factory.mktemp("llm-cost"))


@pytest.fixture(scope="module")
def server(pristine):
    from radchain.testing import FakeOpenAIServer
    from flows.testing import chain_responder

    responder = chain_responder(pristine).warm()
    with FakeOpenAIServer(responder=responder, model=GPT4O) as s:
        s.responder_obj = responder
        yield s


# ---- prices -----------------------------------------------------------------------------------------
def test_price_table_rates_and_cached_input():
    from extractors.llm.pricing import cost_usd, model_price

    table = LLMSettings().price_per_mtok
    # OpenAI's list prices for GPT-4o-2024-08-06 (USD per 1M tokens): $2.50 in, $1.25 cached, $10 out; batch half.
    assert model_price(GPT4O, table).rates("sync") == (2.5, 1.25, 10.0)
    assert model_price(GPT4O, table).rates("batch") == (1.25, 1.25, 5.0)
    # 1,000 prompt tokens of which 600 cached, 100 completion tokens: 400*2.5 + 600*1.25 + 100*10 per 1M.
    assert cost_usd(GPT4O, 1000, 100, table, cached_tokens=600) == pytest.approx((1000 + 750 + 1000) / 1e6)
    assert cost_usd(GPT4O, 1000, 100, table, mode="batch") == pytest.approx((1250 + 500) / 1e6)
    assert cost_usd("gpt-4o-mini-2024-07-18", 1_000_000, 0, table) == pytest.approx(0.15)  # prefix match
    # The old [input, output] form still validates, with the cached and batch prices falling back to it.
    legacy = LLMSettings(price_per_mtok={"m": [1.0, 2.0]}).price_per_mtok["m"]
    assert isinstance(legacy, ModelPrice) and legacy.rates("batch") == (1.0, 1.0, 2.0)


# ---- prompt caching -----------------------------------------------------------------------------------
def test_fake_server_reports_cached_tokens_for_a_repeated_long_prefix(server):
    from extractors.llm.client import LLMClient

    settings = LLMSettings(base_url=server.base_url, api_key="sk-x", model=GPT4O, max_attempts=1)
    static = "Instructions that every request shares. " * 120  # 4,800 characters = 1,200 tokens
    server.clear_prompt_cache()

    async def go():
        async with LLMClient(settings) as client:
            rows = []
            for sample in ("one", "two"):
                r = await client.complete_text([{"role": "system", "content": static},
                                                {"role": "user", "content": f"sample {sample}"}],
                                               stage="plan", sample_id=sample, prompt_version="t")
                rows += r.calls
            short = await client.complete_text([{"role": "user", "content": "short prompt " * 10}],
                                               stage="plan", sample_id="s", prompt_version="t")
            short2 = await client.complete_text([{"role": "user", "content": "short prompt " * 10 + "x"}],
                                                stage="plan", sample_id="s2", prompt_version="t")
            return rows, short.calls + short2.calls

    rows, short = asyncio.run(go())
    assert rows[0]["cached_tokens"] == 0  # a cold cache
    # 1,200 shared tokens: cached in 1,024 + k*128 steps -> 1,152.
    assert rows[1]["cached_tokens"] == 1152
    assert rows[1]["prompt_tokens"] == rows[0]["prompt_tokens"]
    assert rows[1]["cost_usd"] < rows[0]["cost_usd"]
    expected = ((rows[1]["prompt_tokens"] - 1152) * 2.5 + 1152 * 1.25 + rows[1]["completion_tokens"] * 10) / 1e6
    assert rows[1]["cost_usd"] == pytest.approx(expected)
    assert [r["cached_tokens"] for r in short] == [0, 0]  # below 1,024 tokens nothing is cached
    assert all(r["mode"] == "sync" and r["openai_batch_id"] is None for r in rows)


def test_mining_with_a_long_static_prefix_records_cached_tokens(pristine, server, tmp_path, monkeypatch):
    """single-v3 puts >= 1,024 tokens of static instructions and few-shot examples first; every call after the
    first is served partly from the prompt cache, and the ledger says so."""
    server.clear_prompt_cache()
    home = fresh_home(pristine, tmp_path / "home")
    ctx, results = mine(monkeypatch, home, server.base_url, prompt_version="single-v3")
    calls = ctx.warehouse.read("int_llm_calls").filter(pl.col("run_id") == ctx.run_id)
    fresh = calls.filter(~pl.col("cache_hit") & (pl.col("stage") == "single"))
    assert fresh.height == sum(r.inputs for r in results)
    cached = fresh["cached_tokens"].to_list()
    assert sum(c == 0 for c in cached) <= 8  # only requests sent before the first answer find the cache cold
    assert min(c for c in cached if c) >= 1024
    assert fresh.filter(pl.col("cached_tokens") > 0)["prompt_tokens"].min() >= 1024
    # The ledger prices cached input at the cached rate.
    table = ctx.settings.llm.price_per_mtok
    from extractors.llm.pricing import cost_usd

    for r in fresh.head(20).iter_rows(named=True):
        assert r["cost_usd"] == pytest.approx(cost_usd(GPT4O, r["prompt_tokens"], r["completion_tokens"], table,
                                                       cached_tokens=r["cached_tokens"]))
    assert sum(r.outputs for r in results) > 0.9 * sum(r.inputs for r in results)


# ---- budget -------------------------------------------------------------------------------------------
def test_budget_stops_mining_at_the_cap_with_budget_skips(pristine, server, tmp_path, monkeypatch):
    from flows.progress import StageProgress

    # What the whole run costs without a cap (same answers, fresh cache), to set a cap at 40% of it.
    full_ctx, _ = mine(monkeypatch, fresh_home(pristine, tmp_path / "full"), server.base_url)
    full = full_ctx.warehouse.read("int_llm_calls").filter(pl.col("run_id") == full_ctx.run_id)
    per_sample = full.group_by("sample_id").agg(pl.col("cost_usd").sum())["cost_usd"]
    cap = round(0.4 * float(full["cost_usd"].sum()), 6)

    progress = StageProgress("mine", 10_000, show_bar=False)
    ctx, results = mine(monkeypatch, fresh_home(pristine, tmp_path / "capped"), server.base_url,
                        env={"RADCHAIN_LLM_BUDGET_USD": str(cap)}, progress=progress)
    spent = float(ctx.warehouse.read("int_llm_calls").filter(pl.col("run_id") == ctx.run_id)["cost_usd"].sum())
    workers = 2 * ctx.settings.llm.max_concurrency  # samples in flight at once (extract_many's pool)
    one_wave = workers * float(per_sample.max())
    assert spent <= cap + one_wave
    # It stopped at the cap, not long before: once calibrated on the first samples' actual cost, the
    # estimates are close, so only about one wave's reservations separate the spend from the cap.
    assert spent > cap - one_wave

    audit = ctx.warehouse.read("audit_stage_counts").filter(pl.col("stage") == "mine")
    assert (audit["inputs"] == audit["outputs"] + audit["rejected"] + audit["skipped"]).all()
    skipped = int(audit["skipped"].sum())
    assert skipped > 0 and set(audit.filter(pl.col("skipped") > 0)["skip_reason"]) == {"BUDGET"}
    mined = ctx.warehouse.read("int_chains").height + ctx.warehouse.read("int_rejections").filter(
        pl.col("stage") == "mine").height
    assert mined + skipped == int(audit["inputs"].sum())
    # Skipped samples made no call.
    called = set(ctx.warehouse.read("int_llm_calls").filter(pl.col("run_id") == ctx.run_id)["sample_id"])
    assert len(called) == mined
    # The live spend line saw every call of the run.
    assert progress.spent_usd == pytest.approx(spent)
    assert progress.spend_line().startswith("LLM spend $")

    from flows.stages.mine import budget_summary

    line = budget_summary(ctx)
    assert line.startswith("budget reached") and f"{skipped} samples not mined" in line

    # A re-run with a higher cap mines the rest; the samples mined before are cache hits and cost nothing.
    ctx2, results2 = mine(monkeypatch, ctx.settings.home, server.base_url,
                          env={"RADCHAIN_LLM_BUDGET_USD": str(10 * cap)})
    assert sum(r.skipped for r in results2) == 0
    again = ctx2.warehouse.read("int_llm_calls").filter(pl.col("run_id") == ctx2.run_id)
    assert set(again.filter(~pl.col("cache_hit"))["sample_id"]).isdisjoint(called)


def test_budget_unit_admits_until_the_cap_then_closes():
    from extractors.llm.budget import Budget

    b = Budget(1.0, spent_usd=0.2)
    assert b.admit(0.5) and not b.admit(0.4)  # 0.2 + 0.5 + 0.4 > 1.0
    assert not b.admit(0.01)  # closed: no sample starts after the first refusal
    b.settle(0.5, 0.45)
    assert b.spent_usd == pytest.approx(0.65) and b.in_flight_usd == pytest.approx(0.0) and b.refused == 2


def test_run_budget_option_prints_the_closing_line(pristine, server, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from radchain.settings import reset_settings_cache

    home = fresh_home(pristine, tmp_path / "cli")
    for k, v in llm_env(home, server.base_url).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    reset_settings_cache()
    out = CliRunner().invoke(app, ["run", "--stages", "mine", "--extractor", "llm", "--budget", "0.002"])
    assert out.exit_code == 0, out.output
    assert "budget reached" in out.output and "BUDGET" in out.output


# ---- estimate -----------------------------------------------------------------------------------------
def test_estimate_matches_the_ledger_within_ten_percent(pristine, server, tmp_path, monkeypatch):
    from flows.commands.estimate import compute_estimates
    from radchain.settings import get_settings, reset_settings_cache

    home = fresh_home(pristine, tmp_path / "est")
    for k, v in llm_env(home, server.base_url).items():
        monkeypatch.setenv(k, v)
    reset_settings_cache()
    server.reset_counters()
    (before,), planned, built = compute_estimates(get_settings(), protocols=["single"])
    assert server.requests == 0  # no network call
    assert planned == built and before.samples == planned
    assert before.total.usd_batch == pytest.approx(before.total.usd_sync / 2, rel=0.01)
    ctx, results = mine(monkeypatch, home, server.base_url)
    ledger = ctx.warehouse.read("int_llm_calls").filter((pl.col("run_id") == ctx.run_id) & ~pl.col("cache_hit"))
    ledger_in = int(ledger["prompt_tokens"].sum())
    assert abs(before.total.input_tokens - ledger_in) <= 0.10 * ledger_in
    # After the run the ledger's history replaces the assumptions: output tokens and refinement rates.
    (after,), _, _ = compute_estimates(get_settings(), protocols=["single"])
    from flows.commands.estimate import comparison_line, ledger_actuals

    actual = ledger_actuals(get_settings(), GPT4O, "single-v2")
    assert actual["run_id"] == ctx.run_id and actual["input_tokens"] == ledger_in and actual["modes"] == ["sync"]
    assert f"input {ledger_in} " in comparison_line(before, actual)
    assert "ledger" in after.stages[0].output_source
    assert abs(after.total.output_tokens - ledger["completion_tokens"].sum()) <= 0.10 * ledger["completion_tokens"].sum()
    assert abs(after.total.input_tokens - ledger_in) <= 0.10 * ledger_in


def test_estimate_command_prints_a_table_per_protocol(pristine, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from radchain.settings import reset_settings_cache

    home = fresh_home(pristine, tmp_path / "cmd")
    monkeypatch.setenv("RADCHAIN_HOME", str(home))
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    reset_settings_cache()
    t0 = time.perf_counter()
    out = CliRunner().invoke(app, ["estimate", "--no-artifact", "--budget", "0.01"])
    assert out.exit_code == 0, out.output
    assert "LLM cost estimate" in out.output and "usd_batch" in out.output
    for stage in ("single", "plan", "steps", "polish", "refine", "total"):
        assert f" {stage} " in out.output
    assert "budget $0.01" in out.output and "exceeds" in out.output
    assert "assumed" in out.output  # no ledger yet: the output tokens are a stated assumption
    print(f"estimate command: {time.perf_counter() - t0:.2f}s")


def test_estimate_artifact_is_published(pristine, tmp_path, monkeypatch):
    from flows.commands.estimate import ARTIFACT_KEY, compute_estimates, estimate_rows, publish_artifact
    from radchain.settings import Settings

    settings = Settings(home=fresh_home(pristine, tmp_path / "art"))
    estimates, _, _ = compute_estimates(settings, protocols=["single"], sample=20)
    rows = estimate_rows(estimates)
    publish_artifact(rows, estimates[0].assumptions)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[ARTIFACT_KEY])))

    artifacts = asyncio.run(read())
    assert artifacts and json.loads(artifacts[0].data)[-1]["stage"] == "total"


def test_run_dry_run_prints_the_estimate_and_calls_nothing(pristine, server, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from radchain.settings import reset_settings_cache

    home = fresh_home(pristine, tmp_path / "dry")
    for k, v in llm_env(home, server.base_url).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("COLUMNS", "200")
    reset_settings_cache()
    server.reset_counters()
    out = CliRunner().invoke(app, ["run", "--stages", "mine", "--extractor", "llm", "--dry-run", "--llm-mode", "batch",
                                   "--budget", "1000", "--prompt-version", "single-v3"])
    assert out.exit_code == 0, out.output
    assert "LLM cost estimate" in out.output and "single=single-v3" in out.output
    assert "single batch estimate" in out.output and "fits" in out.output
    assert server.requests == 0 and not server.batches  # nothing was mined
    from warehouse import Warehouse

    assert Warehouse(home / "warehouse").partitions("int_chains") == []
