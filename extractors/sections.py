"""Split a radiology report into named sections with exact character offsets.

MIMIC-CXR reports look like this (every line starts with one space)::

                                     FINAL REPORT
     EXAMINATION:  CHEST (PA AND LAT)
     ...
     FINDINGS:
     <body>
     IMPRESSION:
     <body>

Rules (decided here, relied on by later stages):

* A header is an upper-case title (letters, digits, spaces and ``()/,&'-``) at the start
  of a line, after optional blanks, followed by ``:`` and whitespace or the end of the
  text. The common titles ("Findings:", "Impression:" ...) are also accepted in any case,
  because generic tables from other hospitals rarely shout (see ``_headers`` for the one
  case this misses). Headers in the middle of a line are not recognised (the official
  MIMIC-CXR parser does the same); an upper-case line start such as " PICC LINE:" inside
  findings is a header named ``other``, as there.
* A section's body runs from the header's colon to the start of the next header's line;
  leading and trailing whitespace is trimmed, and ``start``/``end`` point at the trimmed
  body, so ``text[start:end] == body`` always holds. Sections with an empty body are
  dropped (MIMIC often writes an empty ``FINDINGS:`` before ``IMPRESSION:``).
* Text before the first header is the ``preamble`` (the "FINAL REPORT" line).
* Header names are normalised to ``schemas.ingest.SECTION_NAMES`` by an exact table
  (built from the MIMIC/NegBio title list), then a typo-tolerant match on the core title
  words, then keywords; anything else is ``other``. The combined "FINDINGS AND
  IMPRESSION" is ``findings`` (its body holds both; the labeler reads findings when
  there is no impression). "WET READ" (a preliminary read outside the signed report) is
  ``addendum``.
* Fallback when a report has neither a findings nor an impression section: the last
  section's body (the preamble when there are no headers at all) is split into
  paragraphs at blank lines. Its first paragraph stays where it was when it is the
  body of a real header; in a preamble only a first line that is a title (upper case,
  no full stop: "FINAL REPORT") stays. Of the remaining paragraphs the last becomes
  ``impression`` and the ones between become ``findings``. This mirrors how CheXpert
  labels MIMIC (impression, else findings, else the last paragraph). Such sections carry
  ``inferred=True`` and an empty header.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from typing import NamedTuple

from extractors.resources import LEXICONS


class ParsedSection(NamedTuple):
    """One section. A NamedTuple because the parser builds millions of them (cheap to create)."""

    name: str  # one of schemas.ingest.SECTION_NAMES
    header: str  # as written, without the colon; "" for preamble and inferred sections
    start: int  # body offsets into the report text: text[start:end] == body
    end: int
    body: str
    inferred: bool = False  # True when made by the paragraph fallback, not by a header


_new_tuple = tuple.__new__

# Titles accepted in any letter case; anything else must be upper case to count as a header.
_ANY_CASE_TITLES = (
    "findings and impression", "findings and impressions", "findings/impression", "findings/impressions",
    "findings", "finding", "impression", "impressions", "conclusion", "conclusions", "indication",
    "indications", "clinical indication", "clinical history", "history", "reason for exam",
    "reason for examination", "comparison", "comparisons", "prior studies", "prior study", "prior",
    "technique", "examination", "exam", "addendum", "wet read", "recommendation", "recommendations",
    "notification", "notifications", "comment", "comments",
)

# One compiled pass finds every header. ^ with MULTILINE anchors at each line start; the
# colon must be followed by whitespace or the end so that "10:13" or "HTTP://" never match.
# An empty group after the blanks that follow the colon marks where the body starts,
# without consuming them (the next header's "^" must still see its line start).
_UPPER_TITLE = r"[A-Z][A-Z0-9 ()/,&'-]{0,79}"
_ANY_CASE_TITLE = "(?i:" + "|".join(re.escape(t) for t in sorted(_ANY_CASE_TITLES, key=len, reverse=True)) + ")"
_HEADER_TAIL = r"[ \t]*:(?=\s|\Z)(?=\s*(?P<b>))"
_UPPER_HEADER_RE = re.compile(r"^[ \t]*(?P<h>" + _UPPER_TITLE + ")" + _HEADER_TAIL, re.MULTILINE)
_ANY_HEADER_RE = re.compile(r"^[ \t]*(?P<h>" + _UPPER_TITLE + "|" + _ANY_CASE_TITLE + ")" + _HEADER_TAIL,
                            re.MULTILINE)
# The any-case alternatives make the regex three times slower (they are tried on every
# body line), so the fast upper-case pattern runs first, and the full one only when the
# report may hold a findings/impression title that is not upper case ("Findings:") or
# when the fast pass found neither findings nor impression. A MIMIC report (upper-case
# titles) never pays for the slow pass. Known gap: a lower-case minor title ("Comparison:")
# in a report that also has upper-case FINDINGS/IMPRESSION headers is not split off.
_ANY_CASE_HINTS = ("ndings:", "mpression:", "mpressions:", "ndings :", "mpression :")


def _headers(text: str) -> list[tuple[re.Match[str], str, str]]:
    """(match, header as written, normalised name) of every header, in text order."""
    for hint in _ANY_CASE_HINTS:
        if hint in text:
            return _named(_ANY_HEADER_RE.finditer(text))
    found = _named(_UPPER_HEADER_RE.finditer(text))
    for _, _, name in found:
        if name == "findings" or name == "impression":
            return found
    return _named(_ANY_HEADER_RE.finditer(text))


def _named(matches: Iterable[re.Match[str]]) -> list[tuple[re.Match[str], str, str]]:
    out = []
    for m in matches:
        header = m.group("h").rstrip()
        out.append((m, header, normalize_header(header)))
    return out


_PARAGRAPH_BREAK_RE = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_SPACES_RE = re.compile(r"\s+")
_LOWER_RE = re.compile(r"[a-z]")

# Exact titles (upper case, single spaces, no colon) -> section name. Variants and typos
# seen in MIMIC-CXR (the NegBio title list and the official MIMIC-CXR section mapping).
_EXACT: dict[str, str] = {}


def _add(name: str, *titles: str) -> None:
    for t in titles:
        _EXACT[t] = name


_add("impression", "IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS", "OPINION", "SUMMARY",
     "FINAL IMPRESSION", "CORRECTED IMPRESSION", "THE IMPRESSION SHOULD READ", "IMPRESSON", "IMPRESION",
     "IMPESSION", "IMPESSION", "IMPRRESSION", "IMORESSION", "IMPRESSOIN", "IMPRSSION", "IMPERSSION",
     "MPRESSION", "IIMPRESSION", "FIMPRESSION", "COCLUSION", "CONLCUSION", "IMPRESSION AND RECOMMENDATIONS")
_add("findings", "FINDINGS", "FINDING", "FINDINGS AND IMPRESSION", "FINDINGS AND IMPRESSIONS",
     "FINDINGS/IMPRESSION", "FINDINGS / IMPRESSION", "FINDINGS/ IMPRESSION", "FINDINGS AND IMRPESSION",
     "IMPRESSION AND FINDINGS", "TECHNIQUE AND FINDINGS", "REFERENCE FINDINGS", "REPORT", "FINSINGS",
     "FIDINGS", "FINDGINGS", "FINDIGNS", "FINDINDGS", "FINDINS", "FINDNGS", "FINDNINGS", "FINDOINGS",
     "FINIDNGS")
_add("indication", "INDICATION", "INDICATIONS", "CLINICAL INDICATION", "CLINIC INDICATION",
     "REASON FOR EXAM", "REASON FOR EXAMINATION", "REASON FOR THE EXAM", "REASON FOR THIS EXAMINATION",
     "REASON FOR THE EXAMINATION", "REASON OF EXAM", "REASON FORE EXAM", "REASON FOR INDICATION",
     "FOR THIS EXAMINATION", "QUESTIONS TO BE ANSWERED", "NDICATION", "IDICATION", "INDCATION")
_add("history", "HISTORY", "CLINICAL HISTORY", "PATIENT HISTORY", "CLINICAL INFORMATION", "MEDICAL CONDITION",
     "HISTORY OF PRESENT ILLNESS", "INTERVAL HISTORY", "ADDITIONAL CLINICAL HISTORY PROVIDED", "CHEST HISTORY",
     "CLINCAL HISTORY", "S HISTORY", "PFI", "ILLNESS")
_add("comparison", "COMPARISON", "COMPARISONS", "PRIOR", "PRIORS", "PRIOR EXAM", "PRIOR EXAMS", "PRIOR STUDY",
     "PRIOR STUDIES", "COMPARISON EXAM", "COMPARISON EXAMS", "COMPARISON FILM", "COMPARISON FILMS",
     "COMPARISON STUDY", "COMPARISON STUDIES", "REFERENCE EXAM", "REFERENCE EXAMINATION", "COMPARE",
     "COMPARISON TO PRIOR STUDY", "COMPARISON CHEST", "CHEST COMPARISON FILM", "COMPARISION", "COMPARISIONS",
     "COMAPRISON", "COMPARRISON", "COMPARSION", "OMPARISON")
_add("technique", "TECHNIQUE", "TECHIQUE", "PROCEDURE", "PROCEDURE DETAILS", "CONTRAST", "IV CONTRAST",
     "FLUOROSCOPY TIME AND DOSE")
_add("examination", "EXAMINATION", "EXAM", "EXAMS", "TYPE OF EXAMINATION", "TYPE OF EXAM",
     "TYPE OF THE EXAMINATION", "S EXAMINATION", "ED EXAM", "STUDY")
_add("addendum", "ADDENDUM", "AMENDMENT", "ADDENDUM CORRECTION", "ADDENDUM HISTORY", "ADDENDUM INDICATION",
     "ADDENDUM IMPRESSION", "WET READ", "WETREAD", "PRELIMINARY REPORT", "PLEASE CALL WITH WET READ")

# Core title words for the typo-tolerant match (edit distance with transpositions).
_CORE_WORDS = {
    "IMPRESSION": "impression", "CONCLUSION": "impression", "FINDINGS": "findings",
    "INDICATION": "indication", "HISTORY": "history", "COMPARISON": "comparison",
    "TECHNIQUE": "technique", "EXAMINATION": "examination", "ADDENDUM": "addendum",
}
# Keyword rules, in priority order, for titles not in the exact table.
_KEYWORDS = (
    ("ADDENDUM", "addendum"), ("IMPRESSION", "impression"), ("CONCLUSION", "impression"),
    ("FINDING", "findings"), ("INDICATION", "indication"), ("REASON FOR", "indication"),
    ("HISTORY", "history"), ("COMPARISON", "comparison"), ("PRIOR", "comparison"),
    ("TECHNIQUE", "technique"),
)
# Titles that only describe the views taken ("PA AND LATERAL CHEST RADIOGRAPHS"). In older
# MIMIC reports such a title heads the description of the film itself, i.e. the findings,
# when no FINDINGS header follows; otherwise it is part of the examination. The parser
# decides per report (see _resolve_view_titles), so normalize_header returns this marker.
_VIEW_TITLE = "view-title"
_VIEW_WORDS = frozenset((
    "CHEST", "VIEW", "VIEWS", "RADIOGRAPH", "RADIOGRAPHS", "PORTABLE", "SUPINE", "UPRIGHT", "ERECT",
    "FILM", "FILMS", "LATERAL", "FRONTAL", "AP", "PA", "IMAGES", "SEMIUPRIGHT", "SEMIERECT", "CXR",
))


def _edit_distance_at_most(a: str, b: str, limit: int) -> bool:
    """Optimal-string-alignment distance <= limit (typos swap letters: IMPRESSOIN)."""
    if abs(len(a) - len(b)) > limit:
        return False
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return False
        prev2, prev = prev, cur
    return prev[-1] <= limit


@lru_cache(maxsize=4096)
def normalize_header(header: str) -> str:
    """Map a header as written ("IMPRESSON", "Reason for exam") to a name in SECTION_NAMES.

    Cached: a corpus uses a few hundred distinct titles, so each is normalised once.
    """
    key = _SPACES_RE.sub(" ", header.strip().upper())
    name = _EXACT.get(key)
    if name:
        return name
    words = key.replace("/", " ").split()
    if len(words) == 1 and len(key) >= 6:
        for core, core_name in _CORE_WORDS.items():
            if _edit_distance_at_most(key, core, 2 if len(core) >= 9 else 1):
                return core_name
    for word, kw_name in _KEYWORDS:
        if word in key:
            return kw_name
    if words and any(w in _VIEW_WORDS for w in words):
        return _VIEW_TITLE
    return "other"


def lexicon_titles() -> list[str]:
    """The MIMIC section titles bundled with NegBio (without the trailing colon)."""
    path = LEXICONS / "negbio" / "section_titles.txt"
    return [line.strip().rstrip(":") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _trimmed(text: str, start: int, end: int) -> tuple[int, int]:
    """Offsets of text[start:end] without leading/trailing whitespace (empty -> start == end)."""
    chunk = text[start:end]
    stripped_left = chunk.lstrip()
    if not stripped_left:
        return start, start
    new_start = start + (len(chunk) - len(stripped_left))
    new_end = start + len(chunk.rstrip())
    return new_start, new_end


def _paragraphs(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Trimmed (start, end) of each blank-line separated paragraph of text[start:end]."""
    spans = []
    pos = start
    for m in _PARAGRAPH_BREAK_RE.finditer(text, start, end):
        s, e = _trimmed(text, pos, m.start())
        if e > s:
            spans.append((s, e))
        pos = m.end()
    s, e = _trimmed(text, pos, end)
    if e > s:
        spans.append((s, e))
    return spans


