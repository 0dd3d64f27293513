"""Stage `mine`: one verified reasoning chain per VQA sample, or a dead-letter row saying why not.

Samples are processed in batches grouped by the ingest partition of their study, so a batch
reads one partition of reports and labels. The LLM backend runs a batch's samples
concurrently (bounded by the client); every call lands in int_llm_calls, and the response
cache makes a re-run (or a run resumed after a crash) repeat no completed call.

A batch whose inputs did not change is not mined again (LLM extractor): its *input hash*
covers the rows ``load_inputs`` reads for it (samples, report texts, labels, prior reports),
the extractor settings that shape the answers (protocol, prompt version and template text,
model, temperature, refinement rounds, output schema, PHI guard settings) and the
verifier (its module source: reason codes and bounds): ``MineStage.input_hash``. It is kept in
the batch's lineage (``code_version`` = ``radchain-<version>[+g<commit>]/mine-v1+in.<hash>``). The
runner (flows/stages/runner.py) reuses a batch when the last run of the stage wrote every batch of
the current plan (a run resumed after a crash re-derives its batches, from the response cache), its
audit row, chains and rejections carry this hash with the counts their records say; ``reuse`` adds
that no sample was skipped and none of its rejections is an LLM call failure (those were not
cached, so a re-run asks again). A reused batch writes only a new audit row (outputs and
rejections as stored, skipped 0); the run option ``force`` turns reuse off.

Cost controls (LLM extractor): with a budget (option ``budget_usd`` from ``radchain run
--budget``, else ``RADCHAIN_LLM_BUDGET_USD``), each sample's estimated cost
(extractors.llm.estimate) is reserved before it starts and samples that do not fit are skipped
(``skipped`` with ``skip_reason`` BUDGET in audit_stage_counts; such a batch is not reused, so a
re-run with a higher cap mines them); ``finalize`` logs the closing budget line. With
option ``llm_mode`` (or ``RADCHAIN_LLM_MODE``) ``batch``, calls go through the OpenAI Batch
API (extractors.llm.batch; job state in warehouse/llm_batches.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
from collections.abc import Callable, Iterable
from typing import Any, Literal

import polars as pl

from extractors.chains.types import LabelEvidence, MiningInput, MiningOutcome
from extractors.instructions import mask_instructions
from flows.stages.common import RunContext, rejection
from flows.stages.contract import BatchOutput, Stage, StageOptions
from schemas.base import Lineage, stable_id
from schemas.chains import ChainRow, ChainStepRow
from schemas.ingest import RawReport
from schemas.labels import Label
from schemas.llm import LlmCall
from schemas.vqa import VqaSample

NAME = "mine"
VERSION = "mine-v1"


class MineOptions(StageOptions):
    extractor: Literal["auto", "rules", "llm"] = "auto"  # auto: llm when an endpoint is configured
    budget_usd: float | None = None  # this run's LLM spend cap (default RADCHAIN_LLM_BUDGET_USD)
    llm_mode: str | None = None  # sync | batch (default RADCHAIN_LLM_MODE)
    protocol: str | None = None  # single | paper (default RADCHAIN_LLM_PROTOCOL)
    prompt_version: str | None = None  # default: the protocol's


def _opts(ctx: RunContext) -> MineOptions:
    return MineOptions.of(ctx)


def choose_extractor(ctx: RunContext) -> str:
    wanted = _opts(ctx).extractor
    if wanted == "auto":
        return "llm" if ctx.settings.llm.base_url else "rules"
    return wanted


class LLMEndpointDown(RuntimeError):
    """The circuit breaker opened: the mine stage stops and the run fails with this one-line message."""


class MineStage(Stage):
    name = NAME
    version = VERSION
    reads = (VqaSample, RawReport, Label)
    writes = (ChainRow, ChainStepRow, LlmCall)
    history = (LlmCall,)  # the call ledger: one partition per batch and run, never replaced
    Options = MineOptions
    progress_unit = "samples"
    final_errors = (LLMEndpointDown,)  # a retry would only fail again, later

    def __init__(self, ctx: RunContext, options: MineOptions | None = None):
        super().__init__(ctx, options)
        self._loaded: dict[str, tuple[list[MiningInput], list[dict]]] = {}

    def plan(self) -> list[dict[str, Any]]:
        return plan_batches(self.ctx)

    def units(self, batch: dict[str, Any]) -> int:
        return len(batch["sample_ids"])

    def input_hash(self, batch: dict[str, Any]) -> str | None:
        if choose_extractor(self.ctx) != "llm":
            return None  # the rules extractor is cheap and deterministic: always re-run
        items, rejected = self._loaded[batch["batch_id"]] = load_inputs(self.ctx, batch["sample_ids"])
        return batch_input_hash(items, rejected, llm_extractor_config(self.ctx))

    def reuse(self, batch: dict[str, Any], stored: dict[str, Any]) -> bool:
        audit = stored["audit"]
        return (audit["inputs"] == len(batch["sample_ids"]) and audit["skipped"] == 0
                and not any("LLM_" in c for c in stored["reason_codes"]))  # failed calls were not cached: ask again

    def process(self, batch: dict[str, Any]) -> BatchOutput:
        return mine_batch(self, batch)

    def finalize(self) -> None:
        line = budget_summary(self.ctx) if choose_extractor(self.ctx) == "llm" else None
        if line is not None:
            import logging

            logging.getLogger("radchain.mine").warning(line)
            print(line, flush=True)
        return None


def plan_batches(ctx: RunContext) -> list[dict[str, Any]]:
    """Samples grouped by the ingest partition of their study (a batch reads one partition of reports)."""
    samples = ctx.warehouse.scan("int_vqa_samples").select("sample_id", "study_id")
    reports = ctx.warehouse.scan("raw_reports").select("study_id", pl.col("batch_id").alias("report_batch"))
    grouped = (
        samples.join(reports, on="study_id", how="left")
        .with_columns(pl.col("report_batch").fill_null("orphan"))
        .group_by("report_batch")
        .agg(pl.col("sample_id").sort())
        .sort("report_batch")
        .collect()
    )
    return [dict(batch_id=r["report_batch"], sample_ids=r["sample_id"]) for r in grouped.iter_rows(named=True)]


def _labels_by_study(frame: pl.DataFrame) -> dict[str, dict[str, LabelEvidence]]:
    out: dict[str, dict[str, LabelEvidence]] = {}
    for r in frame.iter_rows(named=True):
        out.setdefault(r["study_id"], {})[r["observation"]] = LabelEvidence(
            value=r["value"], sentence=r["sentence"], start=r["sentence_start"], end=r["sentence_end"]
        )
    return out


def load_inputs(ctx: RunContext, sample_ids: Iterable[str]) -> tuple[list[MiningInput], list[dict]]:
    """Join samples with report text and labels; samples whose report or labels are missing are rejected."""
    ids = list(sample_ids)
    samples = ctx.warehouse.scan("int_vqa_samples").filter(pl.col("sample_id").is_in(ids)).collect()
    study_ids = set(samples["study_id"].to_list()) | set(x for x in samples["prior_study_id"].to_list() if x)
    raw = ctx.warehouse.scan("raw_reports").filter(pl.col("study_id").is_in(list(study_ids)))
    has_spans = "suspect_spans" in raw.collect_schema().names()
    # Instruction-like sentences (ingest: raw_reports.suspect_spans) are blanked out, offsets kept: the LLM
    # never reads them and no evidence quote can cite them (extractors.instructions).
    reports = {sid: mask_instructions(text, spans) for sid, text, spans in raw.select(
        "study_id", "text", "suspect_spans" if has_spans else pl.lit(None).alias("suspect_spans")).collect().iter_rows()}
    labels = _labels_by_study(
        ctx.warehouse.scan("int_labels").filter(pl.col("study_id").is_in(list(study_ids))).collect()
    )
    items, rejected = [], []
    for s in samples.sort("sample_id").iter_rows(named=True):
        report, lab = reports.get(s["study_id"]), labels.get(s["study_id"])
        if report is None or lab is None:
            rejected.append(rejection(NAME, s["sample_id"], "MISSING_REPORT_OR_LABELS",
                                      f"study {s['study_id']} has no report or no labels"))
            continue
        prior = s.get("prior_study_id")
        items.append(MiningInput(
            sample=s, report=report, labels=lab,
            prior_report=reports.get(prior) if prior else None,
            prior_labels=labels.get(prior) if prior else None,
        ))
    return items, rejected


def _extract_rules(items: list[MiningInput], done: Callable[[MiningOutcome], None]) -> None:
    from extractors.chains.rules_backend import RulesChainExtractor

    ex = RulesChainExtractor()
    for it in items:
        done(ex.extract(it))


def screen_phi(ctx: RunContext, items: list[MiningInput]) -> tuple[list[MiningInput], list[dict]]:
    """Samples whose texts the PHI guard flags become PHI_DETECTED rejections before any call
    (only for endpoints the guard applies to: see extractors.phi)."""
    from extractors.phi import REASON_CODE, PhiGuard, describe, endpoint_host

    llm = ctx.settings.llm
    guard = PhiGuard.from_settings(llm)
    if not guard.applies_to(llm.base_url):
        return items, []
    host = endpoint_host(llm.base_url)
    kept, rejected = [], []
    for it in items:
        s = it.sample
        question = " ".join([str(s.get("question") or ""), *map(str, s.get("options") or [])])
        for where, text in (("the report", it.report), ("the prior report", it.prior_report), ("the question", question)):
            kinds = guard.kinds_in(text)
            if kinds:
                rejected.append(rejection(NAME, it.sample_id, REASON_CODE, describe(kinds, host, where)))
                break
        else:
            kept.append(it)
    return kept, rejected


def budget_cap(ctx: RunContext) -> float | None:
    """The run's LLM spend cap in USD: ``options["budget_usd"]`` (``--budget``), else RADCHAIN_LLM_BUDGET_USD."""
    cap = _opts(ctx).budget_usd
    return ctx.settings.llm.budget_usd if cap is None else float(cap)


