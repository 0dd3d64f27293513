"""The LLM judge for RadRScore: the release's procedure (a language model reads the gold
reasoning, the report's findings and the model's reasoning, and judges them) through the
radchain LLM client, with its cache, retries and accounting.

The judge is asked for *verdicts*, not ratios: which findings the reasoning states and
whether each is correct, which gold key findings it recalls, which of its steps the gold
reasoning supports. The ratios are computed here from those verdicts, over the same step
split and the same gold key findings as the rules judge (training/radrscore.py), so the
two judges differ only in how they read meaning, and `radchain judge-agreement` compares
like with like. A verdict that leaves an item out counts it as not recalled / not
supported; a stated finding the judge leaves out is simply not counted.

Edge cases match the rules judge: unparseable output is scored 0 without a request; no
gold chain leaves completeness and effectiveness undefined. A request that fails (after the
client's retries and its one repair) yields no score for that sample; callers decide what
to do (``radchain score --judge llm`` falls back to the rules judge and says how often).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.labels import OBSERVATIONS
from training.findings_text import split_steps
from training.radrscore import GoldChain, ReasoningScore

PROMPT_VERSION = "radrscore-judge-v1"
STAGE = "judge"


class StatedFindingVerdict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    observation: str = Field(description="CheXpert observation name the reasoning states")
    status: Literal["present", "absent", "uncertain"]
    correct: bool = Field(description="true when the reference findings agree with this status")


class GoldFindingVerdict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int = Field(description="number of the key finding in the list given")
    recalled: bool


class StepVerdict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int = Field(description="number of the candidate's step")
    supported: bool


class JudgeVerdict(BaseModel):
    """What the judge returns for one sample."""

    model_config = ConfigDict(extra="forbid")

    stated_findings: list[StatedFindingVerdict]
    key_findings: list[GoldFindingVerdict]
    steps: list[StepVerdict]


SYSTEM_PROMPT = (
    "You are a thoracic radiologist grading another reader's diagnostic reasoning about one chest X-ray. "
    "You compare it with a reference reasoning written from the radiology report, and with the findings "
    "the report establishes. Judge meaning, not wording: 'no evidence of fluid in the pleural space' and "
    "'no pleural effusion' say the same thing. Use only the CheXpert observation names you are given: "
    + ", ".join(OBSERVATIONS) + "."
)

_INSTRUCTIONS = """\
Give three verdicts.

1. stated_findings: every finding the CANDIDATE REASONING asserts, once per (observation, status), with
   status present, absent or uncertain (hedged: "possible", "cannot exclude", "may represent").
   correct is true when the REPORT FINDINGS agree: a positive finding is correctly called present; an
   uncertain one is correctly called uncertain or present; a negative or unlisted one is correctly
   called absent. Findings the candidate does not assert are not listed.
2. key_findings: for each numbered KEY FINDING of the reference, whether the candidate reasoning
   states the same finding with the same status (an uncertain key finding is also recalled by
   "present").
3. steps: for each numbered CANDIDATE STEP, whether it is supported by the reference reasoning,
   i.e. some reference step makes the same observation or the same inference. Filler that makes no
   observation or inference of the reference is not supported.
