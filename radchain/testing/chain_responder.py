"""A FakeOpenAIServer responder that answers chain-mining prompts sensibly. TEST AND BENCHMARK
INFRASTRUCTURE ONLY: the pipeline never uses it, and nothing here is a model.

The fake server's ``default_responder`` returns the same two-step chain for every prompt,
which the verifier rightly rejects. To exercise the mine stage end to end (retries,
refinement, caching, the dead-letter table) the fake "model" has to answer each prompt
with a chain that makes sense for *that* sample. ``ChainResponder`` does so by looking the
request up: it is built from the list of ``MiningInput`` the stage will mine (for a
warehouse: ``flows.testing.chain_responder``), recognises which sample a chat-completions
body built by ``LLMChainExtractor`` is about, and answers with the rule backend's chain for
that sample (``extract_rules_chain``), as JSON with the evidence offsets left null, as an
LLM would reply. The server's fault injection (429/500/timeouts, malformed or
schema-invalid JSON, ungrounded evidence, contradictions) wraps these answers.

How a request is recognised (the first user message of the conversation; refine and repair
requests repeat it, so they resolve to the same sample):

* the fenced blocks give the report (and the prior report, when the prompt has one);
  candidates are the samples with exactly those reports;
* ``single`` prompts, the paper protocol's ``plan`` prompt and its ``polish`` prompt carry
  the question, the options block and the correct answer as rendered by
  ``extractors.chains.llm_backend``: the candidate whose three strings all occur wins;
* the paper protocol's ``steps`` prompt carries only the report and the plan; the plan is
  this responder's own answer to the ``plan`` call (``plan_text``), deterministic per
  sample and naming the question and the answer, so the candidate whose plan occurs wins.

What it answers:

* a request without ``response_format`` (the ``plan`` call): ``plan_text(item)``;
* the ``steps`` call: the rule chain without its conclusion (the polish call adds it);
* every other structured call (``single``, ``polish``, ``refine``, ``repair``): the full
  rule chain.

A body it cannot place gets ``default_responder``'s answer and is counted in ``misses``,
so a test can assert that every request was understood.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from extractors.chains.llm_backend import answer_text, options_block
from extractors.chains.rules_backend import extract_rules_chain
from extractors.chains.types import MiningInput
from radchain.testing.fake_openai import default_responder, fenced_blocks, wants_json
from schemas.chains import ReasoningChain


def _first_user_text(body: Mapping[str, Any]) -> str:
    for message in body.get("messages") or []:
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return message["content"]
    return ""


def _null_offsets(chain: ReasoningChain) -> ReasoningChain:
    """What an LLM replies: quotes only; offsets are the verifier's job."""
    steps = [
        step.model_copy(update={"evidence": [e.model_copy(update={"start": None, "end": None}) for e in step.evidence]})
        for step in chain.steps
    ]
    return ReasoningChain(steps=steps)


class ChainResponder:
    """``responder(body) -> str`` for FakeOpenAIServer; see the module docstring."""

    def __init__(self, items: Iterable[MiningInput]) -> None:
        self.items: list[MiningInput] = list(items)
        self._by_reports: dict[tuple[str, str], list[MiningInput]] = {}
        for it in self.items:
            self._by_reports.setdefault((it.report, it.prior_report or ""), []).append(it)
        self._chains: dict[str, ReasoningChain] = {}
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()  # plan | steps | structured | miss
        self.misses = 0

    # ---- what the "model" knows about a sample -----------------------------------------------
    def chain_for(self, item: MiningInput) -> ReasoningChain:
        with self._lock:
            chain = self._chains.get(item.sample_id)
        if chain is None:
            chain = _null_offsets(extract_rules_chain(item))
            with self._lock:
                self._chains[item.sample_id] = chain
        return chain

    def warm(self) -> ChainResponder:
        """Compute every sample's chain now (so the server thread does not do it under load)."""
        for it in self.items:
            self.chain_for(it)
        return self

    def plan_text(self, item: MiningInput) -> str:
        """The answer to the paper protocol's plan call: deterministic per sample."""
        sample = item.sample
        lines = [f"Plan for the question \"{sample.get('question', '')}\" (answer: {answer_text(sample)}):"]
        body = [s for s in self.chain_for(item).steps if s.kind not in ("plan", "conclusion")]
        for i, step in enumerate(body, 1):
            lines.append(f"{i}. {step.text}")
        lines.append(f"{len(body) + 1}. Conclude with {answer_text(sample)}.")
        return "\n".join(lines)

    # ---- recognising a request ----------------------------------------------------------------
    def find(self, body: Mapping[str, Any]) -> tuple[MiningInput | None, str]:
        """(sample, how it was recognised: "question" | "plan" | "")."""
        text = _first_user_text(body)
        blocks = fenced_blocks(text)
        if not blocks:
            return None, ""
        report = blocks[0]
        prior = blocks[1] if len(blocks) > 1 and "prior study" in text else ""
        candidates = self._by_reports.get((report, prior)) or []
        for it in candidates:  # the steps call first: its prompt holds this responder's own plan
            if self.plan_text(it) in text:
                return it, "plan"
        best, best_score = None, -1
        for it in candidates:
            sample = it.sample
            pieces = (str(sample.get("question") or ""), options_block(sample), answer_text(sample))
            if all(p and p in text for p in pieces):
                score = sum(len(p) for p in pieces)
                if score > best_score:
                    best, best_score = it, score
        if best is not None:
            return best, "question"
        return None, ""

    def __call__(self, body: dict[str, Any]) -> str:
        item, how = self.find(body)
        if item is None:
            with self._lock:
                self.misses += 1
                self.calls["miss"] += 1
            return default_responder(body)
        if not wants_json(body):
            with self._lock:
                self.calls["plan"] += 1
            return self.plan_text(item)
        chain = self.chain_for(item)
        if how == "plan":  # the paper protocol's steps call: the evidence steps, no conclusion yet
            steps = [s for s in chain.steps if s.kind != "conclusion"] or chain.steps
            chain = ReasoningChain(steps=steps)
            kind = "steps"
        else:
            kind = "structured"
        with self._lock:
            self.calls[kind] += 1
        return json.dumps(chain.model_dump(mode="json"), ensure_ascii=False)
