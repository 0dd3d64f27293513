"""The rule backend: deterministic reasoning chains built from the report and its labels.

The default extractor when no LLM endpoint is configured (``--extractor rules``). For one
sample it writes

1. a plan naming the findings the question asks about;
2. observation steps, one per report sentence that decided a label (the sentence is the
   exact evidence quote; the step text is that sentence cleaned of report wording), plus
   one step without evidence for the findings the report never mentions ("no sign of ...",
   since unmentioned findings count as normal);
3. interpretation steps from the knowledge map (sign → finding) for findings present or
   uncertain;
4. for the temporal task, the prior image's observation (quoted from the prior report)
   and a comparison step stating the progression;
5. a conclusion that states the gold answer ("Therefore, ... the answer is B) No.").

Placeholders and report wording: the evidence quote is always the verbatim sentence, so
it may contain ``___`` (quotes are data). The step *text* drops every comma/semicolon
clause that would leak (``___``, "report", "discussed with" ...); when nothing clean is
left, a template sentence built from the labels replaces it. Each step text is checked
with the verifier's own ``leakage_reasons`` before use, so the two never disagree.

The output goes through ``verify_chain`` like an LLM chain: the backend is expected to
pass for well-formed inputs, and a sample whose labels and answer disagree is rejected
with reason codes rather than papered over.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from extractors.chains.knowledge import (
    PROGRESSIONS,
    KnowledgeMap,
    canonical_observation,
    load_knowledge_map,
    observation_phrases,
    sign_phrase,
)
from extractors.chains.types import (
    LabelEvidence,
    MiningInput,
    MiningOutcome,
    VerificationFailure,
    gold_answer,
    string_list,
)
from extractors.chains.verify import (
    MAX_STEP_CHARS,
    MAX_STEPS,
    MIN_QUOTE_CHARS,
    ground_evidence,
    leakage_reasons,
    locate_quote,
    prior_offset,
    verify_chain,
)
from schemas.chains import Evidence, ReasoningChain, ReasoningStep, StepFinding

EXTRACTOR = "rules"
PROTOCOL = "rules"
PROMPT_VERSION = "rules-v1"
EXTRACTION_ERROR = "EXTRACTION_ERROR"  # the backend itself failed on this input

MAX_PHRASE_CHARS = 300  # longer sentences are summarised by a template instead
_SYSTEMATIC_REVIEW = (
    "Review the chest X-ray systematically: the heart and mediastinum, the lungs, the pleural spaces, "
    "the bones and any lines or tubes."
)
_STATUS_OF_LABEL = {"positive": "present", "uncertain": "uncertain", "negative": "absent", "not_mentioned": "absent"}
_PROGRESSION_VERB = {"improving": "has improved", "worsening": "has worsened", "stable": "is unchanged"}
_HEADER = re.compile(r"^(?:[A-Z][A-Z /&-]{2,}:\s*)+")
_ENUMERATION = re.compile(r"^(?:\(?\d{1,2}[.)]\s+)+")
_CLAUSE_BREAK = re.compile(r"(?<=[,;])\s+")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n\s*\n|:\s+")
# Wording of a normal study, to find the sentence behind a No Finding label that came without one.
_NORMAL_STUDY_CUES = (" no acute ", " unremarkable", " lungs are clear", " clear lungs", " no active ", " normal chest ")
_ABBREVIATION = re.compile(r"(?<![\w.])(?:Dr|Mr|Mrs|Ms|vs|approx|e\.g|i\.e|St)\.$", re.IGNORECASE)


# --- small text helpers --------------------------------------------------------------
def _display(observation: str) -> str:
    """How a finding reads in prose."""
    return "a normal study (no finding)" if observation == "No Finding" else observation.lower()


def _join(items: list[str], conjunction: str = "and") -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {conjunction} " + items[-1]


def _sentence_case(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] if text else text


def _lower_first(text: str) -> str:
    # "Large effusion" -> "large effusion", but keep acronyms such as "PICC line".
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        return text[0].lower() + text[1:]
    return text


def _full_stop(text: str) -> str:
    text = text.rstrip(" ,;:")
    return text if text.endswith((".", "!", "?")) else text + "."


def image_phrasing(sentence: str, option_letters: str = "") -> str | None:
    """A report sentence reworded as a statement about the image, or None if none is clean.

    Drops section headers, list numbers and every clause that leaks the source.
    """
    text = " ".join((sentence or "").split())
    previous = None
    while previous != text:  # "1. IMPRESSION: ..." has both, in either order
        previous, text = text, _ENUMERATION.sub("", _HEADER.sub("", text))
    clauses = [c for c in _CLAUSE_BREAK.split(text) if c and not leakage_reasons(c, option_letters, final=False)]
    phrased = _full_stop(_sentence_case(" ".join(clauses)))
    if len(phrased) < 4 or len(phrased) > MAX_PHRASE_CHARS:
        return None
    if not re.search(r"[A-Za-z]{3}", phrased) or leakage_reasons(phrased, option_letters, final=False):
        return None
    return phrased


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Rough sentence spans (offsets into ``text``); headers and blank lines also split."""
    spans, position = [], 0
    for match in [*_SENTENCE_BREAK.finditer(text), None]:
        if match and _ABBREVIATION.search(text[max(0, match.start() - 8):match.start()]):
            continue  # "Dr. ___" does not end a sentence
        end = match.start() if match else len(text)
        segment = text[position:end]
        stripped = segment.strip()
        if stripped:
            start = position + (len(segment) - len(segment.lstrip()))
            spans.append((start, start + len(stripped)))
        if match:
            position = match.end()
    return spans