def _is_title_line(text: str, start: int, end: int) -> bool:
    """One line with letters, none lower case, not ending a sentence: "FINAL REPORT"."""
    chunk = text[start:end].strip()
    return ("\n" not in chunk and bool(re.search(r"[A-Z]", chunk)) and not _LOWER_RE.search(chunk)
            and not chunk.endswith("."))


def parse_sections(text: str) -> list[ParsedSection]:
    """Split a report into sections in text order; see the module docstring for the rules."""
    if not text:
        return []
    sections: list[ParsedSection] = []
    headers = _headers(text)
    first_header = headers[0][0].start() if headers else len(text)
    s, e = _trimmed(text, 0, first_header)
    if e > s:
        sections.append(ParsedSection("preamble", "", s, e, text[s:e]))
    n = len(headers)
    for i, (m, header, name) in enumerate(headers):
        start = m.start("b")
        body_end = headers[i + 1][0].start() if i + 1 < n else len(text)
        if body_end <= start:
            continue  # empty body: the next header follows at once
        body = text[start:body_end].rstrip()
        if body:
            # tuple.__new__ skips the NamedTuple's Python-level __new__ (hot loop).
            sections.append(_new_tuple(ParsedSection, (name, header, start, start + len(body), body, False)))
    sections = _resolve_view_titles(sections)
    for sec in sections:
        if sec.name == "findings" or sec.name == "impression":
            return sections
    return _with_paragraph_fallback(text, sections)


