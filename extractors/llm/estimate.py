"""What mining will cost, computed before a single call is made (``radchain estimate``, the budget).

For each planned sample the extractor's own prompts are built (``planned_requests``: the same
templates and substitutions the calls will use), and their input tokens counted at 4
characters per token (the rule the fake server uses; a hosted tokenizer differs by a few per
cent, and the response-format schema a hosted API also counts is left out). What cannot be
built without calls comes from the ledger (int_llm_calls) of the same model and prompt
version when it has rows, else from stated assumptions (settings ``estimate_output_tokens``,
``estimate_refine_rate``):

* output tokens per call, per stage (the mean of the ledger's fresh calls of that stage);
* the paper protocol's ``steps``/``polish`` prompts quote the plan/chain: a stand-in of that
  stage's output length is put in their place;
* refinement calls per sample, and repair calls per structured call (the ledger's rates).

Cached input tokens: the static part of a stage's prompts (the longest prefix its requests
share: instructions, schema, few-shot examples) is served from the provider's prompt cache
on every call but the first when it reaches 1,024 tokens, in 1,024 + k*128 token steps, as
OpenAI documents. Dollars come from the settings' price table (``ModelPrice``), sync and
Batch API side by side.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from extractors.llm.pricing import model_price

CHARS_PER_TOKEN = 4
CACHE_MIN_TOKENS = 1024
CACHE_BLOCK_TOKENS = 128
PLAN_OUTPUT_SHARE = 1 / 3  # the paper protocol's free-text plan, assumed a third of a structured answer
_PREFIX_SAMPLE = 64  # samples compared to find a stage's static prefix


def tokens_of(messages: Sequence[Mapping[str, Any]]) -> int:
    return max(1, sum(len(str(m.get("content") or "")) for m in messages) // CHARS_PER_TOKEN)


def cacheable_tokens(prefix_tokens: int) -> int:
    """Tokens a repeated prefix of ``prefix_tokens`` tokens gets from the prompt cache (0 below 1,024)."""
    if prefix_tokens < CACHE_MIN_TOKENS:
        return 0
    return CACHE_MIN_TOKENS + (prefix_tokens - CACHE_MIN_TOKENS) // CACHE_BLOCK_TOKENS * CACHE_BLOCK_TOKENS


def _contents(messages: Sequence[Mapping[str, Any]]) -> str:
    return "".join(str(m.get("content") or "") for m in messages)


@dataclass
class StageHistory:
    """One stage's fresh calls in the ledger for the same model and prompt version."""

    calls: int
    samples: int
    completion_tokens: int

    @property
    def mean_output(self) -> float:
        return self.completion_tokens / self.calls if self.calls else 0.0


@dataclass
class StageEstimate:
    stage: str
    calls: float = 0.0
    input_tokens: float = 0.0
    cached_tokens: float = 0.0
    output_tokens: float = 0.0
    usd_sync: float = 0.0
    usd_batch: float = 0.0
    output_source: str = ""

    def add(self, other: "StageEstimate") -> None:
        self.calls += other.calls
        self.input_tokens += other.input_tokens
        self.cached_tokens += other.cached_tokens
        self.output_tokens += other.output_tokens
        self.usd_sync += other.usd_sync
        self.usd_batch += other.usd_batch


@dataclass
class Estimate:
    protocol: str
    prompt_version: str
    model: str
    samples: int
    stages: list[StageEstimate] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    @property
    def total(self) -> StageEstimate:
        t = StageEstimate("total", output_source="")
        for s in self.stages:
            t.add(s)
        return t

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for s in [*self.stages, self.total]:
            out.append(dict(protocol=self.protocol, prompt_version=self.prompt_version, stage=s.stage,
                            calls=round(s.calls, 1), input_tokens=round(s.input_tokens),
                            cached_tokens=round(s.cached_tokens), output_tokens=round(s.output_tokens),
                            usd_sync=round(s.usd_sync, 4), usd_batch=round(s.usd_batch, 4),
                            output_from=s.output_source))
        return out