def _mention_sentence(text: str, observation: str) -> tuple[int, int] | None:
    """The first sentence mentioning ``observation`` (CheXpert lexicon); for labels without a sentence."""
    if observation == "No Finding":
        phrases = _NORMAL_STUDY_CUES  # its lexicon lists abnormal terms, not mentions of a normal study
    else:
        phrases = observation_phrases(observation)
    for start, end in sentence_spans(text):
        padded = f" {' '.join(text[start:end].casefold().split())} "
        if any(p in padded for p in phrases):
            return start, end
    return None


# --- inputs, normalised --------------------------------------------------------------
def _labels_by_name(labels: Any) -> dict[str, LabelEvidence]:
    out: dict[str, LabelEvidence] = {}
    if isinstance(labels, Mapping):
        for name, label in labels.items():
            canonical = canonical_observation(name)
            if canonical and isinstance(label, LabelEvidence):
                out[canonical] = label
    return out


def _names(value: Any) -> list[str]:
    return list(dict.fromkeys(canonical_observation(v) or v for v in string_list(value)))


@dataclass
class _Sample:
    item: MiningInput
    task: str
    options: list[str]
    letter: str | None
    answer_text: str
    findings: list[str]
    answer_findings: list[str]
    labels: dict[str, LabelEvidence]
    prior_labels: dict[str, LabelEvidence]
    knowledge: KnowledgeMap = field(default_factory=load_knowledge_map)

    @classmethod
    def of(cls, item: MiningInput) -> "_Sample":
        sample = item.sample if isinstance(item.sample, Mapping) else {}
        options, letter, answer_text = gold_answer(sample)
        return cls(
            item=item,
            task=str(sample.get("task") or "").strip().lower(),
            options=options,
            letter=letter,
            answer_text=answer_text,
            findings=_names(sample.get("findings")),
            answer_findings=_names(sample.get("answer_findings")),
            labels=_labels_by_name(item.labels),
            prior_labels=_labels_by_name(item.prior_labels),
        )

    @property
    def letters(self) -> str:
        return "".join(chr(ord("A") + i) for i in range(min(len(self.options), 26)))

    def status(self, observation: str, prior: bool = False) -> str:
        label = (self.prior_labels if prior else self.labels).get(observation)
        return _STATUS_OF_LABEL.get(label.value if label else "not_mentioned", "absent")

    def value(self, observation: str) -> str:
        label = self.labels.get(observation)
        return label.value if label else "not_mentioned"

    def answer_phrase(self) -> str:
        if self.letter:
            return f"the answer is {self.letter}) {self.answer_text}".rstrip()
        return f"the answer is {self.answer_text}"