def llm_mode(ctx: RunContext) -> str:
    from radchain.settings import LLM_MODES

    mode = _opts(ctx).llm_mode or ctx.settings.llm.mode
    if mode not in LLM_MODES:
        raise ValueError(f"unknown LLM mode {mode!r}; choose one of {LLM_MODES}")
    return mode


def run_spend_usd(ctx: RunContext) -> float:
    """What this run has spent on LLM calls so far (the ledger partitions of its finished batches)."""
    calls = ctx.warehouse.scan("int_llm_calls").filter(pl.col("run_id") == ctx.run_id).select("cost_usd").collect()
    return float(calls["cost_usd"].sum() or 0.0) if calls.height else 0.0


def ledger_history(ctx: RunContext, model: str, prompt_version: str) -> dict[str, Any]:
    """Per stage: fresh calls, samples and completion tokens the ledger holds for this model and prompt version."""
    from extractors.llm.estimate import StageHistory

    calls = (ctx.warehouse.scan("int_llm_calls")
             .filter((pl.col("model") == model) & (pl.col("prompt_version") == prompt_version) & ~pl.col("cache_hit"))
             .group_by("stage")
             .agg(pl.len().alias("calls"), pl.col("sample_id").n_unique().alias("samples"),
                  pl.col("completion_tokens").sum().alias("completion_tokens"))
             .collect())
    return {r["stage"]: StageHistory(r["calls"], r["samples"], int(r["completion_tokens"] or 0))
            for r in calls.iter_rows(named=True)}


