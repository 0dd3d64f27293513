"""Reasoning chains: the structured-output contract for extractors, and the stored tables."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.base import TableRecord
from schemas.checks import relationship, sql_check

StepKind = Literal["plan", "observation", "interpretation", "comparison", "conclusion"]
FindingStatus = Literal["present", "absent", "uncertain"]


class StepFinding(BaseModel):
    model_config = ConfigDict(extra="forbid")

    observation: str = Field(description="CheXpert observation name, e.g. 'Pleural Effusion'")
    status: FindingStatus
    anatomy: str | None = Field(default=None, description="where, when stated, e.g. 'left costophrenic angle'")


class Evidence(BaseModel):
    model_config = ConfigDict(extra="forbid")

    quote: str = Field(description="exact words copied from the report")
    start: int | None = Field(default=None, description="filled by the verifier: offset of the quote in the report")
    end: int | None = None


class ReasoningStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: StepKind
    text: str = Field(description="the step, phrased as observed in the image")
    findings: list[StepFinding] = Field(default_factory=list)
    evidence: list[Evidence] = Field(default_factory=list)


class ReasoningChain(BaseModel):
    """What an extractor (LLM or rules) returns for one sample."""

    model_config = ConfigDict(extra="forbid")

    steps: list[ReasoningStep]

    def render(self) -> str:
        """The chain as the text that goes inside <think></think>."""
        return "\n".join(s.text.strip() for s in self.steps if s.kind != "plan" or s.text.strip())


class ChainRow(TableRecord):
    __table__ = "int_chains"
    __description__ = "Accepted (verified) reasoning chains, one per sample."
    __grain__ = "one chain (sample)"
    __key__ = ("chain_id",)

    chain_id: str
    sample_id: str
    study_id: str
    task: str
    extractor: Literal["rules", "llm"]
    protocol: str  # rules | single | paper
    model: str | None = None
    prompt_version: str
    request_hashes: list[str]
    refine_rounds: int
    n_steps: int
    text: str

    __checks__ = (
        relationship("int_chains", "sample_id", "int_vqa_samples", "sample_id",
                     description="every chain's sample exists"),
        relationship("int_chains", "study_id", "raw_reports", "study_id"),
        sql_check("int_chains", "n_steps_matches",
                  "SELECT c.chain_id AS id FROM {table} c LEFT JOIN (SELECT chain_id, count(*) AS n FROM "
                  "int_chain_steps GROUP BY chain_id) s USING (chain_id) WHERE coalesce(s.n, 0) <> c.n_steps",
                  "a chain has exactly n_steps rows in int_chain_steps", reads=("int_chain_steps",)),
    )


class ChainStepRow(TableRecord):
    __table__ = "int_chain_steps"
    __description__ = "Steps of accepted chains, with stated findings and evidence offsets."
    __grain__ = "one step of one chain"
    __key__ = ("chain_id", "step_index")

    chain_id: str
    sample_id: str
    step_index: int
    kind: str
    text: str
    findings: list[StepFinding]
    evidence: list[Evidence]

    __checks__ = (
        relationship("int_chain_steps", "chain_id", "int_chains", "chain_id",
                     description="every step's chain exists"),
        # Offsets index the report, a newline, then the prior report (extractors/chains/verify.py; v_chain_evidence).
        sql_check("int_chain_steps", "evidence_offsets",
                  "SELECT x.chain_id || '|' || x.step_index AS id, format('quote <{{}}> at [{{}}, {{}}) of study {{}}', "
                  "x.e.quote, x.e.start, x.e.\"end\", s.study_id) AS detail "
                  "FROM (SELECT chain_id, sample_id, step_index, unnest(evidence) AS e FROM {table}) x "
                  "JOIN int_vqa_samples s USING (sample_id) "
                  "LEFT JOIN raw_reports r ON r.study_id = s.study_id "
                  "LEFT JOIN raw_reports p ON p.study_id = s.prior_study_id "
                  "WHERE NOT coalesce(CASE "
                  "WHEN x.e.start < 0 OR x.e.\"end\" < x.e.start THEN false "
                  "WHEN x.e.\"end\" <= length(r.text) "
                  "THEN substr(r.text, x.e.start + 1, x.e.\"end\" - x.e.start) = x.e.quote "
                  "WHEN x.e.start > length(r.text) "
                  "THEN substr(p.text, x.e.start - length(r.text), x.e.\"end\" - x.e.start) = x.e.quote "
                  "ELSE false END, false)",
                  "every evidence quote's offsets lie inside its report (or prior report) and cut out exactly "
                  "the quote", reads=("int_vqa_samples", "raw_reports")),
    )