def _sentence_span(text: str, label: LabelEvidence | None, observation: str) -> tuple[int, int] | None:
    """Where the sentence that decided ``label`` sits in ``text`` (exact offsets)."""
    if label is None or label.value == "not_mentioned" or not text:
        return None
    sentence, start, end = label.sentence, label.start, label.end
    span = None
    if sentence and isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(text):
        if text[start:end] == sentence:
            span = (start, end)
    if span is None and sentence:
        span = locate_quote(sentence, text)
    if span is None:
        span = _mention_sentence(text, observation)
    if span is None:
        return None
    # Trim surrounding whitespace so the quote starts and ends on words.
    segment = text[span[0]:span[1]]
    start = span[0] + len(segment) - len(segment.lstrip())
    end = span[0] + len(segment.rstrip())
    if len("".join(text[start:end].split())) < MIN_QUOTE_CHARS:
        return None
    return start, end


# --- step builders -------------------------------------------------------------------
def _finding_clause(observation: str, status: str) -> str:
    if observation == "No Finding":
        return {"present": "the chest X-ray is normal", "uncertain": "the chest X-ray may be normal"}.get(
            status, "the chest X-ray is not entirely normal"
        )
    name = _display(observation)
    return {"present": f"{name} is present", "uncertain": f"{name} is possible but not definite"}.get(
        status, f"there is no {name}"
    )


def _template_text(findings: list[StepFinding]) -> str:
    return _full_stop(_sentence_case("; ".join(_finding_clause(f.observation, f.status) for f in findings)))


def _plan_step(s: _Sample) -> ReasoningStep:
    names = [_display(f) for f in s.findings]
    if s.task == "temporal" and names:
        text = f"Compare the prior and the current image for {names[0]}."
    elif s.task == "binary" and names:
        text = f"Examine the chest X-ray for signs of {names[0]}."
    elif s.task in ("single", "multi") and names:
        text = f"Check the chest X-ray for each candidate finding in turn: {_join(names)}."
    elif s.task != "open" and names:
        text = f"Review the chest X-ray systematically for {_join(names)}."
    else:
        # The open question names no findings, and the task builder's findings are the
        # answer: listing them here would give the answer away before the conclusion.
        text = _SYSTEMATIC_REVIEW
    if len(text) > MAX_STEP_CHARS:
        text = "Review the chest X-ray systematically for each finding in question."
    return ReasoningStep(kind="plan", text=text)


def _observation_step(
    s: _Sample, observations: list[str], span: tuple[int, int] | None, *, prior: bool = False, prefix: str = ""
) -> ReasoningStep:
    """One observation step: the findings one sentence decided, quoted from the (prior) report."""
    source = (s.item.prior_report if prior else s.item.report) or ""
    sentence = source[span[0]:span[1]] if span else ""
    findings = [
        StepFinding(
            observation=o,
            status=s.status(o, prior=prior),
            anatomy=s.knowledge.anatomy_in(o, sentence) if sentence else None,
        )
        for o in observations
    ]
    text = (image_phrasing(sentence, s.letters) if sentence else None) or _template_text(findings)
    if prefix:
        text = prefix + _lower_first(text)
    evidence = []
    if span:
        base = prior_offset(s.item) if prior else 0
        evidence.append(Evidence(quote=sentence, start=base + span[0], end=base + span[1]))
    return ReasoningStep(kind="observation", text=text, findings=findings, evidence=evidence)


def _unmentioned_step(observations: list[str]) -> ReasoningStep:
    """Findings the report never mentions count as normal: stated absent, with no quote."""
    regular = [o for o in observations if o != "No Finding"]
    parts = [f"There is no sign of {_join([_display(o) for o in regular], 'or')} on the image."] if regular else []
    if "No Finding" in observations:
        parts.append("The chest X-ray is not entirely normal.")
    findings = [StepFinding(observation=o, status="absent") for o in observations]
    return ReasoningStep(kind="observation", text=" ".join(parts), findings=findings)


def _is_plural(phrase: str) -> bool:
    """Whether a sign's head noun is plural ("air bronchograms indicate", "blunting ... indicates")."""
    head = re.split(r"\s+(?:of|with|in|on|at|along|beyond|over|from|to)\s+", phrase.casefold(), maxsplit=1)[0].split()
    return bool(head) and head[-1].endswith("s") and not head[-1].endswith(("ss", "us", "is"))