_CALIBRATE_AFTER = 16  # finished samples before the budget's estimates are calibrated on actual spend


def _budget_gate(ctx: RunContext, extractor: Any, client: Any, items: list[MiningInput],
                 mode: str) -> tuple[Callable[[MiningInput], str | None] | None, Callable[[MiningOutcome], None]]:
    """(admit, settle) hooks for extract_many that keep the run under its budget (extractors.llm.budget);
    (None, a no-op) when no budget is set. A sample whose first request is in the response cache is
    estimated at $0 (a re-run pays nothing for it). Once ``_CALIBRATE_AFTER`` samples have finished,
    estimates are scaled by what those samples actually cost over their estimates (the assumed output
    length of a prompt version without ledger history can be far off either way)."""
    cap = budget_cap(ctx)
    if cap is None:
        return None, lambda o: None
    from extractors.llm.budget import REASON, Budget
    from extractors.llm.estimate import CostEstimator
    from schemas.chains import ReasoningChain

    budget = Budget(cap, spent_usd=run_spend_usd(ctx))
    estimator = CostEstimator(extractor, client.settings, ledger_history(ctx, client.model, extractor.prompt_version))
    estimator.learn_prefixes(items)
    reserved: dict[str, tuple[float, float]] = {}  # sample id -> (reserved estimate, uncalibrated estimate)
    seen = [0, 0.0, 0.0]  # settled samples, their uncalibrated estimates, their actual cost

    def admit(item: MiningInput) -> str | None:
        stage, messages = extractor.planned_requests(item, plan_chars=0, chain_chars=0)[0]
        key = client.hash_request(messages, prompt_version=extractor.prompt_version,
                                  schema=None if stage == "plan" else ReasoningChain)
        cached = client.cache is not None and client.cache.get(key) is not None
        raw = 0.0 if cached else estimator.sample_usd(item, mode)
        factor = 1.0
        if seen[0] >= _CALIBRATE_AFTER and seen[1] > 0:
            factor = min(4.0, max(0.25, seen[2] / seen[1]))
        if not budget.admit(raw * factor):
            return REASON
        reserved[item.sample_id] = (raw * factor, raw)
        return None

    def settle(outcome: MiningOutcome) -> None:
        if outcome.sample_id in reserved:
            estimate, raw = reserved.pop(outcome.sample_id)
            actual = sum(c["cost_usd"] for c in outcome.llm_calls)
            budget.settle(estimate, actual)
            if raw > 0:
                seen[0] += 1
                seen[1] += raw
                seen[2] += actual

    return admit, settle


