"""`radchain estimate`: what LLM mining of the planned samples will cost, without any network call.

It reads the samples the mine stage would mine (int_vqa_samples with their reports and
labels), builds each one's prompts with the extractor's templates, and prints per protocol and
stage: calls, input, cached and output tokens, and dollars in sync and Batch API mode
(extractors.llm.estimate explains where each figure comes from). The same table is published
as a Prefect table artifact (key ``mine-cost-estimate``). ``radchain run --dry-run`` ends with it.
"""

from __future__ import annotations

import random
import time
from typing import Any

import typer

from flows.cli_support import UsageError, clear_errors, console, print_arrow

ARTIFACT_KEY = "mine-cost-estimate"


def compute_estimates(settings: Any, *, protocols: list[str], sample: int | None = None,
                      seed: int = 13, prompt_version: str | None = None) -> tuple[list[Any], int, int]:
    """(one Estimate per protocol, samples planned, samples whose prompts were built)."""
    from extractors.chains.llm_backend import LLMChainExtractor
    from extractors.llm.client import LLMClient
    from extractors.llm.estimate import CostEstimator
    from flows.stages import mine
    from flows.stages.common import RunContext
    from warehouse import Warehouse

    # Not flows.pipeline.make_context: importing Prefect alone would take seconds of the estimate's budget.
    ctx = RunContext(settings=settings, warehouse=Warehouse(settings.warehouse_dir).ensure(), run_id="estimate",
                     options={"extractor": "llm"})
    ids = [sid for b in mine.plan_batches(ctx) for sid in b["sample_ids"]]
    if not ids:
        raise UsageError("no samples to mine: run the stages before mine first (radchain run --stages "
                         "ingest,label,tasks), or radchain run --dry-run")
    chosen = sorted(random.Random(seed).sample(ids, sample)) if sample and sample < len(ids) else ids
    items, _ = mine.load_inputs(ctx, chosen)
    client = LLMClient(settings.llm)  # builds request hashes only: no connection is opened
    out = []
    for protocol in protocols:
        extractor = LLMChainExtractor(client, protocol=protocol, prompt_version=prompt_version)
        history = mine.ledger_history(ctx, client.model, extractor.prompt_version)
        est = CostEstimator(extractor, settings.llm, history).estimate(items)
        if len(items) < len(ids):  # scale a sample up to the plan
            factor = len(ids) / max(1, len(items))
            for s in est.stages:
                for k in ("calls", "input_tokens", "cached_tokens", "output_tokens", "usd_sync", "usd_batch"):
                    setattr(s, k, getattr(s, k) * factor)
            est.assumptions.append(f"figures scaled from {len(items)} sampled samples to {len(ids)}")
            est.samples = len(ids)
        out.append(est)
    return out, len(ids), len(items)


def ledger_actuals(settings: Any, model: str, prompt_version: str) -> dict[str, Any] | None:
    """What the latest run that used this model and prompt version spent, from int_llm_calls (or None)."""
    import polars as pl

    from warehouse import Warehouse

    calls = (Warehouse(settings.warehouse_dir).ensure().scan("int_llm_calls")
             .filter((pl.col("model") == model) & (pl.col("prompt_version") == prompt_version)).collect())
    if not calls.height:
        return None
    run_id = calls.sort("created_at")["run_id"][-1]
    run = calls.filter(pl.col("run_id") == run_id)
    fresh = run.filter(~pl.col("cache_hit"))
    return dict(run_id=run_id, samples=run["sample_id"].n_unique(), calls=fresh.height,
                input_tokens=int(fresh["prompt_tokens"].sum() or 0),
                cached_tokens=int(fresh["cached_tokens"].fill_null(0).sum() or 0),
                output_tokens=int(fresh["completion_tokens"].sum() or 0), usd=float(fresh["cost_usd"].sum() or 0.0),
                modes=sorted(set(fresh["mode"].fill_null("sync").to_list())))


def comparison_line(est: Any, actual: dict[str, Any]) -> str:
    """The estimate, scaled to the samples that run mined, beside the ledger's figures."""
    total = est.total
    share = actual["samples"] / max(1, est.samples)
    est_in = total.input_tokens * share
    off = (est_in - actual["input_tokens"]) / actual["input_tokens"] if actual["input_tokens"] else 0.0
    return (f"ledger, last {est.protocol} run {actual['run_id'][:12]} ({actual['samples']} samples, "
            f"{'/'.join(actual['modes']) or 'cache hits only'}): {actual['calls']} calls, input "
            f"{actual['input_tokens']} (estimate for as many samples {est_in:.0f}, {off:+.1%}), cached "
            f"{actual['cached_tokens']}, output {actual['output_tokens']} (estimate "
            f"{total.output_tokens * share:.0f}), ${actual['usd']:.4f}")


def estimate_rows(estimates: list[Any]) -> list[dict[str, Any]]:
    return [row for est in estimates for row in est.rows()]


