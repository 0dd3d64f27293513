"""Deterministic verification of reasoning chains, with stable reason codes.

Every mined chain (LLM or rules) passes through ``verify_chain`` before it is accepted;
each failed check yields a ``VerificationFailure`` whose code is stable (the mine stage
dead-letters on it, the refinement prompt quotes it back to the LLM, and analysts group
rejections by it). ``ground_evidence`` fills in the character offsets of evidence quotes.

Decisions, documented once here:

* **Evidence offsets.** Offsets index the *evidence document* ``report + "\\n" +
  prior_report`` (just ``report`` when there is no prior). A quote from the current report
  has ``0 <= start < end <= len(report)``; a quote from the prior report (allowed for the
  temporal task only) is shifted by ``len(report) + 1``, so offsets are never negative and
  ``evidence_source`` tells which report a quote came from. A quote is matched within one
  report, never across the separator.
* **Matching.** Quotes match case-insensitively with any run of whitespace standing for
  any other (MIMIC wraps lines with ``"\\n "``), at word boundaries, optionally without a
  trailing ``.,;:``. The grounded copy replaces each quote by the exact report span, so
  ``document[start:end] == quote`` always holds for stored evidence. Offsets already on
  an Evidence are kept when they point at a matching span (so a repeated sentence keeps
  the occurrence the labeler chose); otherwise the first occurrence wins.
* **Evidence versus text.** Evidence quotes are verbatim data and may contain ``___`` or
  the word "report"; the leakage checks apply to step *text* only (what the model learns
  to write, see ``ReasoningChain.render``).
* **Which statements need a quote.** An observation step needs at least one quote unless
  every finding it states is "absent" for an observation the report does not mention
  (unmentioned findings count as normal, as in the release). Explicit negatives need the
  negating sentence.
* **Statuses versus labels** (``ACCEPTED_STATUSES``): positive↔present,
  negative/not_mentioned↔absent, uncertain↔uncertain only. A hedged report ("may
  represent atelectasis") is neither evidence of presence nor of absence, so stating
  either would put words in the radiologist's mouth. Comparison steps describe change and
  are not checked against labels; an observation step whose quotes all come from the prior
  report is checked against the prior study's labels (skipped when those are unknown).
* **Options addressed.** Option tasks must address every finding in ``sample["findings"]``;
  the open question names no findings, so there only the answer findings are required.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from extractors.chains.knowledge import PROGRESSIONS, canonical_observation, load_knowledge_map, observation_phrases
from extractors.chains.types import LabelEvidence, MiningInput, VerificationFailure, gold_answer, string_list
from extractors.trie import any_of
from schemas.chains import Evidence, ReasoningChain, ReasoningStep
from schemas.vqa import TASKS

# --- stable reason codes -------------------------------------------------------------
EVIDENCE_NOT_FOUND = "EVIDENCE_NOT_FOUND"
OBSERVATION_WITHOUT_EVIDENCE = "OBSERVATION_WITHOUT_EVIDENCE"
STATUS_CONTRADICTS_LABEL = "STATUS_CONTRADICTS_LABEL"
ANSWER_MISMATCH = "ANSWER_MISMATCH"
NO_CONCLUSION = "NO_CONCLUSION"
OPTION_NOT_ADDRESSED = "OPTION_NOT_ADDRESSED"
LEAKAGE = "LEAKAGE"
TOO_FEW_STEPS = "TOO_FEW_STEPS"
TOO_MANY_STEPS = "TOO_MANY_STEPS"
STEP_TOO_LONG = "STEP_TOO_LONG"
CHAIN_TOO_LONG = "CHAIN_TOO_LONG"
STEP_EMPTY = "STEP_EMPTY"
TEMPORAL_NO_COMPARISON = "TEMPORAL_NO_COMPARISON"
UNKNOWN_OBSERVATION = "UNKNOWN_OBSERVATION"
UNKNOWN_TASK = "UNKNOWN_TASK"  # the sample's task is none of TASKS: there is no gold answer to check
# The quote exists but says the opposite of the step ("No pleural effusion." cited for an
# effusion): happens when a label source (e.g. a CSV) disagrees with the report text.
EVIDENCE_CONTRADICTS_FINDING = "EVIDENCE_CONTRADICTS_FINDING"
# The quotes are in the report but about something else: they name findings, and none of them
# is one the step states (nor a related finding, nor a sign of it). "The heart is enlarged."
# cited for "no pneumothorax" passes every other check.
EVIDENCE_OFF_TOPIC = "EVIDENCE_OFF_TOPIC"
REASON_CODES = (
    EVIDENCE_NOT_FOUND, OBSERVATION_WITHOUT_EVIDENCE, STATUS_CONTRADICTS_LABEL, ANSWER_MISMATCH,
    NO_CONCLUSION, OPTION_NOT_ADDRESSED, LEAKAGE, TOO_FEW_STEPS, TOO_MANY_STEPS, STEP_TOO_LONG,
    CHAIN_TOO_LONG, STEP_EMPTY, TEMPORAL_NO_COMPARISON, UNKNOWN_OBSERVATION, UNKNOWN_TASK,
    EVIDENCE_CONTRADICTS_FINDING, EVIDENCE_OFF_TOPIC,
)

# --- bounds --------------------------------------------------------------------------
MIN_STEPS = 2  # at least one reasoning step before the conclusion
MAX_STEPS = 12  # the release averages about 5 steps per chain
MAX_STEP_CHARS = 400
MAX_CHAIN_CHARS = 4000
MIN_QUOTE_CHARS = 4  # non-space characters; shorter quotes ("no") ground trivially anywhere

ACCEPTED_STATUSES: Mapping[str, frozenset[str]] = {
    "positive": frozenset({"present"}),
    "negative": frozenset({"absent"}),
    "not_mentioned": frozenset({"absent"}),
    "uncertain": frozenset({"uncertain"}),
}
OPTION_TASKS = ("binary", "single", "multi", "temporal")
PRIOR_SEPARATOR = "\n"
EvidenceSource = Literal["report", "prior_report"]

# --- leakage -------------------------------------------------------------------------
# Wording that reveals the text source instead of the image.
_LEAK_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (why, re.compile(pattern, flags))
    for why, pattern, flags in (
        ("refers to the report", r"\breport\w*", re.IGNORECASE),
        ("refers to the radiologist", r"\bradiologists?\b", re.IGNORECASE),
        ("refers to dictation", r"\bdictat\w*", re.IGNORECASE),
        ("names a report section",
         r"\b(?:impression|findings|indication|history|technique|comparison)\s+section\b", re.IGNORECASE),
        # Upper-case headers as MIMIC writes them; "Findings:" in prose is left alone.
        ("quotes a report header",
         r"\b(?:IMPRESSION|FINDINGS|INDICATION|HISTORY|TECHNIQUE|COMPARISON|EXAMINATION)\s*:", 0),
        ("quotes a report header", r"\b(?:impression|indication|technique|examination)\s*:", re.IGNORECASE),
        ("refers to the plan", r"\bper\s+(?:the\s+)?plan\b", re.IGNORECASE),
        ("cites a source", r"\baccording\s+to\b", re.IGNORECASE),
        ("reports a communication",
         r"\b(?:discussed|communicated|telephoned|paged|notified)\b|\bwet\s+read\b", re.IGNORECASE),
        ("contains a de-identification placeholder", r"_{2,}|\[\*\*", 0),
        # Open-i style placeholders are upper case only ("XXXX").
        ("contains a de-identification placeholder", r"X{3,}", 0),
    )
)
# The same patterns joined per flag set, so a clean step costs two searches, not eleven.
_ANY_LEAK = tuple(
    any_of(p for _, p in _LEAK_PATTERNS if p.flags & re.IGNORECASE == flag) for flag in (re.IGNORECASE, 0)
)
_ANSWER_WORDS = re.compile(r"\b(?:the|final|correct)\s+answer\b|\banswer\s+is\b", re.IGNORECASE)
# Option letters are capitals: "(B)", "B)", or "answer is B" / "option B".
_LETTER_MARKER = re.compile(r"(?<!\w)\(?([A-Z])\)")
_LETTER_STATED = re.compile(
    r"(?i:\b(?:answer|option|choice)\b)(?:\s+(?i:is|would\s+be))?\s*[:\-]?\s*\(?([A-Z])(?!\w)"
)
_NORMAL_STUDY = re.compile(
    r"\bno\s+(?:acute\s+|abnormal\s+|significant\s+|active\s+)*(?:findings?|abnormalit\w*)\b|\bnormal\b",
    re.IGNORECASE,
)


# --- quote grounding -----------------------------------------------------------------
_QUOTE_TRIM = " \t\r\n\"'\u201c\u201d\u2018\u2019`"


@lru_cache(maxsize=4096)
def _quote_patterns(quote: str) -> tuple[re.Pattern[str], ...]:
    """Regexes that find ``quote`` whatever the whitespace and case; the exact quote first."""
    core = quote.strip(_QUOTE_TRIM)
    variants = [core]
    stripped = core.rstrip(".,;:").strip(_QUOTE_TRIM)
    if stripped and stripped != core:
        variants.append(stripped)
    patterns = []
    for text in variants:
        tokens = text.split()
        if not tokens:
            continue
        body = r"\s+".join(re.escape(t) for t in tokens)
        head = r"(?<!\w)" if (text[0].isalnum() or text[0] == "_") else ""
        tail = r"(?!\w)" if (text[-1].isalnum() or text[-1] == "_") else ""
        patterns.append(re.compile(head + body + tail, re.IGNORECASE))
    return tuple(patterns)


def locate_quote(quote: str, text: str) -> tuple[int, int] | None:
    """Offsets of the first occurrence of ``quote`` in ``text`` (whitespace/case-insensitive)."""
    if not isinstance(quote, str) or not isinstance(text, str):
        return None
    for pattern in _quote_patterns(quote):
        match = pattern.search(text)
        if match:
            return match.start(), match.end()
    return None


def _quote_too_short(quote: Any) -> bool:
    return not isinstance(quote, str) or len("".join(quote.split())) < MIN_QUOTE_CHARS


def evidence_document(item: MiningInput) -> str:
    """The text evidence offsets index: the report, then the prior report after a separator."""
    report = item.report or ""
    return report + PRIOR_SEPARATOR + item.prior_report if item.prior_report else report


def prior_offset(item: MiningInput) -> int:
    """Where the prior report starts in the evidence document."""
    return len(item.report or "") + len(PRIOR_SEPARATOR)


def evidence_source(evidence: Evidence, item: MiningInput) -> EvidenceSource | None:
    """Which report a grounded quote comes from (None when it has no offsets)."""
    if evidence.start is None:
        return None
    return "prior_report" if item.prior_report and evidence.start >= prior_offset(item) else "report"


def _regions(item: MiningInput, allow_prior: bool) -> list[tuple[int, str]]:
    regions = [(0, item.report or "")]
    if allow_prior and item.prior_report:
        regions.append((prior_offset(item), item.prior_report))
    return regions


def _ground(evidence: Evidence, regions: list[tuple[int, str]]) -> tuple[int, int] | None:
    """Document offsets of one quote: its own offsets if they point at it, else the first match."""
    if _quote_too_short(evidence.quote):
        return None
    start, end = evidence.start, evidence.end
    if isinstance(start, int) and isinstance(end, int) and start < end:
        for base, text in regions:
            if base <= start and end <= base + len(text):
                for pattern in _quote_patterns(evidence.quote):
                    if pattern.fullmatch(text, start - base, end - base):
                        return start, end
    for base, text in regions:
        found = locate_quote(evidence.quote, text)
        if found:
            return base + found[0], base + found[1]
    return None


def ground_evidence(chain: ReasoningChain, item: MiningInput) -> ReasoningChain:
    """A copy of ``chain`` with evidence offsets filled and quotes set to the exact report span.

    Quotes that cannot be found keep their text and get ``start = end = None`` (the verifier
    reports them). Observation names are rewritten to their CheXpert spelling when known.
    """
    regions = _regions(item, allow_prior=_task(item) == "temporal")
    document = evidence_document(item)
    steps = []
    for step in chain.steps:
        evidence = []
        for ev in step.evidence:
            span = _ground(ev, regions)
            if span is None:
                evidence.append(Evidence(quote=ev.quote, start=None, end=None))
            else:
                evidence.append(Evidence(quote=document[span[0]:span[1]], start=span[0], end=span[1]))
        findings = [
            f.model_copy(update={"observation": canonical_observation(f.observation) or f.observation})
            for f in step.findings
        ]
        steps.append(step.model_copy(update={"evidence": evidence, "findings": findings}))
    return ReasoningChain(steps=steps)


# --- the sample, normalised once -----------------------------------------------------
def _task(item: MiningInput) -> str:
    sample = item.sample if isinstance(item.sample, Mapping) else {}
    return str(sample.get("task") or "").strip().lower()


def _name_key(name: str) -> str:
    return canonical_observation(name) or " ".join(str(name).split()).casefold()


def _canonical_labels(labels: Any) -> dict[str, str] | None:
    if not isinstance(labels, Mapping):
        return None
    out = {}
    for name, label in labels.items():
        value = label.value if isinstance(label, LabelEvidence) else getattr(label, "value", label)
        out[_name_key(name)] = str(value)
    return out


@dataclass
class _Gold:
    task: str
    options: list[str]
    letters: str  # valid option letters, e.g. "ABCD"
    letter: str | None
    answer_text: str
    findings: list[str]  # canonical keys of the findings the question asks about
    answer_findings: list[str]
    labels: dict[str, str]
    prior_labels: dict[str, str] | None

    @classmethod
    def of(cls, item: MiningInput) -> "_Gold":
        sample = item.sample if isinstance(item.sample, Mapping) else {}
        options, letter, answer_text = gold_answer(sample)
        letters = "".join(chr(ord("A") + i) for i in range(min(len(options), 26)))
        if letter and letter not in letters:
            letters += letter
        return cls(
            task=_task(item),
            options=options,
            letters=letters,
            letter=letter,
            answer_text=answer_text,
            findings=list(dict.fromkeys(_name_key(f) for f in string_list(sample.get("findings")))),
            answer_findings=list(dict.fromkeys(_name_key(f) for f in string_list(sample.get("answer_findings")))),
            labels=_canonical_labels(item.labels) or {},
            prior_labels=_canonical_labels(item.prior_labels),
        )

    @property
    def is_option_task(self) -> bool:
        return self.task in OPTION_TASKS or (self.task != "open" and bool(self.options))

    def progression(self) -> str | None:
        text = self.answer_text.casefold()
        if text in PROGRESSIONS:
            return text
        if self.letter and self.letters and self.letter in self.letters[: len(self.options)]:
            option = self.options[self.letters.index(self.letter)].casefold()
            return option if option in PROGRESSIONS else None
        return None

    def binary_expectation(self) -> str | None:
        """The status the binary answer asserts for the asked finding."""
        text = self.answer_text.casefold()
        if text not in ("yes", "no") and self.letter and self.letter in self.letters[: len(self.options)]:
            text = self.options[self.letters.index(self.letter)].casefold()
        return {"yes": "present", "no": "absent"}.get(text)


def _mentions(text: str, phrase: str) -> bool:
    """Whole-phrase, case- and whitespace-insensitive mention."""
    tokens = phrase.split()
    if not tokens:
        return False
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(t) for t in tokens) + r"(?!\w)"
    return re.search(pattern, text, re.IGNORECASE) is not None


def stated_letters(text: str, valid: str) -> set[str]:
    """Option letters a text commits to; an explicit "answer is X" outranks bare "X)" markers."""
    if not valid:
        return set()
    explicit = {m for m in _LETTER_STATED.findall(text) if m in valid}
    return explicit or {m for m in _LETTER_MARKER.findall(text) if m in valid}


# --- the checks ----------------------------------------------------------------------
def _check_shape(steps: list[ReasoningStep]) -> list[VerificationFailure]:
    failures = []
    # An empty plan is tolerated and not counted: ReasoningChain.render leaves it out.
    counted = sum(1 for s in steps if s.kind != "plan" or s.text.strip())
    if counted < MIN_STEPS:
        failures.append(VerificationFailure(TOO_FEW_STEPS, f"{counted} steps; at least {MIN_STEPS} required"))
    if counted > MAX_STEPS:
        failures.append(VerificationFailure(TOO_MANY_STEPS, f"{counted} steps; at most {MAX_STEPS} allowed"))
    total = 0
    for i, step in enumerate(steps):
        length = len(step.text.strip())
        total += length
        if length == 0 and step.kind != "plan":
            failures.append(VerificationFailure(STEP_EMPTY, "step has no text", i))
        elif length > MAX_STEP_CHARS:
            failures.append(VerificationFailure(STEP_TOO_LONG, f"{length} characters; at most {MAX_STEP_CHARS}", i))
    if total > MAX_CHAIN_CHARS:
        failures.append(VerificationFailure(CHAIN_TOO_LONG, f"{total} characters; at most {MAX_CHAIN_CHARS}"))
    return failures


def _check_step_grounding(
    i: int, step: ReasoningStep, gold: _Gold, regions: list[tuple[int, str]], prior_start: int | None
) -> list[VerificationFailure]:
    """Evidence exists; observation steps cite evidence; findings are known and agree with labels."""
    failures = []
    sources = []
    for ev in step.evidence:
        span = _ground(ev, regions)
        if span is None:
            why = "too short to ground" if _quote_too_short(ev.quote) else "not found in the report"
            failures.append(VerificationFailure(EVIDENCE_NOT_FOUND, f"quote {str(ev.quote)[:120]!r} {why}", i))
        else:
            sources.append("prior" if prior_start is not None and span[0] >= prior_start else "current")
    for finding in step.findings:
        if canonical_observation(finding.observation) is None:
            failures.append(
                VerificationFailure(UNKNOWN_OBSERVATION, f"{finding.observation!r} is not a CheXpert observation", i)
            )
    # A step grounded only in the prior report speaks about the prior image.
    labels = gold.prior_labels if sources and all(s == "prior" for s in sources) else gold.labels
    if step.kind == "observation" and not step.evidence:
        unmentioned_absent = bool(step.findings) and all(
            f.status == "absent" and gold.labels.get(_name_key(f.observation), "not_mentioned") == "not_mentioned"
            for f in step.findings
        )
        if not unmentioned_absent:
            failures.append(
                VerificationFailure(OBSERVATION_WITHOUT_EVIDENCE, "observation step cites no evidence quote", i)
            )
    if step.kind == "observation":
        failures += check_quote_polarity(i, step)
        failures += _check_quote_topic(i, step)
    if step.kind != "comparison" and labels is not None:
        for finding in step.findings:
            name = canonical_observation(finding.observation)
            if name is None:
                continue
            value = labels.get(_name_key(name), "not_mentioned")
            accepted = ACCEPTED_STATUSES.get(value)
            if accepted is not None and finding.status not in accepted:
                which = "prior study's" if labels is gold.prior_labels else "study's"
                failures.append(VerificationFailure(
                    STATUS_CONTRADICTS_LABEL, f"{name} stated {finding.status}; the {which} label is {value}", i
                ))
    return failures


def leakage_reasons(text: str, option_letters: str = "", final: bool = True) -> list[str]:
    """Why ``text`` would leak its source (or the answer, when not the final step); [] if clean.

    Public so extractors can test their own wording before emitting a step.
    """
    reasons: list[str] = []
    if any(p.search(text) for p in _ANY_LEAK):  # one pass for the common, clean case
        reasons += _source_leaks(text)
    if not final:
        letters = stated_letters(text, option_letters)
        if letters:
            reasons.append(f"answer letter {', '.join(sorted(letters))} stated before the conclusion")
        elif _ANSWER_WORDS.search(text):
            reasons.append("states the answer before the conclusion")
    return reasons


def _source_leaks(text: str) -> list[str]:
    reasons: list[str] = []
    for why, pattern in _LEAK_PATTERNS:
        match = pattern.search(text)
        if match and not any(r.startswith(why) for r in reasons):
            reasons.append(f"{why}: {match.group(0)!r}")
    return reasons


def _check_leakage(i: int, step: ReasoningStep, gold: _Gold, is_final: bool) -> list[VerificationFailure]:
    return [VerificationFailure(LEAKAGE, why, i) for why in leakage_reasons(step.text, gold.letters, is_final)]


def _check_conclusion_text(step: ReasoningStep, gold: _Gold, index: int) -> list[VerificationFailure]:
    """The conclusion states the gold answer and no other."""
    text = step.text

    def mismatch(detail: str) -> list[VerificationFailure]:
        return [VerificationFailure(ANSWER_MISMATCH, detail, index)]

    if gold.is_option_task:
        letters = stated_letters(text, gold.letters)
        if letters:
            if letters != {gold.letter}:
                return mismatch(f"conclusion states {', '.join(sorted(letters))}; the answer is {gold.letter}")
            return []
        if gold.task == "multi" and gold.answer_findings:
            missing = [f for f in gold.answer_findings if not _mentions(text, f)]
            if missing and not (gold.answer_text and _mentions(text, gold.answer_text)):
                return mismatch(f"conclusion does not state {', '.join(missing)}")
            return []
        if not gold.answer_text or not _mentions(text, gold.answer_text):
            return mismatch(f"conclusion states neither {gold.letter} nor {gold.answer_text!r}")
        return []
    # Open task: the findings set.
    stated_present = {_name_key(f.observation) for f in step.findings if f.status == "present"}
    failures = []
    if gold.answer_findings:
        missing = [f for f in gold.answer_findings if f not in stated_present and not _mentions(text, f)]
        if missing:
            failures += mismatch(f"conclusion does not state {', '.join(missing)}")
    elif not ((gold.answer_text and _mentions(text, gold.answer_text)) or _NORMAL_STUDY.search(text)):
        failures += mismatch("conclusion does not state that there are no findings")
    extra = sorted(stated_present - set(gold.answer_findings))
    if extra:
        failures += mismatch(f"conclusion states {', '.join(extra)} present; not in the answer")
    return failures


def _expected_statuses(gold: _Gold) -> dict[str, str]:
    """Statuses the gold answer itself asserts ("present" for answer findings, ...)."""
    if gold.task == "binary" and gold.findings:
        expected = gold.binary_expectation()
        return {gold.findings[0]: expected} if expected else {}
    if gold.task in ("single", "multi", "open"):
        return {f: "present" for f in gold.answer_findings}
    return {}


def _check_answer_consistency(steps: list[ReasoningStep], gold: _Gold) -> list[VerificationFailure]:
    """No step states an answer finding otherwise than the answer does (e.g. 'no effusion' vs Yes)."""
    failures = []
    expected = _expected_statuses(gold)
    not_answers = set(gold.findings) - set(gold.answer_findings) if gold.task in ("single", "multi", "open") else set()
    for i, step in enumerate(steps):
        if step.kind == "comparison":
            continue
        for finding in step.findings:
            key = _name_key(finding.observation)
            want = expected.get(key)
            if want is not None and finding.status != want:
                failures.append(VerificationFailure(
                    ANSWER_MISMATCH, f"{finding.observation} stated {finding.status}; the answer implies {want}", i
                ))
            elif key in not_answers and finding.status == "present":
                failures.append(VerificationFailure(
                    ANSWER_MISMATCH, f"{finding.observation} stated present but is not in the answer", i
                ))
    if gold.task == "temporal":
        progression = gold.progression()
        knowledge = load_knowledge_map()
        for i, step in enumerate(steps):
            if progression and step.kind in ("comparison", "conclusion"):
                found = knowledge.progressions_in(step.text)
                if found and progression not in found:
                    failures.append(VerificationFailure(
                        ANSWER_MISMATCH, f"step describes {', '.join(sorted(found))}; the answer is {progression}", i
                    ))
    return failures


def _check_addressed(steps: list[ReasoningStep], gold: _Gold) -> list[VerificationFailure]:
    required = gold.answer_findings if gold.task == "open" else gold.findings
    addressed = {_name_key(f.observation) for s in steps if s.kind != "plan" for f in s.findings}
    return [
        VerificationFailure(OPTION_NOT_ADDRESSED, f"no step states the status of {name}")
        for name in required
        if name not in addressed
    ]


def check_quote_polarity(i: int, step: ReasoningStep) -> list[VerificationFailure]:
    """A present/absent finding must not be backed only by quotes that state the opposite.

    Reads the quotes with the labeler's mention finder; a quote that does not mention the
    observation at all (a sign such as "blunting of the costophrenic angle") is not judged.
    """
    quotes = " ".join(str(ev.quote) for ev in step.evidence if str(ev.quote).strip())
    if not quotes:
        return []
    said = _statuses_said(quotes)
    failures = []
    for finding in step.findings:
        name = canonical_observation(finding.observation)
        statuses = said.get(name or "")
        opposite = {"present": "absent", "absent": "present"}.get(finding.status)
        if statuses and opposite and statuses == {opposite}:
            failures.append(VerificationFailure(
                EVIDENCE_CONTRADICTS_FINDING, f"{name} stated {finding.status}; the quoted text says {opposite}", i
            ))
    return failures


def _check_quote_topic(i: int, step: ReasoningStep) -> list[VerificationFailure]:
    """The quotes of an observation step must bear on at least one finding it states.

    Judged only when the quotes name findings at all (a sign such as "blunting of the
    costophrenic angle", or "the lungs are clear", names none and is left alone). A finding is
    borne on when the quotes name it (as the mention finder reads them, or literally: its name or
    one of its CheXpert mention phrases), name a finding the knowledge map relates to it, or
    describe one of its signs; "No Finding" present is borne on by quotes that state findings absent.
    """
    quotes = " ".join(str(ev.quote) for ev in step.evidence if str(ev.quote).strip())
    if not quotes or not step.findings:
        return []
    said = _statuses_said(quotes)
    if not said:
        return []
    knowledge = load_knowledge_map()
    stated = []
    for finding in step.findings:
        name = canonical_observation(finding.observation) or str(finding.observation)
        stated.append(name)
        entry = knowledge.get(name)
        related = set(entry.related) if entry else set()
        if (name in said or related & said.keys() or _names_finding(name, quotes) or knowledge.signs_in(name, quotes)
                or (name == "No Finding" and finding.status == "present"
                    and all(statuses == {"absent"} for statuses in said.values()))):
            return []
    return [VerificationFailure(
        EVIDENCE_OFF_TOPIC, f"the quotes are about {', '.join(sorted(said))}, not {', '.join(stated)}", i
    )]


def _names_finding(name: str, text: str) -> bool:
    pattern = _finding_pattern(name)
    return pattern is not None and pattern.search(text) is not None


@lru_cache(maxsize=64)
def _finding_pattern(name: str) -> re.Pattern[str] | None:
    """The observation's name and its CheXpert mention phrases, whitespace-tolerant, as whole words."""
    phrases = sorted(set(observation_phrases(name)), key=len, reverse=True)
    parts = [r"\s+".join(map(re.escape, p.split())) for p in phrases if p.split()]
    return re.compile(r"(?<!\w)(?:" + "|".join(parts) + r")(?!\w)", re.IGNORECASE) if parts else None


@lru_cache(maxsize=65536)
def _statuses_said(quotes: str) -> dict[str, frozenset[str]]:
    """Observation -> statuses the text states. Cached: reports repeat sentences ("No pneumothorax.")
    across studies, and the mention finder is the verifier's most expensive step."""
    from extractors.mentions import find_mentions

    said: dict[str, set[str]] = {}
    for m in find_mentions(quotes, with_anatomy=False):
        said.setdefault(m.observation, set()).add(m.status)
    return {k: frozenset(v) for k, v in said.items()}


def verify_chain(chain: ReasoningChain, item: MiningInput) -> list[VerificationFailure]:
    """Every failed check of ``chain`` against ``item``; an empty list means the chain is accepted."""
    gold = _Gold.of(item)
    steps = list(chain.steps)
    temporal = gold.task == "temporal"
    regions = _regions(item, allow_prior=temporal)
    prior_start = prior_offset(item) if temporal and item.prior_report else None
    failures = _check_shape(steps)
    if gold.task not in TASKS:
        failures.append(VerificationFailure(UNKNOWN_TASK, f"task {gold.task!r} is not one of {', '.join(TASKS)}"))
    last = len(steps) - 1
    for i, step in enumerate(steps):
        failures += _check_step_grounding(i, step, gold, regions, prior_start)
        failures += _check_leakage(i, step, gold, is_final=(i == last and step.kind == "conclusion"))
    if not steps or steps[-1].kind != "conclusion":
        where = [i for i, s in enumerate(steps) if s.kind == "conclusion"]
        detail = "the last step is not a conclusion" + (f" (conclusion at step {where[0]})" if where else "")
        failures.append(VerificationFailure(NO_CONCLUSION, detail, last if steps else None))
    else:
        failures += _check_conclusion_text(steps[-1], gold, last)
    failures += _check_answer_consistency(steps, gold)
    failures += _check_addressed(steps, gold)
    if temporal and not any(s.kind == "comparison" and s.text.strip() for s in steps):
        failures.append(VerificationFailure(TEMPORAL_NO_COMPARISON, "no step compares the prior and current images"))
    return failures


def describe_failures(failures: Iterable[VerificationFailure]) -> str:
    """One line per failure, for refinement prompts and dead-letter details."""
    return "\n".join(
        f"{f.code}" + (f" (step {f.step_index})" if f.step_index is not None else "") + f": {f.detail}"
        for f in failures
    )