"""


def _labels_block(labels: Mapping[str, str]) -> str:
    groups: dict[str, list[str]] = {"positive": [], "uncertain": [], "negative": []}
    for obs, value in sorted(labels.items()):
        if value in groups:
            groups[value].append(obs)
    lines = [f"- {kind}: {', '.join(names) if names else 'none'}" for kind, names in groups.items()]
    lines.append("- every other observation: not mentioned in the report (counts as absent)")
    return "\n".join(lines)


def build_messages(step_texts: list[str], gold: GoldChain, labels: Mapping[str, str]) -> list[dict[str, str]]:
    """The judge's chat messages for one sample (exposed for tests and for prompt review)."""
    key = sorted(gold.key_findings)
    key_block = "\n".join(f"{i}. {obs}: {status}" for i, (obs, status) in enumerate(key, 1)) or "(none)"
    ref_block = "\n".join(f"{i}. {s.text}" for i, s in enumerate(gold.steps, 1)) or "(none)"
    cand_block = "\n".join(f"{i}. {t}" for i, t in enumerate(step_texts, 1)) or "(none)"
    report_block = _labels_block(labels) if labels else "(not available: use the key findings as the reference)"
    user = (
        f"REPORT FINDINGS\n{report_block}\n\n"
        f"REFERENCE REASONING\n{ref_block}\n\n"
        f"KEY FINDINGS OF THE REFERENCE\n{key_block}\n\n"
        f"CANDIDATE STEPS\n{cand_block}\n\n"
        f"{_INSTRUCTIONS}"
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def score_from_verdict(verdict: JudgeVerdict, n_steps: int, gold: GoldChain, has_labels: bool) -> ReasoningScore:
    """Ratios from a verdict, with the rules judge's conventions for undefined components."""
    n_key = len(gold.key_findings)
    recalled = {v.index for v in verdict.key_findings if v.recalled and 1 <= v.index <= n_key}
    supported = {v.index for v in verdict.steps if v.supported and 1 <= v.index <= n_steps}
    stated = {(f.observation, f.status): f.correct for f in verdict.stated_findings}
    completeness = len(recalled) / n_key if n_key else None
    if has_labels or n_key:
        factuality: float | None = sum(stated.values()) / len(stated) if stated else 0.0
    else:
        factuality = None
    effectiveness = None if gold.empty else (len(supported) / n_steps if n_steps else 0.0)
    return ReasoningScore(completeness, factuality, effectiveness, False, n_steps, len(stated))


@dataclass
class JudgeOutcome:
    sample_id: str
    score: ReasoningScore | None  # None when the request failed
    error_code: str | None = None
    llm_calls: list[dict[str, Any]] = field(default_factory=list)  # int_llm_calls rows (no lineage)


@dataclass(frozen=True)
class JudgeItem:
    sample_id: str
    think: str | None  # None = unparseable
    gold: GoldChain
    labels: Mapping[str, str]


class LLMJudge:
    """RadRScore through an ``extractors.llm.client.LLMClient`` (anything with ``complete_structured``)."""

    def __init__(self, client: Any, *, prompt_version: str = PROMPT_VERSION, max_tokens: int | None = 2048) -> None:
        self.client = client
        self.prompt_version = prompt_version
        self.max_tokens = max_tokens

    async def judge(self, item: JudgeItem) -> JudgeOutcome:
        if item.think is None:
            return JudgeOutcome(item.sample_id, ReasoningScore.unparseable_score(item.gold, bool(item.labels)))
        steps = split_steps(item.think)
        if not steps:  # nothing to read: the rules judge's answer is exact, no need to ask
            return JudgeOutcome(item.sample_id, score_from_verdict(JudgeVerdict(stated_findings=[], key_findings=[],
                                                                                steps=[]), 0, item.gold,
                                                                   bool(item.labels)))
        result = await self.client.complete_structured(
            build_messages(steps, item.gold, item.labels),
            schema=JudgeVerdict,
            stage=STAGE,
            sample_id=item.sample_id,
            prompt_version=self.prompt_version,
            max_tokens=self.max_tokens,
        )
        if not result.ok or result.parsed is None:
            return JudgeOutcome(item.sample_id, None, result.error_code or "NO_VERDICT", list(result.calls))
        score = score_from_verdict(result.parsed, len(steps), item.gold, bool(item.labels))
        return JudgeOutcome(item.sample_id, score, None, list(result.calls))

    async def judge_many(self, items: Iterable[JudgeItem]) -> list[JudgeOutcome]:
        """All items concurrently; the client's throttle bounds what is actually in flight."""
        return list(await asyncio.gather(*(self.judge(it) for it in items)))


# ---- agreement between the two judges ----------------------------------------------------------
COMPONENTS = ("completeness", "factuality", "effectiveness", "radrscore")


def judge_agreement(
    rules: Mapping[str, ReasoningScore], llm: Mapping[str, ReasoningScore]
) -> list[dict[str, Any]]:
    """Pearson and Spearman correlation per component between two judges' per-sample scores.

    Only samples both judges scored, that were parseable (both give unparseable output 0, which
    would inflate agreement) and where the component is defined for both, are compared. A
    correlation is None when fewer than 3 pairs remain or either side is constant.
    """
    import math

    from scipy import stats

    shared = sorted(sid for sid in rules if sid in llm and not rules[sid].unparseable and not llm[sid].unparseable)
    out = []
    for name in COMPONENTS:
        pairs = [(getattr(rules[s], name), getattr(llm[s], name)) for s in shared]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
        pearson = spearman = None
        if len(pairs) >= 3 and len(set(xs)) > 1 and len(set(ys)) > 1:
            pearson = float(stats.pearsonr(xs, ys).statistic)
            spearman = float(stats.spearmanr(xs, ys).statistic)
            pearson = None if math.isnan(pearson) else pearson
            spearman = None if math.isnan(spearman) else spearman
        out.append(dict(
            component=name, n=len(pairs), pearson=pearson, spearman=spearman,
            mean_rules=sum(xs) / len(xs) if xs else None, mean_llm=sum(ys) / len(ys) if ys else None,
            mean_abs_diff=sum(abs(a - b) for a, b in pairs) / len(pairs) if pairs else None,
        ))
    return out
