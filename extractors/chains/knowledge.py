"""The radiology knowledge map: which signs point to which finding, and where to look.

Loaded from ``extractors/resources/cxr_findings.yaml`` (signs, anatomy, caveats and related
findings per CheXpert observation, plus the cue words that state a temporal progression)
and from the CheXpert labeler's mention phrases. The rule backend uses it to write
interpretation steps ("Blunting of the costophrenic angle indicates pleural effusion.")
and to find a sentence for a label that came without one; the verifier uses the
progression cues to spot a comparison that contradicts the gold progression.

Loading is forgiving: a malformed entry is skipped rather than failing the whole map,
because the map only enriches chains and must never stop a mining run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from extractors.resources import KNOWLEDGE_MAP, LEXICONS
from extractors.trie import any_of
from schemas.labels import OBSERVATIONS

PROGRESSIONS = ("improving", "stable", "worsening")

# Words that carry no evidence on their own: a sign matches a sentence when all of its
# other words occur there. "no" is deliberately absent, so "no volume loss" never
# matches a sentence that reports volume loss.
_SIGN_STOPWORDS = frozenset(
    "a an the of on in at to and or with by for from about than over along beyond into".split()
)
_WORD = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")
_PARENTHETICAL = re.compile(r"\s*\([^)]*\)")
_CANONICAL = {o.casefold(): o for o in OBSERVATIONS}
_LOCATION_WORDS = r"(?:left|right|bilateral|upper|middle|mid|lower|apical|basal|lateral|posterior|anterior)"


def canonical_observation(name: Any) -> str | None:
    """The CheXpert spelling of an observation name (case and spacing ignored), or None."""
    return _canonical(name) if isinstance(name, str) else None


@lru_cache(maxsize=1024)  # called for every stated finding of every chain: keep it a dict hit
def _canonical(name: str) -> str | None:
    return _CANONICAL.get(" ".join(name.split()).casefold())


def sign_phrase(sign: str) -> str:
    """A sign as prose: parenthetical qualifiers such as '(supine)' dropped."""
    return " ".join(_PARENTHETICAL.sub("", sign).split())


def _stem(word: str) -> str:
    # Plural-insensitive matching ("bronchograms" ~ "bronchogram", "bases" ~ "base").
    if word.endswith("sses"):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _stems(text: str) -> set[str]:
    return {_stem(w) for w in _WORD.findall(text.casefold())}


def _sign_keys(sign: str) -> frozenset[str]:
    return frozenset(_stem(w) for w in _WORD.findall(sign_phrase(sign).casefold()) if w not in _SIGN_STOPWORDS)


def _as_strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(" ".join(v.split()) for v in value if isinstance(v, str) and v.strip())


@dataclass(frozen=True)
class ObservationKnowledge:
    """What a radiologist cites for one observation."""

    name: str
    anatomy: tuple[str, ...] = ()
    signs: tuple[str, ...] = ()
    caveats: tuple[str, ...] = ()
    related: tuple[str, ...] = ()
    # Precomputed word sets of each sign, so matching a sentence is a set test.
    sign_keys: tuple[frozenset[str], ...] = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class KnowledgeMap:
    observations: Mapping[str, ObservationKnowledge]
    progression_cues: Mapping[str, tuple[str, ...]]
    # One compiled regex per progression (all its cues), built at load time.
    cue_patterns: Mapping[str, re.Pattern[str]] = field(default_factory=dict, repr=False, compare=False)
    # Every cue of every progression: most texts hold none, and one search says so (the judge asks
    # this of every clause it reads).
    any_cue: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.cue_patterns and self.progression_cues:
            patterns = {
                progression: re.compile(r"\b(?:" + "|".join(re.escape(c.casefold()) for c in cues) + r")\b")
                for progression, cues in self.progression_cues.items()
                if cues
            }
            object.__setattr__(self, "cue_patterns", patterns)
        if self.any_cue is None and self.cue_patterns:
            object.__setattr__(self, "any_cue", any_of(self.cue_patterns.values()))

    def get(self, observation: str) -> ObservationKnowledge | None:
        name = canonical_observation(observation) or observation
        return self.observations.get(name)

    def signs_in(self, observation: str, text: str) -> list[str]:
        """Signs of ``observation`` that ``text`` describes (every content word of the sign occurs)."""
        knowledge = self.get(observation)
        if knowledge is None or not text:
            return []
        words = _stems(text)
        return [s for s, keys in zip(knowledge.signs, knowledge.sign_keys) if keys and keys <= words]

    def findings_for_sign(self, text: str) -> list[tuple[str, str]]:
        """The sign → finding direction: (observation, sign) for every sign that ``text`` describes."""
        words = _stems(text or "")
        return [
            (k.name, sign)
            for k in self.observations.values()
            for sign, keys in zip(k.signs, k.sign_keys)
            if keys and keys <= words
        ]

    def anatomy_in(self, observation: str, text: str) -> str | None:
        """Where ``text`` places ``observation``: its first anatomy term found, with laterality if stated."""
        if not text:
            return None
        lowered = " ".join(text.casefold().split())  # reports wrap lines mid-phrase
        sides = [s for s in ("bilateral", "left", "right") if re.search(rf"\b{s}\b", lowered)]
        side = sides[0] if len(sides) == 1 else None
        knowledge = self.get(observation)
        for term in knowledge.anatomy if knowledge else ():
            match = re.search(rf"\b((?:{_LOCATION_WORDS}\s+){{0,3}}){re.escape(term.casefold())}(?:e?s)?\b", lowered)
            if match:
                # Keep the location words the text puts in front ("right lower lobe").
                place = f"{match.group(1)}{term}"
                return place if side is None or side in match.group(1) else f"{side} {place}"
        return side

    def progressions_in(self, text: str) -> set[str]:
        """Progression classes (improving/stable/worsening) whose cue words occur in ``text``."""
        lowered = " ".join((text or "").casefold().split())
        if self.any_cue is None or not self.any_cue.search(lowered):
            return set()
        return {progression for progression, pattern in self.cue_patterns.items() if pattern.search(lowered)}


def _parse_knowledge(raw: Any) -> KnowledgeMap:
    observations: dict[str, ObservationKnowledge] = {}
    cues: dict[str, tuple[str, ...]] = {}
    if not isinstance(raw, dict):
        return KnowledgeMap({}, {})
    for key, entry in raw.items():
        if key == "progression_cues" and isinstance(entry, dict):
            for progression, words in entry.items():
                if isinstance(progression, str) and progression.casefold() in PROGRESSIONS:
                    cues[progression.casefold()] = _as_strings(words)
            continue
        if not isinstance(key, str) or not isinstance(entry, dict):
            continue  # malformed entry: skip, the rest of the map is still useful
        name = canonical_observation(key) or " ".join(key.split())
        signs = _as_strings(entry.get("signs"))
        observations[name] = ObservationKnowledge(
            name=name,
            anatomy=_as_strings(entry.get("anatomy")),
            signs=signs,
            caveats=_as_strings(entry.get("caveats")),
            related=_as_strings(entry.get("related")),
            sign_keys=tuple(_sign_keys(s) for s in signs),
        )
    return KnowledgeMap(observations, cues)


def parse_knowledge_map(text: str) -> KnowledgeMap:
    """A knowledge map from YAML text; invalid YAML gives an empty map."""
    try:
        return _parse_knowledge(yaml.safe_load(text))
    except yaml.YAMLError:
        return KnowledgeMap({}, {})


@lru_cache(maxsize=8)
def _load_cached(path: str) -> KnowledgeMap:
    return parse_knowledge_map(Path(path).read_text(encoding="utf-8"))


def load_knowledge_map(path: Path | str | None = None) -> KnowledgeMap:
    """The knowledge map (the bundled one by default); loaded once per path."""
    return _load_cached(str(Path(path) if path is not None else KNOWLEDGE_MAP))


@lru_cache(maxsize=1)
def mention_phrases() -> dict[str, tuple[str, ...]]:
    """CheXpert labeler mention phrases per observation ('_' in the files stands for a space).

    Used only to find a candidate sentence for a label that arrived without one (labels
    from the CheXpert CSV carry values but no sentences).
    """
    folder = LEXICONS / "chexpert" / "phrases" / "mention"
    phrases: dict[str, tuple[str, ...]] = {}
    for name in OBSERVATIONS:
        path = folder / (name.lower().replace(" ", "_") + ".txt")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        phrases[name] = tuple(line.replace("_", " ").casefold() for line in lines if line.strip())
    return phrases


def observation_phrases(observation: str) -> tuple[str, ...]:
    """The words a report may name ``observation`` by: its CheXpert mention phrases and its own
    name, casefolded."""
    return (*mention_phrases().get(observation, ()), observation.casefold())
