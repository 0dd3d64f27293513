"""Findings stated in free reasoning text, step by step.

RadRScore compares what a model *says* with a gold chain and the study's labels, so the
model's reasoning has to be turned into structured findings. That is the rule labeler's job
too, and the two must read text the same way: a paraphrase the labeler understands in a
report ("no evidence of", "is seen", "unremarkable", "clear lungs") must count the same in a
rollout. So this module does no lexicon matching of its own; it calls the shared
:func:`extractors.mentions.find_mentions` with ``expand_normals=True`` (which turns global
normal statements such as "the lungs are clear" into the absent findings they imply) and
adds only what free reasoning needs beyond a report: step splitting, dropping sentences
that claim nothing (plans, questions, textbook knowledge; see ``_asserted``), and the
batching and caching the reward path needs.

Steps: one step per non-empty line; a reasoning written as one paragraph is split into
sentences instead, because models that were not trained on the line-per-step format write
prose. List markers ("1.", "Step 2:", "- ") are dropped from a step's text.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from extractors.mentions import find_mentions
from schemas.labels import OBSERVATIONS
from training.key_findings import KeyFinding, key_findings_of

_OBSERVATIONS = frozenset(OBSERVATIONS)

# (observation, status, anatomy); anatomy is kept for reporting, matching ignores it
# (models and gold chains name locations too differently for a fair string comparison).
StatedFinding = tuple[str, str, str | None]
FindingKey = tuple[str, str]  # (observation, status)

_STEP_MARKER = re.compile(r"^\s*(?:(?:step\s*)?\d{1,2}\s*[.):]\s*|step\s*\d{1,2}\s*[-:]?\s*|[-*•]\s+)", re.IGNORECASE)
# A sentence ends at . ! ? followed by space and an upper-case letter or a digit; "e.g. x" and
# decimals ("0.5") do not split because the next character is lower case or not a space.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])")


@dataclass(frozen=True)
class StepFindings:
    """One reasoning step and the findings it states."""

    text: str
    findings: frozenset[StatedFinding]
    key_findings: tuple[KeyFinding, ...] = ()  # every asserted finding, CheXpert or not, with qualifiers

    @property
    def keys(self) -> frozenset[FindingKey]:
        return frozenset((o, s) for o, s, _ in self.findings)


# Markdown emphasis and heading marks ("**Lung Fields:**", "### Findings") carry no words.
_MARKDOWN = re.compile(r"\*\*|__|^#+\s*|`")
# A heading line: a few words ending in a colon and nothing after it ("**Frontal View (First Image):**").
_HEADING = re.compile(r"^[^.!?]{1,120}:\s*$")


def split_steps(text: str | None) -> list[str]:
    """Reasoning text -> step texts (lines; sentences when the text is a single paragraph).

    Markdown emphasis is dropped and a heading line (a few words ending in a colon) is not a
    step: it names a topic and claims nothing ("**Pneumothorax**:" is not a pneumothorax).
    """
    if not text:
        return []
    lines = [_strip_marker(_MARKDOWN.sub("", line)) for line in text.splitlines()]
    lines = [line for line in lines if line and not _HEADING.match(line)]
    if len(lines) == 1:
        lines = [s.strip() for s in _SENTENCE_END.split(lines[0]) if s.strip()]
    return lines


def _strip_marker(line: str) -> str:
    return _STEP_MARKER.sub("", line, count=1).strip()


# Step text -> findings. A plain dict (not lru_cache) so that a whole reasoning's unseen steps
# can be read in one call of the mention finder and stored together; cleared when it grows
# past _CACHE_LIMIT (the reward path reads millions of lines over a run).
_STEP_CACHE: dict[str, frozenset[StatedFinding]] = {}
_KEY_CACHE: dict[str, tuple[KeyFinding, ...]] = {}
_CACHE_LIMIT = 1 << 18
# Steps are joined with a blank line for one finder call: the finder breaks sentences at blank
# lines and never lets a cue act across a sentence, so each step reads as it would alone
# (tests/test_radrscore.py checks the equivalence), at about 1.5x the speed of one call per step.
_JOIN = "\n\n"
# Steps per finder call: large enough to spread the per-document cost, small enough to keep
# spaCy's documents short (measured: 50-200 steps are equally fast; 1,000 is slower).
_CHUNK = 64


# Reasoning states things reports never do: plans ("Examine the chest X-ray for signs of
# pneumonia"), questions ("Is there an effusion?") and textbook knowledge ("atelectasis, whose
# typical signs are plate-like opacity"). The finder reads an uncued mention as present, so
# these would count as claims. Every mention in a question is dropped; a *present* mention is
# dropped when its sentence is a plan, or when it follows a generic-knowledge trigger in its
# sentence. Absent and uncertain mentions of plans are kept: a cue decided them, so the
# sentence does assert something ("assessing for pneumothorax, there is no evidence of it").
_PLAN = re.compile(
    r"\b(?:examin|evaluat|assess|check|look|search|inspect|review|screen|observ|scan|identif|consider|detect"
    r"|analy[sz]|investigat|seek)\w*\b[^.?!;]*?\b(?:for|whether)\b"
    r"|\b(?:to\s+(?:determine|decide|answer|rule\s+out)|need\s+to\s+(?:determine|check|assess|look))\b",
    re.IGNORECASE,
)
# A question asserts nothing, whatever status the finder gives it (it reads "?" as uncertainty).
_QUESTION = re.compile(r"\?\s*$|^\s*(?:is|are|does|do|could|can)\s+(?:there|this|the)\b", re.IGNORECASE)
_GENERIC_KNOWLEDGE = re.compile(
    r"\b(?:typical(?:ly)?|classic(?:ally)?|characteristic(?:ally)?|usually|commonly"
    r"|can\s+(?:cause|produce|present)|(?:is|are)\s+characterized\s+by|signs?\s+(?:of\s+[\w\s]+?\s+)?include)\b",
    re.IGNORECASE,
)
# A definition says what a finding looks like, not what this image shows ("Atelectasis is
# characterized by volume loss", "A pneumothorax would appear as a pleural line", "Calcinosis
# refers to ..."): its present mentions are not claims.
_DEFINITION = re.compile(
    r"\b(?:(?:is|are)\s+characteri[sz]ed\s+by|(?:would|will|might)\s+(?:typically\s+|usually\s+)?"
    r"(?:appear|show|present|manifest|be\s+(?:seen|visible|expected)|look|indicate)|appears?\s+as\s+an?\b"
    r"|manifests?\s+as|presents?\s+as|refers?\s+to|(?:is|are)\s+defined\s+as|occurs?\s+when)\b",
    re.IGNORECASE,
)
# A line that repeats an option of the question ("Option A: calcified granuloma", "B) **Moderate
# right pneumothorax:**") names a candidate: mentions in its title (up to a colon) are not claims.
_OPTION_TITLE = re.compile(r"^\W*(?:option\s+)?\(?[A-H]\)?\s*[:.)]\s", re.IGNORECASE)


# A sentence's assertion limits, each computed only when a mention needs it (an absent mention needs
# no plan, definition or knowledge test; a question needs nothing more) and cached per sentence.
@lru_cache(maxsize=1 << 16)
def _opening(sentence: str) -> tuple[bool, int]:
    """(is a question, offset where an option title ends (0 when the sentence is not an option))."""
    title_end = 0
    option = _OPTION_TITLE.match(sentence)
    if option:
        colon = sentence.find(":", option.end())
        title_end = colon if colon >= 0 else len(sentence)
    return bool(_QUESTION.search(sentence)), title_end


@lru_cache(maxsize=1 << 16)
def _is_plan(sentence: str) -> bool:
    return bool(_PLAN.search(sentence))


@lru_cache(maxsize=1 << 16)
def _knowledge_limits(sentence: str) -> tuple[bool, int | None]:
    """(is a definition, offset where generic knowledge starts or None)."""
    generic = _GENERIC_KNOWLEDGE.search(sentence)
    return bool(_DEFINITION.search(sentence)), (generic.start() if generic else None)


def _option_title_end(step: str) -> int:
    """Where the option title a step opens with ends (its next colon, else the step's end); 0 for none."""
    option = _OPTION_TITLE.match(step)
    if not option:
        return 0
    colon = step.find(":", option.end())
    return colon if colon >= 0 else len(step)


def _asserted(m: Any) -> bool:
    question, title_end = _opening(m.sentence)
    if question:
        return False
    offset = m.start - m.sentence_start
    if offset < title_end:
        return False  # the option's own words, repeated
    if m.status == "absent":
        return True
    if _is_plan(m.sentence):
        return False  # "assess for X", "evaluate whether X could be present": a plan, not a claim
    if m.status != "present":
        return True
    definition, generic_from = _knowledge_limits(m.sentence)
    if definition:
        return False
    return generic_from is None or offset < generic_from


def _findings_of(mentions: Iterable[Any]) -> frozenset[StatedFinding]:
    found: dict[FindingKey, str | None] = {}
    for m in mentions:
        if m.observation not in _OBSERVATIONS:
            continue  # "Other Finding" (emphysema, scoliosis ...): outside the label set, never scored
        if not _asserted(m):
            continue
        key = (m.observation, m.status)
        if found.get(key) is None:
            found[key] = getattr(m, "anatomy", None) or None
    return frozenset((o, s, a) for (o, s), a in found.items())


def read_steps(step_texts: Sequence[str]) -> list[frozenset[StatedFinding]]:
    """Findings of each step; unseen steps are read together (chunks of _CHUNK per finder call), then cached."""
    missing = [t for t in dict.fromkeys(step_texts) if t not in _STEP_CACHE]
    if missing:
        if len(_STEP_CACHE) + len(missing) > _CACHE_LIMIT:
            _STEP_CACHE.clear()
            _KEY_CACHE.clear()
            missing = list(dict.fromkeys(step_texts))  # the cached ones are gone too
        for i in range(0, len(missing), _CHUNK):
            _read_chunk(missing[i:i + _CHUNK])
    return [_STEP_CACHE[t] for t in step_texts]


def _read_chunk(texts: Sequence[str]) -> None:
    starts, pos = [], 0
    for t in texts:
        starts.append(pos)
        pos += len(t) + len(_JOIN)
    buckets: list[list[Any]] = [[] for _ in texts]
    for m in find_mentions(_JOIN.join(texts), expand_normals=True):
        buckets[bisect.bisect_right(starts, m.start) - 1].append(m)
    for t, start, ms in zip(texts, starts, buckets):
        title_end = _option_title_end(t)
        if title_end:
            # The reader takes "Option D:" for a section heading and starts the sentence after it, so
            # the option's repeated words are cut here, by the step's own text.
            ms = [m for m in ms if m.start - start >= title_end]
        _STEP_CACHE[t] = _findings_of(ms)
        _KEY_CACHE[t] = key_findings_of(ms, keep=_asserted)


def read_key_steps(step_texts: Sequence[str]) -> list[tuple[KeyFinding, ...]]:
    """Key findings of each step (read like :func:`read_steps`, from the same finder call)."""
    read_steps(step_texts)
    return [_KEY_CACHE[t] for t in step_texts]


def prefetch(reasonings: Iterable[str | None], steps: Iterable[str] = ()) -> None:
    """Read the steps of many reasonings in as few finder calls as possible (a reward batch).

    Scoring one completion at a time calls the finder once per completion; reading a whole
    GRPO batch's distinct unseen lines together roughly doubles throughput on new text.
    ``steps``: single step texts read as :func:`chain_text_steps` reads them (answer options),
    in the same finder calls.
    """
    texts = [step for text in reasonings if text for step in split_steps(text)]
    texts += [t for t in (_strip_marker(str(s or "")) for s in steps) if t]
    if texts:
        read_steps(texts)


def step_findings(step_text: str) -> frozenset[StatedFinding]:
    """The findings one step states (cached: GRPO rollouts of one prompt repeat many lines)."""
    return read_steps([step_text])[0]


@lru_cache(maxsize=1 << 15)
def _reasoning_steps_cached(text: str) -> tuple[StepFindings, ...]:
    steps = split_steps(text)
    findings = read_steps(steps)
    return tuple(StepFindings(step, f, _KEY_CACHE[step]) for step, f in zip(steps, findings))


def reasoning_steps(text: str | None) -> list[StepFindings]:
    """Split reasoning text into steps and read each step's findings."""
    if not text:
        return []
    return list(_reasoning_steps_cached(text))


def chain_text_steps(steps: Iterable[str | Mapping[str, Any] | Any]) -> list[StepFindings]:
    """A gold chain's steps read from their *text* (for when structured findings are missing).

    Accepts step texts, step dicts (``{"text": ...}``) or ReasoningStep objects.
    """
    out = []
    for step in steps:
        text = step if isinstance(step, str) else (step.get("text") if isinstance(step, Mapping) else step.text)
        text = _strip_marker(str(text or ""))
        if text:
            out.append(StepFindings(text, step_findings(text), _KEY_CACHE[text]))
    return out


def structured_findings(findings: Sequence[Mapping[str, Any] | Any] | None) -> frozenset[StatedFinding]:
    """Structured step findings (StepFinding objects or their dicts) as StatedFinding tuples."""
    out = set()
    if isinstance(findings, (str, bytes, Mapping)) or not isinstance(findings, Iterable):
        return frozenset()  # None, or malformed gold data: not a list of findings
    for f in findings:
        if isinstance(f, Mapping):
            obs, status, anatomy = f.get("observation"), f.get("status"), f.get("anatomy")
        elif hasattr(f, "observation") and hasattr(f, "status"):
            obs, status, anatomy = f.observation, f.status, getattr(f, "anatomy", None)
        else:
            continue  # not a finding (malformed gold data): ignored, never fatal
        if obs and status:
            out.add((str(obs), str(status), str(anatomy) if anatomy else None))
    return frozenset(out)


def clear_caches() -> None:
    """Drop cached readings of steps and sentences (tests that read the same text twice). The judge's
    caches built on these readings are emptied by training.radrscore.clear_caches, which calls this."""
    _STEP_CACHE.clear()
    _KEY_CACHE.clear()
    _opening.cache_clear()
    _is_plan.cache_clear()
    _knowledge_limits.cache_clear()
    _reasoning_steps_cached.cache_clear()
    from training import key_findings

    key_findings.qualifiers.cache_clear()
    key_findings.finding_name.cache_clear()