def _extract_llm(ctx: RunContext, items: list[MiningInput], done: Callable[[MiningOutcome], None],
                 call_log: Callable[[dict], None] | None = None) -> None:
    """Mine ``items`` concurrently; ``done`` gets each outcome as its sample finishes (while
    others are still in flight, so turning outcomes into rows costs no time after the last answer);
    ``call_log`` gets each fresh call's ledger row as it is made. With a budget, samples that do not
    fit are skipped (``skip_reason`` BUDGET); in batch mode the calls go through the Batch API."""
    from extractors.chains.llm_backend import LLMChainExtractor
    from extractors.chains.verify import verify_chain
    from extractors.llm.client import LLMClient
    from extractors.phi import CURRENT_SAMPLE, PhiGuard
    from radchain.secrets import with_api_key
    from warehouse.llm_cache import SQLiteResponseCache

    llm = with_api_key(ctx.settings.llm)  # the key lives in this copy only, never in ctx.settings
    guard = PhiGuard.from_settings(llm)  # in front of every request (refine and repair calls too)
    breaker: dict[str, Any] = {}

    mode = llm_mode(ctx)

    async def run_all() -> None:
        cache = SQLiteResponseCache.from_settings(ctx.settings)
        transport = None
        if mode == "batch":
            from extractors.llm.batch import BatchTransport
            from warehouse.llm_batches import SQLiteBatchStore

            transport = BatchTransport(llm, SQLiteBatchStore.from_settings(ctx.settings))
        async with LLMClient(llm, cache=cache, request_guard=guard, backoff_initial_s=llm.backoff_initial_s,
                             backoff_max_s=llm.backoff_max_s, call_log=call_log, transport=transport) as client:
            breaker["client"] = client  # issue 14: circuit breaker + preflight (see LLMEndpointDown)
            if llm.preflight_min_samples and len(items) >= llm.preflight_min_samples:
                await client.preflight()
            opts = _opts(ctx)
            extractor = LLMChainExtractor(client, protocol=opts.protocol or llm.protocol,
                                          prompt_version=opts.prompt_version)
            admit, settle = _budget_gate(ctx, extractor, client, items, mode)

            def after(o: MiningOutcome) -> None:
                settle(o)
                done(_phi_outcome(o, guard, llm.base_url))

            try:
                # CURRENT_SAMPLE is set in the worker task's own context: it tells the guard whose request it saw.
                await extractor.extract_many(items, verify_chain, before=lambda it: CURRENT_SAMPLE.set(it.sample_id),
                                             after=after, admit=admit)
            finally:
                if transport is not None:
                    await transport.aclose()
                    transport.store.close()

    from flows.locking import llm_slots

    # Slots of the global "llm-calls" limit (created by `radchain serve`), shared by every worker.
    with llm_slots(min(len(items), llm.max_concurrency), ctx.settings):
        asyncio.run(run_all())
    client = breaker.get("client")
    if client is not None and client.circuit_open and (client.breaker_refused or client.connection_failures):
        raise LLMEndpointDown(
            f"the LLM endpoint {llm.base_url or 'api.openai.com'} is unreachable ({client.breaker_reason}; "
            f"llm.breaker_failures={llm.breaker_failures}): the mine stage stopped; completed batches and cached "
            "answers are kept, re-run when the endpoint is back")