def publish_artifact(rows: list[dict[str, Any]], notes: list[str]) -> None:
    """The estimate as a Prefect table artifact (inside a flow run, or through a short flow of its own)."""
    from prefect import flow
    from prefect.artifacts import create_table_artifact
    from prefect.context import FlowRunContext

    description = "LLM mining cost estimate (no calls made)\n\n" + "\n".join(f"- {n}" for n in notes)
    if FlowRunContext.get() is not None:
        create_table_artifact(table=rows, key=ARTIFACT_KEY, description=description)
        return

    @flow(name="radchain-estimate", persist_result=False)
    def estimate_flow() -> None:
        create_table_artifact(table=rows, key=ARTIFACT_KEY, description=description)

    estimate_flow()


def print_estimate(settings: Any, *, protocol: str | None = None, mode: str | None = None,
                   budget: float | None = None, sample: int | None = None, artifact: bool = True,
                   prompt_version: str | None = None) -> list[Any]:
    import pyarrow as pa

    t0 = time.perf_counter()
    protocols = [protocol] if protocol else ["single", "paper"]
    if prompt_version and not protocol:
        protocol = "paper" if prompt_version.startswith("paper") else "single"
        protocols = [protocol]
    estimates, planned, built = compute_estimates(settings, protocols=protocols, sample=sample, seed=settings.seed,
                                                  prompt_version=prompt_version)
    rows = estimate_rows(estimates)
    short = dict(input_tokens="input", cached_tokens="cached", output_tokens="output")
    shown = [{short.get(k, k): v for k, v in r.items() if k not in ("prompt_version", "output_from")} for r in rows]
    versions = ", ".join(f"{e.protocol}={e.prompt_version}" for e in estimates)
    print_arrow(pa.Table.from_pylist(shown), "table",
                title=f"LLM cost estimate: {planned} samples, {settings.llm.model}, {versions} (no calls made)")
    notes = list(estimates[0].assumptions)
    for est in estimates[1:]:
        notes += [a for a in est.assumptions if a not in notes]
    for note in notes:
        console.print(f"  {note}")
    for est in estimates:  # after a run: the estimate beside what the ledger says it cost
        actual = ledger_actuals(settings, est.model, est.prompt_version)
        if actual is not None:
            line = comparison_line(est, actual)
            notes.append(line)
            console.print(f"  {line}")
    cap = settings.llm.budget_usd if budget is None else budget
    chosen_mode = mode or settings.llm.mode
    if cap is not None:
        for est in estimates:
            usd = est.total.usd_batch if chosen_mode == "batch" else est.total.usd_sync
            verdict = "fits" if usd <= cap else "exceeds it: mining would stop at the budget (BUDGET skips)"
            console.print(f"  budget ${cap:.2f}: {est.protocol} {chosen_mode} estimate ${usd:.4f} {verdict}")
    console.print(f"estimated in {time.perf_counter() - t0:.2f}s from {built} samples' prompts")
    if artifact:
        try:
            publish_artifact(rows, notes)
        except Exception as e:  # noqa: BLE001 - the printed table is the result; the UI copy is a convenience
            console.print(f"[yellow]could not publish the Prefect artifact: {type(e).__name__}[/]")
    return estimates


def register(app: typer.Typer) -> None:
    @app.command()
    @clear_errors
    def estimate(
        protocol: str | None = typer.Option(None, "--protocol", help="single | paper (default: both)"),
        llm_mode: str | None = typer.Option(None, "--llm-mode", help="sync | batch: the mode the budget check uses"),
        budget: float | None = typer.Option(None, "--budget", help="compare the estimate with this cap (USD)"),
        sample: int | None = typer.Option(None, "--sample", help="build the prompts of this many samples (seeded) "
                                          "and scale up; default all"),
        artifact: bool = typer.Option(None, "--artifact/--no-artifact",
                                      help="also publish a Prefect artifact (default: when PREFECT_API_URL names a "
                                           "server, e.g. under `radchain serve`; without one, --artifact starts "
                                           "Prefect's temporary server, about 10 s)"),
        prompt_version: str | None = typer.Option(None, "--prompt-version", help="e.g. single-v3 (few-shot)"),
    ) -> None:
        """Estimate calls, tokens and dollars of mining the planned samples (sync vs batch), with no network call."""
        from radchain.runtime import prepare_environment

        settings = prepare_environment()
        if protocol is not None and protocol not in ("single", "paper"):
            raise UsageError("--protocol must be single or paper")
        if sample is not None and sample < 1:
            raise UsageError("--sample must be at least 1")
        if artifact is None:
            import os

            artifact = bool(os.environ.get("PREFECT_API_URL"))
        print_estimate(settings, protocol=protocol, mode=llm_mode, budget=budget, sample=sample, artifact=artifact,
                       prompt_version=prompt_version)
