"""Reading a model's output: the <think>/<answer> blocks, answer letters and open-task finding sets.

Everything here is deterministic string work with precompiled patterns, because the GRPO
reward functions call it for every rollout (thousands per optimisation step).

Conventions
-----------
* A completion arrives from TRL either as a string or, for conversational datasets, as a
  list of messages (``[{"role": "assistant", "content": ...}]``, where ``content`` may itself be
  a list of typed parts). :func:`completion_text` turns both into one string.
* The reasoning is the text of the first ``<think>…</think>`` block. A generation cut off by
  the token limit often opens ``<think>`` and never closes it; the text after the opening tag
  (up to ``<answer>`` when one follows) is then still taken as the reasoning, so a truncated
  rollout is scored for what it did say.
* Output with no ``<think>`` tag at all is read *tagless* (models that answer in free text,
  GPT-4o and Qwen2-VL in the paper's tables): the answer is the last ``<answer>`` block, else
  the last "answer is B" / "Answer: B" / a closing line that names an option ("B) normal"),
  and the reasoning is the text before that answer (all of it when no answer is found).
  ``tagless`` is set so callers can count these. Only an output with no reasoning text at all
  (empty, or nothing but the answer) is *unparseable* for the reasoning scores.
* The answer is the text of the last ``<answer>…</answer>`` block (the last, because a model
  that revises itself ends with its final word). Output without one has no answer: it is
  wrong for accuracy, never an exception.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from schemas.labels import OBSERVATIONS

NO_FINDING = "No Finding"

_THINK_BLOCK = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)
_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_OPEN = re.compile(r"<answer>", re.IGNORECASE)
_ANY_TAG = re.compile(r"</?(?:think|answer)>", re.IGNORECASE)
# The one layout format_reward accepts: optional whitespace, one think block, optional
# whitespace, one answer block, optional whitespace. Tag counts are checked separately.
_WELL_FORMED = re.compile(r"\A\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*\Z", re.DOTALL | re.IGNORECASE)

# Answer letters: "B", "B)", "(B)", "B.", "B: No", "B) No", "Option B", "Answer: B", "The answer is B".
# Keywords match in any case; the letter itself must be a capital after a keyword, so "the
# answer is a pleural effusion" does not read as option A.
_LEADING_LETTER = re.compile(
    r"^\s*(?:(?i:(?:final\s+)?answer\s*(?:is)?\s*[:\-]?\s*|option\s+))?\(?([A-Ha-h])\s*(?:[).:,\]]|\s|$)"
)
_ANSWER_IS_LETTER = re.compile(r"\b(?i:answer|option|choice)\s*(?i:is|:)?\s*\(?([A-H])\b\)?")
_BARE_LETTER = re.compile(r"^\s*\(?([A-Ha-h])\)?\s*\.?\s*$")

# Splitting an open-task answer into items: commas, semicolons, slashes, newlines, bullets, "and".
_ITEM_SPLIT = re.compile(r"\s*(?:[,;/\n]|\band\b|\bor\b)\s*", re.IGNORECASE)
_NON_WORD = re.compile(r"[^a-z0-9 ]+")


# ---- completions --------------------------------------------------------------------------------
def completion_text(completion: Any) -> str:
    """The generated text of one completion, whether TRL passed a string or a list of messages.

    For a conversation the assistant turns are joined (a conversational completion normally
    holds exactly one); a content given as typed parts keeps its text parts.
    """
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return _content_text(completion.get("content"))
    if isinstance(completion, Sequence):
        messages = [m for m in completion if isinstance(m, Mapping)]
        assistant = [m for m in messages if m.get("role", "assistant") == "assistant"] or messages
        return "\n".join(_content_text(m.get("content")) for m in assistant)
    return str(completion)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type", "text") == "text":
                parts.append(str(part.get("text") or ""))
        return "".join(parts)
    return str(content)


# ---- <think> / <answer> --------------------------------------------------------------------------
@dataclass(frozen=True)
class ParsedOutput:
    """The two blocks of an output. ``think`` None = no reasoning found (unparseable)."""

    think: str | None
    answer: str | None
    well_formed: bool  # exactly one <think>…</think> then one <answer>…</answer>, nothing else
    tagless: bool = False  # no <think> tag: the reasoning is the text before the answer

    @property
    def unparseable(self) -> bool:
        return self.think is None


@lru_cache(maxsize=65536)
def parse_output(text: str) -> ParsedOutput:
    """Split an output into reasoning and answer (see the module docstring for the rules)."""
    text = text or ""
    answers = _ANSWER_BLOCK.findall(text)
    answer = answers[-1].strip() if answers else None

    # The first non-empty block: an output that echoes its prompt ("Enclose the reasoning within
    # <think></think>") holds an empty pair before the real one.
    m = next((b for b in _THINK_BLOCK.finditer(text) if b.group(1).strip()), None) or _THINK_BLOCK.search(text)
    if m:
        think: str | None = m.group(1)
    else:
        opened = _THINK_OPEN.search(text)
        if opened:  # truncated: <think> without </think>
            rest = text[opened.end():]
            cut = _ANSWER_OPEN.search(rest)
            think = rest[: cut.start()] if cut else rest
        else:
            return _tagless(text, answer)
    if think is not None:
        think = think.strip()
    return ParsedOutput(think=think, answer=answer, well_formed=is_well_formed(text))


# The closing answer of free text: "the answer is B", "Answer: B", "Final answer: (B)", or a last
# line that is an option ("B) normal", "**C) normal**", "Option C").
_FREE_ANSWER = re.compile(
    r"(?:\b(?i:(?:final\s+)?answer|option|choice)\b\s*(?i:is|would\s+be|:)?\s*[:\-]?\s*\**\(?([A-H])\b\)?"
    r"|\b(?i:is)\s+\**\(?([A-H])\)"
    r"|^\W*\(?([A-H])\)\s*\**\s*\w[^\n]*$)",
    re.MULTILINE,
)
_TRAILER = re.compile(r"[\W_]*")


def _tagless(text: str, tagged_answer: str | None) -> ParsedOutput:
    cut = _ANSWER_OPEN.search(text)
    if cut:  # an <answer> block without <think>: the reasoning is what comes before it
        reasoning, answer = text[: cut.start()], tagged_answer
    else:
        bare = _BARE_LETTER.match(text)
        if bare:  # nothing but a letter: an answer without reasoning
            return ParsedOutput(think=None, answer=bare.group(1).upper(), well_formed=False, tagless=True)
        found = list(_FREE_ANSWER.finditer(text))
        last = found[-1] if found else None
        answer = next((g for g in last.groups() if g), None) if last else None
        reasoning = text
        if last is not None and _TRAILER.fullmatch(text[last.end():]):
            # The answer closes the output: its line is not reasoning.
            line_start = text.rfind("\n", 0, last.start()) + 1
            reasoning = text[:line_start] if text[:line_start].strip() else text[: last.start()]
    reasoning = _ANY_TAG.sub(" ", reasoning).strip()
    return ParsedOutput(think=reasoning or None, answer=answer, well_formed=False, tagless=True)


def is_well_formed(text: str) -> bool:
    """Exactly one <think>…</think> followed by exactly one <answer>…</answer>, both non-empty,
    with only whitespace around them."""
    m = _WELL_FORMED.match(text or "")
    if not m or not m.group(1).strip() or not m.group(2).strip():
        return False
    # The lazy groups could swallow a second block ("<think>a</think><think>b</think>..."): count tags.
    return len(_ANY_TAG.findall(text)) == 4


# ---- answer letters -------------------------------------------------------------------------------
def parse_letter(answer: str | None, options: Sequence[str] | None = None) -> str | None:
    """The option letter an answer names, or None.

    Accepts "B", "(B)", "B) No", "B. No", "Answer: B", "The answer is B". When the options are
    given, an answer that is exactly one option's text ("No", "Pleural Effusion") maps to its
    letter, and a letter beyond the options is rejected.
    """
    if not answer:
        return None
    text = answer.strip()
    if options:
        # An answer that is exactly an option's text wins over a letter reading ("A small ..." is not "A").
        wanted = _normalise(text)
        for i, option in enumerate(options):
            if _normalise(option) == wanted:
                return "ABCDEFGH"[i]
    letter = None
    m = _BARE_LETTER.match(text) or _LEADING_LETTER.match(text)
    if m:
        letter = m.group(1).upper()
    else:
        m = _ANSWER_IS_LETTER.search(text)
        if m:
            letter = m.group(1).upper()
    if letter is not None and options and "ABCDEFGH".index(letter) >= len(options):
        return None
    return letter


def _normalise(text: str) -> str:
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


# ---- open-task finding sets --------------------------------------------------------------------
_OBSERVATION_BY_NAME = {_normalise(o): o for o in OBSERVATIONS}
# Common ways a model writes an observation name that is not the CheXpert spelling.
_ALIASES = {
    "effusion": "Pleural Effusion", "pleural effusions": "Pleural Effusion", "effusions": "Pleural Effusion",
    "cardiac enlargement": "Cardiomegaly", "enlarged heart": "Cardiomegaly",
    "enlarged cardiac silhouette": "Cardiomegaly",
    "widened mediastinum": "Enlarged Cardiomediastinum", "mediastinal widening": "Enlarged Cardiomediastinum",
    "opacity": "Lung Opacity", "opacities": "Lung Opacity", "airspace opacity": "Lung Opacity",
    "nodule": "Lung Lesion", "mass": "Lung Lesion", "lung nodule": "Lung Lesion", "lung mass": "Lung Lesion",
    "pulmonary edema": "Edema", "pulmonary oedema": "Edema", "oedema": "Edema",
    "support device": "Support Devices", "device": "Support Devices", "devices": "Support Devices",
    "lines and tubes": "Support Devices", "tubes and lines": "Support Devices",
    "fractures": "Fracture", "rib fracture": "Fracture",
    "none": NO_FINDING, "normal": NO_FINDING, "no findings": NO_FINDING, "no abnormality": NO_FINDING,
    "no abnormalities": NO_FINDING, "nothing": NO_FINDING,
}
_ALIASES.update({k: v for k, v in _OBSERVATION_BY_NAME.items()})


@lru_cache(maxsize=16384)
def parse_finding_set(answer: str | None) -> frozenset[str]:
    """CheXpert observation names listed in an open-task answer (or a solution string).

    The answer may be a comma/semicolon/"and"-separated list, one per line, or a JSON list.
    An item that is not a known name or alias is ignored (it cannot match the gold set).
    "No Finding" alone stands for the empty set's answer; next to real findings it is dropped.
    """
    if not answer:
        return frozenset()
    text = answer.strip()
    items: Iterable[str]
    if text.startswith("["):
        try:
            loaded = json.loads(text)
            items = [str(x) for x in loaded] if isinstance(loaded, list) else [text]
        except json.JSONDecodeError:
            items = _ITEM_SPLIT.split(text.strip("[]"))
    else:
        items = _ITEM_SPLIT.split(text)
    found = set()
    for item in items:
        key = _normalise(item)
        if not key:
            continue
        name = _ALIASES.get(key) or _ALIASES.get(key.removesuffix("s"))
        if name is not None:
            found.add(name)
    if len(found) > 1:
        found.discard(NO_FINDING)
    return frozenset(found)


def normalise_gold_set(findings: Iterable[str]) -> frozenset[str]:
    """A gold answer set in the same convention as :func:`parse_finding_set` (empty = No Finding)."""
    found = {f for f in findings if f}
    if len(found) > 1:
        found.discard(NO_FINDING)
    return frozenset(found) if found else frozenset({NO_FINDING})


def set_f1(predicted: frozenset[str] | set[str], gold: frozenset[str] | set[str]) -> float:
    """F1 of two finding sets; both empty counts as a perfect match."""
    if not predicted and not gold:
        return 1.0
    if not predicted or not gold:
        return 0.0
    overlap = len(predicted & gold)
    return 2.0 * overlap / (len(predicted) + len(gold))


# ---- outcome ---------------------------------------------------------------------------------
def outcome_score(answer: str | None, task: str, solution: Any, options: Sequence[str] | None = None) -> float:
    """How right an answer is: 1.0/0.0 letter match for option tasks, set F1 for the open task.

    ``solution`` is the gold letter (or "B) No") for option tasks; for the open task the gold
    findings as a list, a JSON list or a comma-joined string (empty = No Finding).
    """
    if answer is None:
        return 0.0
    if task == "open":
        if isinstance(solution, str):
            gold = normalise_gold_set(parse_finding_set(solution))
        else:
            gold = normalise_gold_set(solution or ())
        return set_f1(parse_finding_set(answer), gold)
    gold_letter = parse_letter(str(solution or ""), None)
    if gold_letter is None:
        return 0.0
    return 1.0 if parse_letter(answer, options) == gold_letter else 0.0