class CostEstimator:
    """Per-sample and per-run cost of mining with ``extractor`` (an LLMChainExtractor; no call is made)."""

    def __init__(self, extractor: Any, settings: Any, history: Mapping[str, StageHistory] | None = None) -> None:
        self.extractor = extractor
        self.settings = settings
        self.history = dict(history or {})
        self.price = model_price(extractor.client.model, settings.price_per_mtok)
        self.first_stages = ["single"] if extractor.protocol == "single" else ["plan", "steps", "polish"]
        assumed = settings.estimate_output_tokens
        self.output: dict[str, float] = {}
        self.output_source: dict[str, str] = {}
        for stage in [*self.first_stages, "refine", "repair"]:
            h = self.history.get(stage)
            if h is not None and h.calls:
                self.output[stage], self.output_source[stage] = h.mean_output, f"ledger ({h.calls} calls)"
            else:
                guess = assumed * PLAN_OUTPUT_SHARE if stage == "plan" else assumed
                if stage in ("refine", "repair") and self.output.get(self.first_stages[-1]):
                    guess = self.output[self.first_stages[-1]]
                self.output[stage], self.output_source[stage] = guess, f"assumed {guess:.0f}/call"
        first = self.history.get(self.first_stages[0])
        if first is not None and first.samples:
            refine = self.history.get("refine")
            self.refine_rate = (refine.calls if refine else 0) / first.samples
            structured = sum(self.history[s].calls for s in (*self.first_stages, "refine")
                             if s in self.history and s != "plan")
            repair = self.history.get("repair")
            self.repair_rate = (repair.calls if repair else 0) / structured if structured else 0.0
            self.rates_source = f"ledger ({first.samples} samples)"
        else:
            self.refine_rate, self.repair_rate = settings.estimate_refine_rate, 0.0
            self.rates_source = "assumed"
        self.feedback_tokens = self.extractor.feedback_chars() / CHARS_PER_TOKEN
        self.prefix_tokens: dict[str, int] = {}

    # ---- prompts ---------------------------------------------------------------------------
    def _requests(self, item: Any) -> list[tuple[str, list[dict]]]:
        return self.extractor.planned_requests(
            item, plan_chars=int(self.output.get("plan", 0) * CHARS_PER_TOKEN),
            chain_chars=int(self.output.get("steps", 0) * CHARS_PER_TOKEN))

    def learn_prefixes(self, items: Sequence[Any]) -> None:
        """Each stage's static prefix: the longest start its prompts share over (up to 64 of) ``items``."""
        prefixes: dict[str, str] = {}
        for item in items[:_PREFIX_SAMPLE]:
            for stage, messages in self._requests(item):
                text = _contents(messages)
                prefixes[stage] = os.path.commonprefix([prefixes[stage], text]) if stage in prefixes else text
        if len(items) < 2:  # one prompt says nothing about which part is static
            prefixes = {}
        self.prefix_tokens = {stage: len(text) // CHARS_PER_TOKEN for stage, text in prefixes.items()}

    # ---- per sample --------------------------------------------------------------------------
    def sample_stages(self, item: Any) -> list[StageEstimate]:
        """Expected calls and tokens of one sample, per stage (cached tokens assume a warm prompt cache)."""
        out: list[StageEstimate] = []
        last_input = 0.0
        last_stage = self.first_stages[-1]
        for stage, messages in self._requests(item):
            t = float(tokens_of(messages))
            cached = float(min(cacheable_tokens(self.prefix_tokens.get(stage, 0)), t))
            out.append(StageEstimate(stage, 1.0, t, cached, self.output[stage]))
            if stage == last_stage:
                last_input = t
        # Refinement: the last first-pass conversation plus the chain and the feedback, r times per sample.
        refine_in = last_input + self.output[last_stage] + self.feedback_tokens
        cached = float(min(cacheable_tokens(self.prefix_tokens.get(last_stage, 0)), refine_in))
        r = self.refine_rate
        out.append(StageEstimate("refine", r, r * refine_in, r * cached, r * self.output["refine"]))
        structured = [s for s in out if s.stage != "plan"]
        q = self.repair_rate
        if q:
            calls = sum(s.calls for s in structured)
            mean_in = sum(s.input_tokens for s in structured) / calls if calls else 0.0
            mean_out = sum(s.output_tokens for s in structured) / calls if calls else 0.0
            out.append(StageEstimate("repair", q * calls, q * calls * (mean_in + mean_out + 40),
                                     0.0, q * calls * self.output["repair"]))
        for s in out:
            s.usd_sync, s.usd_batch = self._usd(s, "sync"), self._usd(s, "batch")
        return out

    def _usd(self, s: StageEstimate, mode: str) -> float:
        if self.price is None:
            return 0.0
        per_in, per_cached, per_out = self.price.rates(mode)
        return ((s.input_tokens - s.cached_tokens) * per_in + s.cached_tokens * per_cached
                + s.output_tokens * per_out) / 1_000_000

    def sample_usd(self, item: Any, mode: str = "sync") -> float:
        stages = self.sample_stages(item)
        return sum(s.usd_batch if mode == "batch" else s.usd_sync for s in stages)

    # ---- a whole plan ------------------------------------------------------------------------
    def estimate(self, items: Sequence[Any]) -> Estimate:
        if not self.prefix_tokens:
            self.learn_prefixes(items)
        by_stage: dict[str, StageEstimate] = {}
        for item in items:
            for s in self.sample_stages(item):
                acc = by_stage.setdefault(s.stage, StageEstimate(s.stage, output_source=self.output_source[s.stage]))
                acc.add(s)
        # The first request of a stage finds the prompt cache cold.
        for stage, acc in by_stage.items():
            if acc.calls >= 1 and acc.cached_tokens:
                first = cacheable_tokens(self.prefix_tokens.get(stage, 0))
                acc.cached_tokens -= first
                if self.price is not None:
                    for mode in ("sync", "batch"):
                        per_in, per_cached, _ = self.price.rates(mode)
                        extra = first * (per_in - per_cached) / 1_000_000
                        if mode == "sync":
                            acc.usd_sync += extra
                        else:
                            acc.usd_batch += extra
        extractor = self.extractor
        est = Estimate(extractor.protocol, extractor.prompt_version, extractor.client.model, len(items),
                       [by_stage[k] for k in [*self.first_stages, "refine", "repair"] if k in by_stage])
        est.assumptions = [
            f"input tokens: prompts built from the templates, {CHARS_PER_TOKEN} characters per token",
            f"output tokens per call: {', '.join(f'{k} {v}' for k, v in self.output_source.items())}",
            f"refinement calls per sample {self.refine_rate:.3f}, repairs per structured call "
            f"{self.repair_rate:.3f} ({self.rates_source})",
            "static prefix per stage (cached from the 2nd call when >= 1,024 tokens): "
            + ", ".join(f"{k} {v} tokens" for k, v in self.prefix_tokens.items()),
            "prices per 1M tokens: " + ("unpriced model (0)" if self.price is None else
                                        f"sync {self.price.rates('sync')}, batch {self.price.rates('batch')} "
                                        "(input, cached input, output)"),
        ]
        return est