def _resolve_view_titles(sections: list[ParsedSection]) -> list[ParsedSection]:
    """A view title ("PORTABLE AP CHEST RADIOGRAPH:") heads the findings when the report has
    no findings section of its own, else it belongs to the examination."""
    if not any(s.name == _VIEW_TITLE for s in sections):
        return sections
    has_findings = any(s.name == "findings" for s in sections)
    resolved = "examination" if has_findings else "findings"
    return [s._replace(name=resolved) if s.name == _VIEW_TITLE else s for s in sections]


def _with_paragraph_fallback(text: str, sections: list[ParsedSection]) -> list[ParsedSection]:
    """No findings/impression: split the last section's paragraphs (see module docstring)."""
    if not sections:
        return sections
    last = sections[-1]
    head: tuple[int, int] | None = None  # the part that keeps the last section's name
    region_start = last.start
    if last.name == "preamble":
        if _is_title_line(text, last.start, last.end):
            return sections  # only a title ("FINAL REPORT" above empty headers): nothing to infer
        # A title line ("FINAL REPORT") stays preamble even without a blank line after it.
        newline = text.find("\n", last.start, last.end)
        if newline != -1 and _is_title_line(text, last.start, newline):
            head = _trimmed(text, last.start, newline)
            region_start = newline
    else:
        paras = _paragraphs(text, last.start, last.end)
        head = paras[0]
        region_start = paras[1][0] if len(paras) > 1 else last.end
    rest = _paragraphs(text, region_start, last.end)
    if not rest:
        return sections
    out = sections[:-1]
    if head is not None:
        s, e = head
        out.append(last._replace(start=s, end=e, body=text[s:e]))
    if len(rest) > 1:
        s, e = rest[0][0], rest[-2][1]
        out.append(ParsedSection("findings", "", s, e, text[s:e], True))
    s, e = rest[-1]
    out.append(ParsedSection("impression", "", s, e, text[s:e], True))
    return out


def section_text(sections: list[ParsedSection], name: str) -> str | None:
    """Bodies of all sections with this name, joined by a blank line; None if there is none."""
    bodies = [s.body for s in sections if s.name == name]
    return "\n\n".join(bodies) if bodies else None
