"""Key findings as the paper's judge extracts them: a finding, its status, and what qualifies it.

The release's GPT-4o judge turns gold and predicted reasoning into free-form key findings
("mild streaky opacity at base of left lung: present", "stable large right effusion", "PICC
tip in the SVC") and matches them by meaning. radchain does the same deterministically:

* **finding**: the CheXpert observation the shared reader (extractors.mentions) names, or, for
  a finding outside the 14 labels ("granuloma", "scoliosis", "calcification"), the reader's
  phrase, normalised (lower case, singular);
* **status**: present | absent | uncertain, as the reader decides it;
* **laterality** (left | right | bilateral) and **location** (the reader's anatomy text);
* **severity**: mild | moderate | severe ("small", "trace", "minimal" read as mild; "large",
  "marked", "massive" as severe);
* **device**: for Support Devices, the device type (picc, central line, endotracheal tube,
  enteric tube, chest tube, pacemaker, sternotomy wires, clips, port ...);
* **change**: improving | stable | worsening, from the knowledge map's progression cues.

The qualifiers are read from the mention's own clause (the sentence, cut at the neighbouring
mentions of other findings), so "a small left effusion and a large right pneumothorax" gives
each finding its own side and size.

Two key findings *match* when they name the same finding, their statuses are compatible
(the gold status decides what is accepted: uncertain accepts present) and no qualifier
contradicts: a wrong side, a wrong change, a wrong device type, or mild against severe. A
qualifier that only one side states never blocks a match (reasoning often leaves out the size).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any, NamedTuple

from schemas.labels import OBSERVATIONS

CHEXPERT = frozenset(OBSERVATIONS)
NO_FINDING = "No Finding"

# Which stated statuses a reference status accepts ("uncertain accepts present": U-Ones).
GOLD_ACCEPTS: dict[str, frozenset[str]] = {
    "present": frozenset({"present"}),
    "uncertain": frozenset({"uncertain", "present"}),
    "absent": frozenset({"absent"}),
}


class KeyFinding(NamedTuple):
    finding: str
    status: str
    laterality: str | None = None
    location: str | None = None
    severity: str | None = None
    device: str | None = None
    change: str | None = None
    # A normal statement the reader expands ("the lungs are clear" -> no opacity, consolidation,
    # edema, ...) is one key finding, as the paper's judge reads it, named after the statement;
    # members are the findings it implies.
    members: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return self.finding, self.status

    @property
    def chexpert(self) -> bool:
        return self.finding in CHEXPERT


# ---- qualifiers ---------------------------------------------------------------------------------
_BILATERAL = re.compile(r"\b(?:bilateral(?:ly)?|both|bibasilar|bibasal|biapical|bilaterally)\b")
_LEFT = re.compile(r"\bleft\b")
_RIGHT = re.compile(r"\bright\b")
_SEVERITY = (
    ("severe", re.compile(r"\b(?:large|severe(?:ly)?|marked(?:ly)?|massive|extensive|significant(?:ly)?|"
                          r"substantial|huge|gross(?:ly)?)\b")),
    ("moderate", re.compile(r"\bmoderate(?:ly)?\b")),
    ("mild", re.compile(r"\b(?:mild(?:ly)?|minimal(?:ly)?|small|trace|tiny|slight(?:ly)?|subtle|minor)\b")),
)
_DEVICES = (
    ("picc", re.compile(r"\bpicc\b|peripherally inserted")),
    ("endotracheal tube", re.compile(r"\bendotracheal\b|\bet tube\b|\bett\b|\bintubat")),
    ("enteric tube", re.compile(r"\b(?:nasogastric|orogastric|enteric|feeding|dobhoff|ng|og)\b(?:\s+tube)?")),
    ("chest tube", re.compile(r"\bchest tube|\bpleural (?:tube|drain|catheter)|\bpigtail")),
    ("pacemaker", re.compile(r"\bpace(?:maker|r)|\bicd\b|\bdefibrillator|\bpacing|\bleads?\b")),
    ("sternotomy wires", re.compile(r"\bsternotomy|\bsternal wires?|\bcabg\b")),
    ("port", re.compile(r"\bport(?:-a-cath)?\b|\bportacath")),
    ("central line", re.compile(r"\bcentral (?:venous )?(?:line|catheter)|\bjugular (?:line|catheter)|"
                                r"\bsubclavian (?:line|catheter)|\bswan|\bcvc\b|\bhemodialysis catheter")),
    ("clips", re.compile(r"\bclips?\b|\bstaples?\b")),
    ("valve", re.compile(r"\bvalve (?:replacement|prosthesis)|\bprosthetic valve")),
)


def laterality_of(text: str) -> str | None:
    low = text.casefold()
    if _BILATERAL.search(low):
        return "bilateral"
    left, right = bool(_LEFT.search(low)), bool(_RIGHT.search(low))
    if left and right:
        return "bilateral"
    return "left" if left else "right" if right else None


def severity_of(text: str) -> str | None:
    low = text.casefold()
    for name, pattern in _SEVERITY:
        if pattern.search(low):
            return name
    return None


def device_of(text: str) -> str | None:
    low = text.casefold()
    for name, pattern in _DEVICES:
        if pattern.search(low):
            return name
    return None


@lru_cache(maxsize=1)
def _knowledge() -> Any:
    from extractors.chains.knowledge import load_knowledge_map

    return load_knowledge_map()


def change_of(text: str) -> str | None:
    found = _knowledge().progressions_in(text)
    return next(iter(found)) if len(found) == 1 else None


_WORDS = re.compile(r"[a-z]+")
_STEM = 6  # "calcified" / "calcification", "atherosclerotic" / "atherosclerosis" share their first 6 letters


@lru_cache(maxsize=1 << 14)
def finding_name(observation: str, phrase: str) -> str:
    """The finding a mention names: its CheXpert observation, else its phrase reduced to word stems
    (each word's first letters), so that inflections of one finding share a name."""
    if observation in CHEXPERT:
        return observation
    return " ".join(w[:_STEM] for w in _WORDS.findall(phrase.casefold())) or phrase.casefold()


@lru_cache(maxsize=1 << 16)
def qualifiers(clause: str, anatomy: str | None, finding: str) -> tuple[str | None, str | None, str | None,
                                                                    str | None]:
    """(laterality, severity, device, change) stated in a mention's clause."""
    side = laterality_of(anatomy) if anatomy else None
    side = side or laterality_of(clause)
    device = device_of(clause) if finding == "Support Devices" else None
    return side, severity_of(clause), device, change_of(clause)


# Where one finding's clause ends and the next one's begins, between two mentions.
_CLAUSE_BREAK = re.compile(r"[,;]|\s(?:and|but|while|whereas|with|without)\s", re.IGNORECASE)


def _clause_end(sentence: str, base: int, after: int, before: int) -> int:
    """End of a mention's clause: the first break between it (ending at ``after``) and the next
    mention (starting at ``before``); the next mention's start when there is none."""
    gap = sentence[after - base:before - base]
    b = _CLAUSE_BREAK.search(gap)
    return after + b.start() if b else before


def _clause_start(sentence: str, base: int, after: int, before: int) -> int:
    """Start of a mention's clause: just past the last break after the previous mention."""
    gap = sentence[after - base:before - base]
    last = None
    for last in _CLAUSE_BREAK.finditer(gap):
        pass
    return after + last.end() if last else after


def key_findings_of(mentions: Sequence[Any], keep: Any = None) -> tuple[KeyFinding, ...]:
    """Key findings of one step's mentions, in text order (``keep(m)`` filters mentions).

    Mentions of one span are one key finding: a CheXpert observation wins over a finding outside
    the labels ("pleural thickening" is Pleural Other, not also "thickening"), and a normal
    statement the reader expands into several findings becomes one grouped key finding.
    """
    ms = [m for m in mentions if keep is None or keep(m)]
    if not ms:
        return ()
    ms.sort(key=lambda m: (m.start, m.observation not in CHEXPERT))
    spans: dict[tuple[int, int], list[Any]] = {}
    for m in ms:
        spans.setdefault((m.start, m.end), []).append(m)
    heads = []
    for group in spans.values():
        named = [m for m in group if m.observation in CHEXPERT] or group
        heads.append((named[0], named))
    out = []
    for i, (m, group) in enumerate(heads):
        # The mention's clause: its sentence, cut at the neighbouring mentions of other findings.
        lo, hi = m.sentence_start, m.sentence_end
        for prev, _ in reversed(heads[:i]):
            if prev.sentence_start == m.sentence_start and prev.observation != m.observation:
                lo = max(lo, _clause_start(m.sentence, m.sentence_start, prev.end, m.start))
                break
        for nxt, _ in heads[i + 1:]:
            if nxt.sentence_start == m.sentence_start and nxt.observation != m.observation:
                hi = min(hi, _clause_end(m.sentence, m.sentence_start, m.end, nxt.start))
                break
        rel_lo, rel_hi = lo - m.sentence_start, hi - m.sentence_start
        clause = m.sentence[max(0, rel_lo):max(rel_lo, rel_hi)] or m.sentence
        cue = getattr(m, "cue", None) or ""
        if len(group) > 1 and cue.startswith("paraphrase:"):
            name, members = cue.split(":", 1)[1].strip(), tuple(sorted({g.observation for g in group}))
        else:
            name, members = finding_name(m.observation, m.phrase), ()
        side, severity, device, change = qualifiers(clause, getattr(m, "anatomy", None), name)
        out.append(KeyFinding(name, m.status, side, getattr(m, "anatomy", None), severity, device, change, members))
    return tuple(out)


# ---- matching -----------------------------------------------------------------------------------
_OPPOSED_CHANGE = frozenset({("improving", "worsening"), ("worsening", "improving"), ("stable", "worsening"),
                             ("worsening", "stable"), ("stable", "improving"), ("improving", "stable")})


def qualifiers_agree(a: KeyFinding, b: KeyFinding) -> bool:
    """No stated qualifier of one contradicts the other's (wrong side, change, device, mild vs severe)."""
    if a.laterality and b.laterality and a.laterality != b.laterality:
        return False
    if a.change and b.change and (a.change, b.change) in _OPPOSED_CHANGE:
        return False
    if a.device and b.device and a.device != b.device:
        return False
    if a.severity and b.severity and {a.severity, b.severity} == {"mild", "severe"}:
        return False
    return True


class NameMatcher:
    """Whether two finding names mean the same thing: equal names always; findings outside the
    CheXpert labels also by MiniLM cosine when an embedding model is given (semantic mode)."""

    def __init__(self, embed: Any | None = None, threshold: float = 0.8) -> None:
        self.embed = embed  # callable: list[str] -> list[unit vectors], cached by the caller
        self.threshold = threshold
        self._same: dict[tuple[str, str], bool] = {}

    def same(self, a: str, b: str) -> bool:
        if a == b:
            return True
        if self.embed is None or a in CHEXPERT or b in CHEXPERT:
            return False
        key = (a, b) if a < b else (b, a)
        hit = self._same.get(key)
        if hit is None:
            va, vb = self.embed([a, b])
            hit = self._same[key] = float(va @ vb) >= self.threshold
        return hit


EXACT_NAMES = NameMatcher()


def same_finding(a: KeyFinding, b: KeyFinding, names: NameMatcher = EXACT_NAMES) -> bool:
    """Same finding: equal (or, semantically, equivalent) names, or one is a member of the other's
    normal statement ("no consolidation" and "the lungs are clear")."""
    if a.finding == b.finding:
        return True
    if (a.members and b.finding in a.members) or (b.members and a.finding in b.members):
        return True
    if a.members and b.members and set(a.members) & set(b.members):
        return True
    return names.same(a.finding, b.finding)


def matches(gold: KeyFinding, stated: KeyFinding, names: NameMatcher = EXACT_NAMES) -> bool:
    """``stated`` recalls ``gold``: same finding, status the gold accepts, qualifiers not contradicting."""
    return (stated.status in GOLD_ACCEPTS.get(gold.status, (gold.status,))
            and same_finding(gold, stated, names) and qualifiers_agree(gold, stated))


def with_members(keys: Iterable[KeyFinding]) -> dict[str, KeyFinding]:
    """Findings by name, each grouped normal statement also entered under its members (unless
    the text states that member on its own: "opacity in the right lung; lungs otherwise clear")."""
    out: dict[str, KeyFinding] = {}
    grouped = []
    for k in keys:
        out[k.finding] = k
        if k.members:
            grouped.append(k)
    for k in grouped:
        for m in k.members:
            out.setdefault(m, KeyFinding(m, k.status, k.laterality, k.location, k.severity, k.device, k.change))
    return out


_FIELDS = ("laterality", "location", "severity", "device", "change")


def conclusions(steps: Iterable[Iterable[KeyFinding]]) -> tuple[KeyFinding, ...]:
    """One key finding per finding: the status the reasoning ends on (its last mention), with the
    qualifiers it stated for that status anywhere (a side named early, a size named late)."""
    last: dict[str, KeyFinding] = {}
    # (finding, status) -> the latest value stated for each qualifier
    stated: dict[tuple[str, str], list[Any]] = {}
    for step in steps:
        for k in step:
            last[k.finding] = k
            vals = stated.get((k.finding, k.status))
            if vals is None:
                stated[(k.finding, k.status)] = [k.laterality, k.location, k.severity, k.device, k.change]
            else:
                for i, v in enumerate((k.laterality, k.location, k.severity, k.device, k.change)):
                    if v is not None:
                        vals[i] = v
    out = []
    for k in last.values():
        if None in (k.laterality, k.location, k.severity, k.device, k.change):
            vals = stated[(k.finding, k.status)]
            own = (k.laterality, k.location, k.severity, k.device, k.change)
            fill = {f: v for f, mine, v in zip(_FIELDS, own, vals) if mine is None and v is not None}
            if fill:
                k = k._replace(**fill)
        out.append(k)
    return tuple(out)


def index_by_finding(keys: Iterable[KeyFinding]) -> dict[str, list[KeyFinding]]:
    """Key findings under their name and under each member of a grouped normal statement, so that
    matching looks up candidates instead of scanning (exact names)."""
    out: dict[str, list[KeyFinding]] = {}
    for k in keys:
        out.setdefault(k.finding, []).append(k)
        for m in k.members:
            out.setdefault(m, []).append(k)
    return out


def candidates(index: Mapping[str, list[KeyFinding]], gold: KeyFinding) -> Iterable[KeyFinding]:
    """Indexed key findings that may name the same finding as ``gold`` (see :func:`same_finding`)."""
    found = index.get(gold.finding, [])
    for m in gold.members:
        found = found + index.get(m, [])
    return found


def reference_accepts(reference: Mapping[str, KeyFinding], stated: KeyFinding, names: NameMatcher = EXACT_NAMES,
                      ) -> bool:
    """Whether a report's key findings support a stated finding (the release's factuality rule).

    A finding the report states: the report's status must accept the stated one (a present
    finding also accepts "uncertain": hedging a real finding is not a falsehood) and the
    qualifiers must not contradict. A finding the report does not mention counts as normal:
    only "absent" is correct. "No Finding" present is correct when the report states no
    abnormality (no present or uncertain finding but support devices).
    """
    if stated.members and stated.finding not in reference:
        return all(reference_accepts(reference, stated._replace(finding=m, members=()), names)
                   for m in stated.members)
    ref = reference.get(stated.finding)
    if ref is None and names.embed is not None and not stated.chexpert:
        ref = next((r for n, r in reference.items() if n not in CHEXPERT and names.same(n, stated.finding)), None)
    if stated.finding == NO_FINDING and ref is None:
        abnormal = any(r.status != "absent" and r.finding not in (NO_FINDING, "Support Devices")
                       for r in reference.values())
        return (stated.status == "present") != abnormal
    if ref is None:
        return stated.status == "absent"
    accepted = {"present": {"present", "uncertain"}, "uncertain": {"uncertain", "present", "absent"},
                "absent": {"absent"}}[ref.status] if ref.status in ("present", "uncertain", "absent") else {ref.status}
    return stated.status in accepted and qualifiers_agree(ref, stated)
