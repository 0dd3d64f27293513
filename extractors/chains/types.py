"""Records exchanged by chain extractors, the verifier and the mine stage (no I/O here)."""

from __future__ import annotations

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

    @property
    def accepted(self) -> bool:
        return self.chain is not None and not self.failures