def _phi_outcome(outcome: MiningOutcome, guard: Any, base_url: str | None) -> MiningOutcome:
    """A sample one of whose requests the PHI guard stopped is rejected as PHI_DETECTED (the guard
    records a sample before its request fails, so this holds as soon as the sample is done)."""
    from extractors.chains.types import VerificationFailure
    from extractors.phi import REASON_CODE, describe, endpoint_host

    kinds = guard.blocked.get(outcome.sample_id)
    if kinds and any(f.code == "LLM_BLOCKED" for f in outcome.failures):
        outcome.chain = None
        outcome.failures = [VerificationFailure(REASON_CODE, describe(kinds, endpoint_host(base_url),
                                                                      "a request (e.g. a refinement quoting the model)"))]
    return outcome


class OutcomeRows:
    """The table rows of a batch's outcomes, added one outcome at a time as samples finish.

    Rows come out in the order of the batch's items (not the order samples finished in), so a
    forced re-run writes the same Parquet rows."""

    def __init__(self, items: list[MiningInput]) -> None:
        self.by_id = {it.sample_id: it for it in items}
        self._rows: dict[str, tuple[list[dict], list[dict], list[dict], list[dict]]] = {}
        self.skipped: dict[str, str] = {}  # sample id -> skip reason (BUDGET)

    def add(self, o: MiningOutcome) -> None:
        if o.skip_reason is not None:
            self.skipped[o.sample_id] = o.skip_reason
            return
        chains: list[dict] = []
        steps: list[dict] = []
        rejected: list[dict] = []
        self._rows[o.sample_id] = (chains, steps, list(o.llm_calls), rejected)
        if not o.accepted:
            codes = sorted({f.code for f in o.failures}) or ["NO_CHAIN"]
            detail = "; ".join(f"{f.code}@{f.step_index}: {f.detail}" for f in o.failures)[:2000]
            rejected.append(rejection(NAME, o.sample_id, "+".join(codes), detail or "no chain", o.raw_output))
            return
        s = self.by_id[o.sample_id].sample
        chain_id = stable_id("chain", o.sample_id, o.protocol, o.prompt_version)
        # A repaired answer is cached under its original request's hash, so a re-run never sees the
        # repair turn: keep only the logical requests' hashes, or the re-run would write a different row.
        repairs = {c["request_hash"] for c in o.llm_calls if c.get("stage") == "repair"}
        request_hashes = [h for h in o.request_hashes if h not in repairs]
        chains.append(dict(
            chain_id=chain_id, sample_id=o.sample_id, study_id=s["study_id"], task=s["task"], extractor=o.extractor,
            protocol=o.protocol, model=o.model, prompt_version=o.prompt_version, request_hashes=request_hashes,
            refine_rounds=o.refine_rounds, n_steps=len(o.chain.steps), text=o.chain.render(),
        ))
        for i, st in enumerate(o.chain.steps):
            steps.append(dict(
                chain_id=chain_id, sample_id=o.sample_id, step_index=i, kind=st.kind, text=st.text,
                findings=[f.model_dump() for f in st.findings], evidence=[e.model_dump() for e in st.evidence],
            ))

    def _column(self, k: int) -> list[dict]:
        return [row for sid in self.by_id if sid in self._rows for row in self._rows[sid][k]]

    @property
    def chains(self) -> list[dict]:
        return self._column(0)

    @property
    def steps(self) -> list[dict]:
        return self._column(1)

    @property
    def calls(self) -> list[dict]:
        return self._column(2)

    @property
    def rejected(self) -> list[dict]:
        return self._column(3)


