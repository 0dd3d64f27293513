"""Is a report written in English? The labeler's lexicons and cues are English only.

A report in another language has no English mentions, so the rule labeler would read it
as a normal study ("No Finding") — a confident wrong label. A cheap check catches that:
the share of words that are English function words or English-only radiology words.
Shared Latin words ("no", "normal", "pleural") do not count, so a Spanish or German report
scores near zero while terse English ("Mild cardiomegaly. Small left effusion.") still
passes on words such as "mild", "small", "left".
"""

from __future__ import annotations

import re

_WORDS_RE = re.compile(r"[a-z]+")
_ENGLISH = frozenset("""
the a an of and or is are was were be been being has have had not with without there this that these those
in on at to for from by as into within since than then again both which who may can could should would
seen noted identified present evidence compared prior previous study exam interval now is it its
left right mild small moderate large severe bilateral lungs lung heart clear stable unchanged new tube line
size increased decreased worsening improved improving lower upper lobe base bases silhouette volumes low
cardiac mediastinal contours contour enlarged enlargement opacity opacities effusions effusion likely
suggest suggests suggesting consistent concerning possible possibly minimal trace subtle focal patchy
""".split())
MIN_WORDS = 8  # shorter texts ("No acute process.") are too short to judge
MIN_SHARE = 0.1


def looks_english(text: str) -> bool:
    words = _WORDS_RE.findall(text.lower())
    if len(words) < MIN_WORDS:
        return True
    return sum(w in _ENGLISH for w in words) / len(words) >= MIN_SHARE
