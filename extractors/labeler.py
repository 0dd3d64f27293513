"""Report -> the 14 CheXpert labels, each with the sentence that decided it.

Mentions come from extractors/mentions.py; this module applies CheXpert's aggregation:

* only FINDINGS and IMPRESSION text is read (the whole text when no sections are given);
* per observation, positive beats uncertain beats negative across its mentions; the
  deciding sentence is the first sentence that states the winning value;
* a positive or uncertain "heart failure"/"CHF" (an Edema mention) also makes
  Cardiomegaly uncertain unless something else decides it (CheXpert's rule);
* No Finding is positive when no observation other than Support Devices (and no finding
  outside the 14, e.g. emphysema) is positive or uncertain; otherwise it is left blank
  (not_mentioned), as in CheXpert's output. A report with no FINDINGS/IMPRESSION text
  gets all 14 not_mentioned: there is nothing to vouch for "no finding".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from extractors.chains.types import LabelEvidence
from extractors.mentions import OTHER_FINDING, Mention, iter_mentions_in_spans
from schemas.labels import OBSERVATIONS

LABELED_SECTIONS = ("findings", "impression")
_VALUE_OF_STATUS = {"present": "positive", "uncertain": "uncertain", "absent": "negative"}
_RANK = {"positive": 3, "uncertain": 2, "negative": 1, "not_mentioned": 0}
_CODE = {"positive": 1.0, "negative": 0.0, "uncertain": -1.0, "not_mentioned": None}
_HEART_FAILURE = ("heart failure", "chf")

# (name, start, end) as in stg_sections; extra fields (e.g. a ParsedSection's body) are ignored.
SectionSpan = Sequence[Any]
NOT_MENTIONED = LabelEvidence("not_mentioned")


def labeled_spans(text: str, sections: Iterable[SectionSpan] | None) -> list[tuple[int, int]]:
    """(start, end) of the FINDINGS and IMPRESSION sections, or of the whole text."""
    if not isinstance(text, str):
        return []
    if sections is None:
        return [(0, len(text))] if text.strip() else []
    spans = []
    for sec in sections:
        try:
            name, start, end = str(sec[0]).lower(), int(sec[1]), int(sec[2])
        except (TypeError, ValueError, IndexError):
            continue  # a malformed section row is skipped, not fatal
        if name in LABELED_SECTIONS and end > start:
            spans.append((max(0, start), min(len(text), end)))
    return sorted(set(spans))


def aggregate(mentions: Iterable[Mention], *, has_text: bool = True) -> dict[str, LabelEvidence]:
    """CheXpert aggregation of a report's mentions into 14 labels (see module docstring)."""
    best: dict[str, tuple[str, Mention]] = {}  # evidence objects are built once, at the end

    def offer(observation: str, value: str, m: Mention) -> None:
        current = best.get(observation)
        if current is None or _RANK[value] > _RANK[current[0]]:
            best[observation] = (value, m)

    finding_stated = False
    heart_failure: Mention | None = None
    for m in mentions:
        value = _VALUE_OF_STATUS[m.status]
        if m.observation != "Support Devices" and value in ("positive", "uncertain"):
            finding_stated = True
        if m.observation == OTHER_FINDING or m.observation not in OBSERVATIONS:
            continue
        if m.observation == "No Finding":
            continue  # No Finding is derived below, never read off a phrase
        if (m.observation == "Edema" and value != "negative" and heart_failure is None
                and m.phrase.lower().startswith(_HEART_FAILURE)):
            heart_failure = m
        offer(m.observation, value, m)
    if heart_failure is not None and "Cardiomegaly" not in best:
        offer("Cardiomegaly", "uncertain", heart_failure)
    labels = {o: NOT_MENTIONED for o in OBSERVATIONS}
    for o, (value, m) in best.items():
        labels[o] = LabelEvidence(value, m.sentence, m.sentence_start, m.sentence_end)
    if has_text and not finding_stated:
        labels["No Finding"] = LabelEvidence("positive")
    return labels


def supporting_evidence(mentions: Iterable[Mention], observation: str, value: str) -> LabelEvidence | None:
    """The first sentence whose mention of ``observation`` states ``value`` (e.g. to cite
    evidence for a label taken from MIMIC's CSV); None when no sentence does."""
    for m in mentions:
        if m.observation == observation and _VALUE_OF_STATUS[m.status] == value:
            return LabelEvidence(value, m.sentence, m.sentence_start, m.sentence_end)
    return None


def label_report(text: str, sections: Iterable[SectionSpan] | None = None) -> dict[str, LabelEvidence]:
    """The 14 CheXpert labels of one report; sentence offsets index ``text``."""
    return label_reports([(text, sections)])[0]


def label_reports(reports: Iterable[str | tuple[str, Iterable[SectionSpan] | None]]) -> list[dict[str, LabelEvidence]]:
    """Labels of many reports (each a text, or (text, sections)); spaCy runs batched."""
    return [labels for labels, _ in label_reports_with_mentions(reports)]


def label_reports_with_mentions(
    reports: Iterable[str | tuple[str, Iterable[SectionSpan] | None]],
) -> list[tuple[dict[str, LabelEvidence], list[Mention]]]:
    """Like label_reports, also returning each report's mentions (for evidence lookups)."""
    items: list[tuple[str, list[tuple[int, int]]]] = []
    for r in reports:
        text, sections = (r, None) if not isinstance(r, tuple) else (r[0], r[1])
        text = text if isinstance(text, str) else ""
        items.append((text, labeled_spans(text, sections)))
    out = []
    for (text, spans), mentions in zip(items, iter_mentions_in_spans(items, with_anatomy=False)):
        has_text = any(text[s:e].strip() for s, e in spans)
        out.append((aggregate(mentions, has_text=has_text), mentions))
    return out


def to_codes(labels: dict[str, LabelEvidence]) -> dict[str, float | None]:
    """CheXpert CSV codes: 1.0 positive, 0.0 negative, -1.0 uncertain, None blank."""
    return {o: _CODE[labels[o].value] if o in labels else None for o in OBSERVATIONS}