def _interpretation_step(s: _Sample, observation: str, status: str, sentence: str) -> ReasoningStep:
    name = _display(observation)
    matched = s.knowledge.signs_in(observation, sentence)
    knowledge = s.knowledge.get(observation)
    typical = [sign_phrase(x) for x in (knowledge.signs[:2] if knowledge else ())]
    if matched:
        sign = _sentence_case(sign_phrase(matched[0]))
        verb = "indicate" if _is_plural(sign) else "indicates"
        if status == "present":
            text = f"{sign} {verb} {name}."
        else:
            text = f"{sign} may indicate {name}, but it is not definite."
    elif typical:
        signs = _join(typical)
        text = (
            f"This appearance indicates {name}, whose typical signs are {signs}."
            if status == "present"
            else f"This appearance may represent {name}, whose typical signs are {signs}, but it is not definite."
        )
    else:
        text = f"This appearance indicates {name}." if status == "present" else f"This appearance may represent {name}."
    finding = StepFinding(observation=observation, status=status)
    return ReasoningStep(kind="interpretation", text=text, findings=[finding])


def _comparison_step(s: _Sample, observation: str | None) -> ReasoningStep | None:
    if observation is None:
        return None
    progression = s.answer_text.casefold()
    verb = _PROGRESSION_VERB.get(progression, "is compared for change")
    text = f"Compared with the prior image, the {_display(observation)} {verb}."
    finding = StepFinding(observation=observation, status=s.status(observation))
    return ReasoningStep(kind="comparison", text=text, findings=[finding])


def _conclusion_step(s: _Sample) -> ReasoningStep:
    answer = s.answer_phrase()
    if s.task == "binary" and s.findings:
        target = s.findings[0]
        yes = s.answer_text.casefold() == "yes"
        claim = f"there is {_display(target)}" if yes else f"there is no {_display(target)}"
        text = f"Therefore, {claim} in this chest X-ray; {answer}."
        findings = [StepFinding(observation=target, status=s.status(target))]
    elif s.task == "temporal" and s.findings:
        target = s.findings[0]
        progression = s.answer_text.casefold() if s.answer_text.casefold() in PROGRESSIONS else s.answer_text
        text = f"Therefore, the {_display(target)} is {progression}; {answer}."
        findings = [StepFinding(observation=target, status=s.status(target))]
    elif s.task in ("single", "multi"):
        present = [_display(o) for o in s.answer_findings]
        lead = "the finding present is" if len(present) == 1 else "the findings present are"
        text = f"Therefore, {lead} {_join(present)}; {answer}." if present else f"Therefore, {answer}."
        findings = [StepFinding(observation=o, status=s.status(o)) for o in s.answer_findings]
    elif s.task == "open" or not s.options:
        if s.answer_findings:
            names = _join([_display(o) for o in s.answer_findings])
            if len(s.answer_findings) == 1:
                text = f"Therefore, the finding in this chest X-ray is {names}."
            else:
                text = f"Therefore, the findings in this chest X-ray are {names}."
        else:
            text = "Therefore, there are no abnormal findings in this chest X-ray."
        findings = [StepFinding(observation=o, status=s.status(o)) for o in s.answer_findings]
    else:
        text = f"Therefore, {answer}."
        findings = []
    return ReasoningStep(kind="conclusion", text=_full_stop(text), findings=findings)


# --- assembling and fitting the bounds -----------------------------------------------
def _merge(steps: list[ReasoningStep]) -> ReasoningStep:
    return ReasoningStep(
        kind=steps[0].kind,
        text=" ".join(x.text for x in steps),
        findings=[f for x in steps for f in x.findings],
        evidence=[e for x in steps for e in x.evidence],
    )


def _pack(steps: list[ReasoningStep]) -> list[ReasoningStep]:
    """Merge consecutive steps while the merged text stays within MAX_STEP_CHARS."""
    packed: list[list[ReasoningStep]] = []
    for step in steps:
        if packed and sum(len(x.text) + 1 for x in packed[-1]) + len(step.text) <= MAX_STEP_CHARS:
            packed[-1].append(step)
        else:
            packed.append([step])
    return [_merge(group) for group in packed]


@dataclass
class _Blocks:
    """The pieces of a chain before they are fitted into MAX_STEPS."""

    plan: ReasoningStep
    prior: list[ReasoningStep]
    positives: list[tuple[ReasoningStep, list[ReasoningStep]]]  # observation, its interpretations
    negatives: list[ReasoningStep]  # absent-only steps, evidence first
    comparison: list[ReasoningStep]
    conclusion: ReasoningStep

    def layout(self, level: int) -> list[ReasoningStep]:
        """Level 0 interleaves interpretations; each level compresses further."""
        negatives = self.negatives if level < 1 else _pack(self.negatives)
        observations = [o for o, _ in self.positives]
        interpretations = [x for _, xs in self.positives for x in xs]
        if level == 0 or level == 1:
            body = [x for o, xs in self.positives for x in (o, *xs)]
        elif level == 2:
            body = observations + _pack(interpretations)
        elif level == 3:
            body = observations
        else:
            body = _pack(observations)
        return [self.plan, *self.prior, *body, *negatives, *self.comparison, self.conclusion]