# ---- reusing an unchanged batch ------------------------------------------------------------------
_LINEAGE_COLS = frozenset(Lineage.model_fields)
_VERIFIER_FINGERPRINT: str | None = None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def verifier_fingerprint() -> str:
    """A digest of the verifier: its reason codes, bounds and code (a change re-mines every batch)."""
    global _VERIFIER_FINGERPRINT
    if _VERIFIER_FINGERPRINT is None:
        from extractors.chains import verify

        parts = [_canonical(list(verify.REASON_CODES)),
                 _canonical([verify.MIN_STEPS, verify.MAX_STEPS, verify.MAX_STEP_CHARS, verify.MAX_CHAIN_CHARS,
                             verify.MIN_QUOTE_CHARS]),
                 inspect.getsource(verify)]
        _VERIFIER_FINGERPRINT = hashlib.sha256("\x00".join(parts).encode()).hexdigest()
    return _VERIFIER_FINGERPRINT


def _labels_json(labels: dict[str, LabelEvidence] | None) -> Any:
    if labels is None:
        return None
    return [[k, v.value, v.sentence, v.start, v.end] for k, v in sorted(labels.items())]


def llm_extractor_config(ctx: RunContext) -> dict[str, Any]:
    """What, besides the inputs, decides a batch's LLM-mined rows."""
    from extractors.chains.llm_backend import DEFAULT_PROMPT_VERSIONS, PROMPTS_DIR
    from extractors.llm.hashing import schema_version
    from extractors.phi import PhiGuard
    from schemas.chains import ReasoningChain

    llm = ctx.settings.llm
    protocol = _opts(ctx).protocol or llm.protocol
    version = _opts(ctx).prompt_version or DEFAULT_PROMPT_VERSIONS.get(protocol, "")
    templates = {p.name: p.read_text(encoding="utf-8") for p in sorted(PROMPTS_DIR.glob(f"{version}.*.txt"))}
    return dict(
        stage=VERSION, extractor="llm", protocol=protocol, prompt_version=version,
        templates=hashlib.sha256(_canonical(templates).encode()).hexdigest(), model=llm.model,
        temperature=llm.temperature, refine_rounds=llm.refine_rounds, schema=schema_version(ReasoningChain),
        verifier=verifier_fingerprint(),
        phi=[llm.phi_allow_hosts, llm.phi_allow_all,
             PhiGuard.from_settings(llm).applies_to(llm.base_url)],
    )


def batch_input_hash(items: list[MiningInput], rejected: list[dict], config: dict[str, Any]) -> str:
    """SHA-256 over a batch's inputs (as load_inputs read them, lineage columns left out) and ``config``."""
    h = hashlib.sha256(_canonical(config).encode())
    for it in sorted(items, key=lambda i: i.sample_id):
        sample = {k: v for k, v in it.sample.items() if k not in _LINEAGE_COLS}
        h.update(b"\x00")
        h.update(_canonical([sample, it.report, _labels_json(it.labels), it.prior_report,
                             _labels_json(it.prior_labels)]).encode())
    h.update(_canonical(sorted(r["entity_id"] for r in rejected)).encode())
    return h.hexdigest()


