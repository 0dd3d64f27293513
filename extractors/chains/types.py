"""Records exchanged by chain extractors, the verifier and the mine stage (no I/O here)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas.chains import ReasoningChain


@dataclass(frozen=True)
class LabelEvidence:
    """A study's label for one observation and the sentence that decided it (offsets into the report)."""

    value: str  # positive | negative | uncertain | not_mentioned
    sentence: str | None = None
    start: int | None = None
    end: int | None = None


@dataclass(frozen=True)
class MiningInput:
    """Everything an extractor may see for one sample.

    ``sample`` is an int_vqa_samples row as a dict (sample_id, task, question, options,
    answer_letter, answer_text, findings, answer_findings, ...). ``report`` is the full raw
    report text of the current study; ``prior_report`` the prior study's (temporal task).
    ``labels`` maps every CheXpert observation to its LabelEvidence for the current study.
    """

    sample: dict[str, Any]
    report: str
    labels: dict[str, LabelEvidence]
    prior_report: str | None = None
    prior_labels: dict[str, LabelEvidence] | None = None

    @property
    def sample_id(self) -> str:
        return str(self.sample["sample_id"])


@dataclass(frozen=True)
class VerificationFailure:
    code: str  # stable reason code, e.g. EVIDENCE_NOT_FOUND
    detail: str
    step_index: int | None = None


@dataclass
class MiningOutcome:
    """Result of mining one sample: an accepted (verified) chain, or failures to dead-letter."""

    sample_id: str
    chain: ReasoningChain | None  # verified chain (evidence offsets filled) or None
    failures: list[VerificationFailure] = field(default_factory=list)
    extractor: str = "rules"  # rules | llm
    protocol: str = "rules"  # rules | single | paper
    model: str | None = None
    prompt_version: str = "rules-v1"
    request_hashes: list[str] = field(default_factory=list)
    refine_rounds: int = 0
    raw_output: str | None = None  # last raw LLM text when rejected
    llm_calls: list[dict[str, Any]] = field(default_factory=list)  # int_llm_calls rows (without lineage)
    skip_reason: str | None = None  # not mined at all (BUDGET: the run's spend cap); neither chain nor rejection

    @property
    def accepted(self) -> bool:
        return self.chain is not None and not self.failures


def string_list(value: Any) -> list[str]:
    """A list of strings from a list, tuple, array or single string (rows may come from Arrow)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
        return [str(v) for v in value if v is not None]
    return []


def gold_answer(sample: Any) -> tuple[list[str], str | None, str]:
    """(options, answer letter, answer text) of a sample row; the letter is recovered from the
    answer text when a row lacks it. The rule backend and the verifier must read it the same way."""
    sample = sample if isinstance(sample, Mapping) else {}
    options = string_list(sample.get("options"))
    letter = sample.get("answer_letter")
    letter = letter.strip().upper() if isinstance(letter, str) and letter.strip() else None
    answer_text = str(sample.get("answer_text") or "").strip()
    if letter is None and answer_text and answer_text in options:
        letter = chr(ord("A") + options.index(answer_text))
    return options, letter, answer_text