def _build_blocks(s: _Sample) -> _Blocks:
    item = s.item
    report = item.report or ""
    asked = list(dict.fromkeys([*s.findings, *s.answer_findings]))
    temporal = s.task == "temporal"
    prefix = "On the current image, " if temporal else ""

    # Group asked findings by the sentence that decided them: one sentence, one step.
    by_span: dict[tuple[int, int], list[str]] = {}
    ungrounded: list[str] = []  # mentioned, but no sentence could be found (the verifier will say so)
    unmentioned: list[str] = []
    for observation in asked:
        if canonical_observation(observation) is None:
            continue  # not a CheXpert name: nothing to say; the verifier reports it unaddressed
        if s.value(observation) == "not_mentioned":
            unmentioned.append(observation)
            continue
        span = _sentence_span(report, s.labels.get(observation), observation)
        if span is None:
            ungrounded.append(observation)
        else:
            by_span.setdefault(span, []).append(observation)

    positives, negatives = [], []
    for span, observations in by_span.items():
        step = _observation_step(s, observations, span, prefix=prefix)
        sentence = report[span[0]:span[1]]
        interpretations = [
            _interpretation_step(s, f.observation, f.status, sentence)
            for f in step.findings
            if f.status in ("present", "uncertain")
        ]
        if interpretations:
            positives.append((step, interpretations))
        else:
            negatives.append(step)
    for observation in ungrounded:
        step = _observation_step(s, [observation], None, prefix=prefix)
        (positives.append((step, [])) if s.status(observation) != "absent" else negatives.append(step))
    if unmentioned:
        negatives.append(_unmentioned_step(unmentioned))

    prior: list[ReasoningStep] = []
    target = s.findings[0] if temporal and s.findings else None
    if target and item.prior_report and target in s.prior_labels:
        span = _sentence_span(item.prior_report, s.prior_labels[target], target)
        if span:
            prior.append(_observation_step(s, [target], span, prior=True, prefix="On the prior image, "))
    comparison = [c for c in [_comparison_step(s, target)] if c] if temporal else []
    return _Blocks(_plan_step(s), prior, positives, negatives, comparison, _conclusion_step(s))


def extract_rules_chain(item: MiningInput) -> ReasoningChain:
    """A deterministic chain for ``item``, compressed to at most MAX_STEPS steps when possible."""
    blocks = _build_blocks(_Sample.of(item))
    steps = blocks.layout(0)
    for level in range(1, 5):
        if len(steps) <= MAX_STEPS:
            break
        steps = blocks.layout(level)
    return ReasoningChain(steps=steps)


class RulesChainExtractor:
    """The rule backend behind the same ``extract(item) -> MiningOutcome`` shape as the LLM one."""

    extractor = EXTRACTOR
    protocol = PROTOCOL
    prompt_version = PROMPT_VERSION

    def _outcome(self, item: MiningInput, **fields: Any) -> MiningOutcome:
        sample = item.sample if isinstance(item.sample, Mapping) else {}
        return MiningOutcome(
            sample_id=str(sample.get("sample_id", "")),
            extractor=EXTRACTOR,
            protocol=PROTOCOL,
            model=None,
            prompt_version=PROMPT_VERSION,
            **fields,
        )

    def extract(self, item: MiningInput) -> MiningOutcome:
        try:
            chain = extract_rules_chain(item)
            failures = verify_chain(chain, item)
        except Exception as exc:  # noqa: BLE001 - one malformed sample must not stop a mining run
            failure = VerificationFailure(EXTRACTION_ERROR, f"{type(exc).__name__}: {exc}"[:500])
            return self._outcome(item, chain=None, failures=[failure])
        if failures:
            return self._outcome(item, chain=None, failures=failures, raw_output=chain.model_dump_json())
        return self._outcome(item, chain=ground_evidence(chain, item), failures=[])