def mine_batch(stage: MineStage, batch: dict[str, Any]) -> BatchOutput:
    """Mine one batch's samples: chains and steps, dead-letter rows, and (LLM) the batch's call ledger."""
    ctx, batch_id = stage.ctx, batch["batch_id"]
    loaded = stage._loaded.pop(batch_id, None)  # read by input_hash already
    items, rejected = loaded if loaded is not None else load_inputs(ctx, batch["sample_ids"])
    extractor = choose_extractor(ctx)
    if extractor == "llm":
        items, flagged = screen_phi(ctx, items)
        rejected += flagged
        stage.tick(len(flagged))
    rows = OutcomeRows(items)
    spend = getattr(stage.progress, "add_spend", None)

    def done(outcome: MiningOutcome) -> None:
        rows.add(outcome)
        if spend is not None and outcome.llm_calls:
            spend(sum(c["cost_usd"] for c in outcome.llm_calls))
        stage.tick(1)

    partitions: dict = {}
    committed = None
    if extractor == "llm":
        from warehouse.llm_journal import SQLiteCallJournal

        journal = SQLiteCallJournal.from_settings(ctx.settings)
        try:
            recover_journaled_calls(ctx, batch_id, journal)
            _extract_llm(ctx, items, done, call_log=lambda row: journal.append(ctx.run_id, batch_id, row))
        finally:
            journal.close()
        calls = rows.calls
        if calls:
            # The call ledger is per run (cache hits included), so a re-run never erases the record of spend.
            partitions[LlmCall] = {f"{batch_id}--{ctx.run_id}": calls}
        committed = lambda: _discard_journal(ctx, batch_id)  # noqa: E731 - once the ledger rows are written
    else:
        _extract_rules(items, done)
    chains = rows.chains
    reasons = sorted(set(rows.skipped.values()))
    return BatchOutput(
        inputs=len(batch["sample_ids"]), outputs=len(chains), rejections=rejected + rows.rejected,
        frames={ChainRow: chains, ChainStepRow: rows.steps}, partitions=partitions,
        skipped=len(rows.skipped), skip_reason="+".join(reasons) or None, committed=committed,
    )


def _discard_journal(ctx: RunContext, batch_id: str) -> None:
    from warehouse.llm_journal import SQLiteCallJournal

    journal = SQLiteCallJournal.from_settings(ctx.settings)
    try:
        journal.discard(ctx.run_id, batch_id)  # the rows are in the ledger now
    finally:
        journal.close()


def recover_journaled_calls(ctx: RunContext, batch_id: str, journal: Any) -> int:
    """Write the ledger rows that runs killed during this batch journaled but never wrote, under
    their own run id and the partition name they would have used (see warehouse.llm_journal)."""
    recovered = 0
    for dead_run, rows in journal.left_by_other_runs(batch_id, ctx.run_id).items():
        lineage = Lineage(run_id=dead_run, batch_id=batch_id, code_version=ctx.lineage(batch_id, VERSION).code_version)
        # Recorded as the runner records a batch's ledger partition (fct_materializations "mine-<partition>").
        written = ctx.warehouse.write_batch(NAME, f"{batch_id}--{dead_run}", lineage, {LlmCall: rows})
        recovered += written[LlmCall.__table__]
        journal.discard(dead_run, batch_id)
    return recovered


def budget_summary(ctx: RunContext) -> str | None:
    """The run's closing budget line, when a budget was set."""
    cap = budget_cap(ctx)
    if cap is None:
        return None
    audit = (ctx.warehouse.scan("audit_stage_counts")
             .filter((pl.col("stage") == NAME) & (pl.col("run_id") == ctx.run_id)).collect())
    skipped = int(audit.filter(pl.col("skip_reason") == "BUDGET")["skipped"].sum() or 0) if audit.height else 0
    spent = run_spend_usd(ctx)
    if skipped:
        return (f"budget reached: LLM spend ${spent:.4f} of the ${cap:.4f} budget; {skipped} samples not mined "
                f"(skipped, reason BUDGET); raise --budget / RADCHAIN_LLM_BUDGET_USD and re-run to mine them")
    return f"budget: LLM spend ${spent:.4f} of the ${cap:.4f} budget; every sample was mined"
