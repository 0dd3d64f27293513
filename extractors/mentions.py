"""Finding mentions in radiology text, each with a status (present / absent / uncertain).

Shared by the CheXpert labeler (extractors/labeler.py) and, later, RadRScore's finding
extraction from free model reasoning. The pipeline, per text:

1. spaCy (``spacy.blank("en")``) with a lean report tokenizer, a rule component that adds
   sentence breaks at blank lines and upper-case headers, and the sentencizer: sentences.
   spaCy's PhraseMatcher (token level, lower case) finds the negation / uncertainty /
   termination cues. With the default English tokenizer spaCy alone runs at about the
   labeler's whole budget, so the tokenizer here only splits off punctuation.
2. Mention phrases are CheXpert's lexicon (substring semantics: "atelecta" matches
   "atelectatic") merged with NegBio's YAML (whose regex entries add word boundaries:
   "tube" must not match "tuberculosis"), minus the unmention phrases ("pericardial
   effusion" is not a pleural effusion). One trie-shaped regular expression finds every
   phrase start in one pass, overlapping ones included ("cardiac silhouette and
   vascularity" names two observations).
3. Each mention takes the status of the nearest cue before it and the nearest cue after
   it inside its sentence, within the cue's window and not across a terminator ("but",
   "however", ";", "with" ...). Uncertainty beats negation when both apply.

Decisions (CheXpert conventions unless noted):
* A mention with no cue is present ("stable", "unchanged", "persistent" do not hedge;
  NegBio's "unchanged X = uncertain" rule is deliberately not used).
* Organ descriptors ("heart size", "cardiac silhouette", "mediastinum", "contour" ...)
  name no abnormality by themselves: without a cue they count only when the clause
  carries an enlargement word ("enlarged", "widened", "prominent" ...). "The heart size
  is stable" is therefore not a Cardiomegaly mention (radchain decision).
* An uncertainty cue inside a negation's scope is absorbed: "no focal consolidation to
  suggest pneumonia" negates pneumonia; a comma breaks the absorption ("no pneumothorax,
  possible small effusion").
* "A or B" with two different, otherwise unhedged observations makes both uncertain
  ("atelectasis or pneumonia"); "no A or B" stays negated (radchain decision).
* Findings outside the 14 observations (CheXpert's no-finding list: emphysema,
  scoliosis ...) are returned as ``OTHER_FINDING``; they only rule out No Finding.
* ``expand_normals=True`` (free-text reasoning, not the labeler) also reads normal
  paraphrases, see ``NORMAL_PARAPHRASES``: "the lungs are clear" states Lung Opacity,
  Consolidation, Pneumonia, Edema and Atelectasis absent (clear lungs exclude all
  parenchymal opacity, atelectasis included; not Lung Lesion, a nodule can sit in clear
  lungs); "no acute cardiopulmonary process" states the acute findings absent (not
  Atelectasis, which MIMIC reports often list beside that very sentence, nor chronic
  Cardiomegaly). A paraphrase never overrides an explicit mention in the same sentence.
  Presence needs no paraphrase: "there is X", "X is seen" are read as present already.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import spacy
import yaml
from spacy.language import Language
from spacy.matcher import PhraseMatcher
from spacy.attrs import IDX, IS_SPACE, IS_TITLE, IS_UPPER, ORTH, SENT_START, SPACY
from spacy.tokenizer import Tokenizer
from spacy.tokens import Doc

from extractors.resources import KNOWLEDGE_MAP, LEXICONS
from extractors.trie import any_of as _any_of
from extractors.trie import trie_pattern as _trie_pattern
from schemas.labels import OBSERVATIONS

Status = Literal["present", "absent", "uncertain"]
OTHER_FINDING = "Other Finding"  # CheXpert's "no finding" list: findings outside the 14 labels
STATUS_RANK = {"present": 3, "uncertain": 2, "absent": 1}  # CheXpert aggregation order


@dataclass(frozen=True, slots=True)
class Mention:
    """One finding mention. Offsets index the text given to find_mentions, plus base_offset."""

    observation: str  # a CheXpert observation name, or OTHER_FINDING
    status: Status
    start: int  # the matched phrase
    end: int
    phrase: str
    sentence_start: int
    sentence_end: int
    sentence: str
    # The cue that decided the status, lower-cased as written ("cannot be excluded", "no
    # evidence of"); "or" for a disjunction; "paraphrase: <name>" for expand_normals; None
    # for a plain present mention.
    cue: str | None = None
    anatomy: str | None = None  # "left lower lobe", "right", "bibasilar" ... when stated


# =====================================================================================
# Mention lexicon
# =====================================================================================

@dataclass(frozen=True, slots=True)
class _Phrase:
    observation: str
    left_boundary: bool  # the character before must not be a letter or digit
    right_boundary: bool
    exclusion: bool  # an unmention phrase: mentions of `observation` overlapping it are dropped
    descriptor: bool  # names an organ, not an abnormality (needs an enlargement word)


# Organ descriptors of CheXpert's lexicon (see module docstring).
_DESCRIPTORS = {
    "Cardiomegaly": {"the heart", "heart size", "cardiac size", "cardiac shadow", "cardiac contour",
                     "cardiac silhouette", "heart"},
    "Enlarged Cardiomediastinum": {"mediastinum", "cardiomediastinum", "contour", "mediastinal configuration",
                                   "mediastinal silhouette", "pericardial silhouette",
                                   "cardiac silhouette and vascularity"},
}
# Words that make a descriptor an abnormality in its clause.
_ENLARGEMENT_RE = re.compile(r"\b(?:enlarg|large|widen|wide\b|prominen|increas|abnormal|dilat|globular|big\b|"
                             r"cardiomegaly|bulg)")

# radchain additions to the lexicon, kept small and explicit. Exclusions fix phrase
# collisions seen in chest reports: "plate-like atelectasis" is not a plate, Kerley B /
# septal lines and the pleural line of a pneumothorax are not catheters.
_EXTRA_EXCLUSIONS = {
    "Support Devices": ("plate-like", "plate like", "platelike", "pleural line", "septal line", "kerley b line",
                        "kerley line", "skin line", "skin fold line",
                        # vertebral endplates and growth plates are bone, not hardware
                        "endplate", "end plate", "end-plate", "growth plate",
                        # "support" as a verb: "findings support the diagnosis of pneumonia"
                        "support the", "support a ", "support an ", "support this", "support of", "support for",
                        "supports", "supporting", "supported", "supportive"),
    "Lung Lesion": ("lumpectomy",),
    # Effusions of other spaces: joints, pericardium (CheXpert's unmention list has the latter)
    "Pleural Effusion": ("joint effusion", "knee effusion", "elbow effusion", "ankle effusion", "hip effusion",
                         "subdural effusion"),
    # Edema outside the lungs is not pulmonary edema
    "Edema": ("soft tissue edema", "soft-tissue edema", "subcutaneous edema", "peripheral edema", "pedal edema",
              "extremity edema", "leg edema", "bowel wall edema", "scalp edema", "facial edema"),
    # Healed granulomatous disease is a granuloma (an "other finding"), not an infection today
    "Pneumonia": ("granulomatous infection", "granulomatous infectious", "postinfectious", "post-infectious",
                  "post infectious", "radiation pneumonitis", "hypersensitivity pneumonitis"),
}
_EXTRA_MENTIONS = {
    "Enlarged Cardiomediastinum": ("mediastinal widening", "mediastinal enlargement"),
    # Synonyms of entries of CheXpert's "other finding" list (degenera-, osteophytosis,
    # aortic disease, scoliosis): the list names the family, reports use these words.
    OTHER_FINDING: ("spondylosis", "spondylotic", "osteophyte", "tortuous aorta", "tortuosity of the aorta",
                    "aortic tortuosity", "ectatic aorta", "aortic ectasia", "unfolded aorta", "unfolding of the aorta",
                    "thoracolumbar curvature", "spinal curvature", "curvature of the spine",
                    "dextroconvex curvature", "levoconvex curvature", "tortuous", "tortuosity", "ectatic", "ectasia",
                    "unfolding", "unfolded", "curvature of the thoracic", "curvature of the spine", "dextro curvature",
                    "rightward curvature", "leftward curvature", "syndesmophyte", "hyperexpanded", "hyperaerated",
                    "hyperaeration", "hyperlucent", "hyperlucency", "elevated", "flattened hemidiaphragm",
                    "flattening of the hemidiaphragm", "flattened diaphragm"),
    # Inflammation of the parenchyma is read as pneumonia (radiation and hypersensitivity
    # pneumonitis are excluded below: chronic, non-infectious).
    "Pneumonia": ("pneumonitis",),
    "Cardiomegaly": ("heart enlargement", "enlargement of the heart"),
}
# Free-text only (expand_normals): models write "the heart is normal in size".
_EXPAND_MENTIONS = {"Cardiomegaly": ("_heart_",)}

_MIN_PHRASE_CHARS = 3  # NegBio's "\bicd?\b" would also yield "ic"; two letters match too much


def _lexicon_name(observation: str) -> str:
    return OTHER_FINDING if observation == "No Finding" else observation


def _read_phrase_file(path) -> list[str]:
    if not path.exists():
        return []
    return [line.rstrip("\n").lower() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _parse_chexpert_phrase(raw: str) -> tuple[str, bool, bool]:
    """CheXpert phrase files write spaces as "_"; a leading/trailing one means a word boundary."""
    left, right = raw.startswith(("_", " ")), raw.endswith(("_", " "))
    core = raw.replace("_", " ").strip()
    return core, left, right


def _parse_negbio_phrase(raw: str) -> list[tuple[str, bool, bool]]:
    """NegBio entries are substrings, or regexes of the form ``\\bword?\\b``."""
    text = str(raw).lower()
    if "\\" not in text:
        left, right = text.startswith(" "), text.endswith(" ")
        return [(text.strip(), left, right)]
    left, right = text.startswith("\\b"), text.endswith("\\b")
    core = text.removeprefix("\\b").removesuffix("\\b")
    variants = [core]
    if core.endswith("?"):  # "lines?": the last letter is optional
        variants = [core[:-2], core[:-1]]
    return [(v, left, right) for v in variants if re.fullmatch(r"[a-z \-]+", v)]


@dataclass
class _Lexicon:
    phrases: dict[str, list[_Phrase]]  # core text -> phrase rules sharing it
    prefixes: dict[str, list[str]]  # core text -> every core text that is a prefix of it (itself included)
    regex: re.Pattern[str]  # zero-width lookahead trie: group 1 is the longest phrase at a position


@lru_cache(maxsize=2)
def _lexicon(expand: bool) -> _Lexicon:
    entries: dict[tuple[str, str, bool], list[bool]] = {}  # (core, observation, exclusion) -> [left, right]

    def add(core: str, observation: str, left: bool, right: bool, exclusion: bool = False) -> None:
        if len(core.replace(" ", "")) < _MIN_PHRASE_CHARS:
            return
        key = (core, observation, exclusion)
        if key in entries:  # the same phrase from both lexicons: keep the stricter boundaries
            entries[key][0] |= left
            entries[key][1] |= right
        else:
            entries[key] = [left, right]

    negbio = yaml.safe_load((LEXICONS / "negbio" / "chexpert_phrases.yml").read_text(encoding="utf-8")) or {}
    for observation in OBSERVATIONS:
        name = _lexicon_name(observation)
        entry = negbio.get(observation) or {}
        bounded: dict[str, tuple[bool, bool]] = {}
        for raw in entry.get("include", []) or []:
            for core, left, right in _parse_negbio_phrase(raw):
                add(core, name, left, right)
                if "\\" in str(raw):
                    bounded[core] = (left, right)
        for raw in entry.get("exclude", []) or []:
            for core, left, right in _parse_negbio_phrase(raw):
                add(core, name, left, right, exclusion=True)
        stem = observation.lower().replace(" ", "_")
        for raw in _read_phrase_file(LEXICONS / "chexpert" / "phrases" / "mention" / f"{stem}.txt"):
            core, left, right = _parse_chexpert_phrase(raw)
            # NegBio's regex form of a CheXpert phrase ("\btubes?\b" for "tube") is the
            # refinement: its boundaries apply to the substring too.
            b_left, b_right = bounded.get(core, (False, False))
            add(core, name, left or b_left, right or b_right)
        for raw in _read_phrase_file(LEXICONS / "chexpert" / "phrases" / "unmention" / f"{stem}.txt"):
            core, left, right = _parse_chexpert_phrase(raw)
            add(core, name, left, right, exclusion=True)
    for observation, cores in _EXTRA_EXCLUSIONS.items():
        for core in cores:
            add(core, observation, False, False, exclusion=True)
    for observation, cores in _EXTRA_MENTIONS.items():
        for core in cores:
            add(core, observation, False, False)
    if expand:
        for observation, raws in _EXPAND_MENTIONS.items():
            for raw in raws:
                core, left, right = _parse_chexpert_phrase(raw)
                add(core, observation, left, right)

    phrases: dict[str, list[_Phrase]] = {}
    for (core, observation, exclusion), (left, right) in entries.items():
        descriptor = core in _DESCRIPTORS.get(observation, ())
        phrases.setdefault(core, []).append(_Phrase(observation, left, right, exclusion, descriptor))
    cores = sorted(phrases)
    prefixes = {c: [p for p in cores if c.startswith(p)] for c in cores}
    regex = re.compile("(?=(" + _trie_pattern(cores) + "))")
    return _Lexicon(phrases, prefixes, regex)


# =====================================================================================
# Cues
# =====================================================================================

CueKind = Literal["negation", "uncertainty", "pseudo", "affirm", "hypothetical", "termination"]
_ANY = 10_000  # window: up to the end of the clause


@dataclass(frozen=True, slots=True)
class CueRule:
    """A family of cue phrases. Windows count words between cue and mention (0 = that
    direction is off). ``*_commas``: whether the scope may cross a comma (lists do)."""

    name: str
    kind: CueKind
    phrases: tuple[str, ...]
    pre: int = 0  # the cue precedes the mention: "no pneumothorax"
    post: int = 0  # the cue follows the mention: "pneumothorax is not seen"
    pre_commas: bool = False
    post_commas: bool = False


def _variants(pattern: str) -> list[str]:
    """Expand "cannot be [entirely|fully|] excluded" into its phrases ("|]" = optional)."""
    m = re.search(r"\[([^\[\]]*)\]", pattern)
    if not m:
        return [re.sub(r"\s+", " ", pattern).strip()]
    out = []
    for alt in m.group(1).split("|"):
        out.extend(_variants(pattern[: m.start()] + alt + pattern[m.end():]))
    return out


def _phrases(*patterns: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v for p in patterns for v in _variants(p)))


_SEVERITY_WORDS = ("mild", "mildly", "moderate", "severe", "small", "large", "minimal", "trace", "tiny", "new",
                   "stable", "persistent", "unchanged", "increased", "decreased", "improved", "worsened",
                   "worsening", "slight", "subtle", "marked", "extensive")

CUE_RULES: tuple[CueRule, ...] = (
    # ---- negation -------------------------------------------------------------------
    # List heads: "no focal consolidation, pleural effusion, or pneumothorax". Their scope
    # runs to the end of the clause and across a coordinated list (see _list_scope_ok).
    CueRule("no", "negation", _phrases(
        "no", "no [radiographic|definite|convincing|definitive|obvious|visible|other|] evidence [of|for|]",
        "no [radiographic|definite|] sign[s|] of", "no findings of", "no findings to suggest",
        "without", "without [radiographic|definite|] evidence of", "w/o",
        "negative for", "free of", "clear of", "absence of", "neither", "nor", "no longer", "no new",
        "never", "denies", "denied", "deny", "rules out", "ruling out", "ruled out for", "there is no",
        "there are no", "there has been no", "not [demonstrate|show|reveal|identify|see|appear to be|"
        "appear to have|suggest|represent]", "[does|do|did] not [demonstrate|show|reveal|appear to be|"
        "appear to have|suggest|represent|see|have|include|identify|contain]",
        "no signs or symptoms of", "-ve for", "not [consistent|compatible] with", "not in keeping with",
        "not support [a|the|] [diagnosis of|]", "no known",
        "[isn't|aren't|wasn't|weren't] [any|]", "there [isn't|aren't] [any|]", "[is|are] not any",
        "[doesn't|don't|didn't] [show|demonstrate|reveal|appear to be|appear to have|suggest|have|include]", "resolution of"), pre=_ANY, pre_commas=True),
    CueRule("resolved", "negation", _phrases(
        "resolved", "[interval|] removal of", "cleared"), pre=3, post=4, post_commas=True),
    CueRule("has resolved", "negation", _phrases(
        "[has|have] resolved", "[has|have] cleared", "[has|have] been removed", "[was|were] removed", "removed",
        "no longer [seen|visualized|present|evident|identified|visible|appreciated]",
        "[is|are|was|were|has been|have been] [excluded|ruled out]", "excluded", "ruled out",
        ": [not present|none|negative|absent]", "- [not present|none|negative|absent]",
        "[is|are] [not present|not seen|not identified|not evident|not appreciated]", "[is|are] unlikely",
        "not [present|seen|identified|evident|appreciated|visualized|demonstrated]"), post=12, post_commas=True),
    CueRule("normal", "negation", _phrases(
        "normal", "within normal limits", "normal in size", "top normal", "top-normal", "upper normal",
        "upper limit[s|] of normal", "unremarkable"), pre=3, post=6, post_commas=True),
    CueRule("not", "negation", _phrases("not", "is not", "are not", "was not", "were not", "does not", "do not",
                                        "did not", "cannot", "can not", "negative", "unlikely"),
            pre=6, post=4),
    CueRule("absent", "negation", _phrases("absent", "[is|are] absent"), pre=2, post=3),
    # ---- uncertainty ----------------------------------------------------------------
    # List heads: "concerning for pneumonia, aspiration, or atelectasis".
    CueRule("possible", "uncertainty", _phrases(
        "possible", "possibility of", "probable", "potential", "suspicion [of|for]", "suspicious [for|of|]",
        "concerning for", "concern for", "worrisome [for|]", "suggestive of", "suggesting", "suggests", "suggest",
        "to suggest", "question of", "questionable", "question", "[cannot|can not|can't|could not] [exclude|rule out]",
        "[to|] rule out", "r/o", "to exclude", "evaluate for", "assess for", "[to|] evaluate for",
        "differential [diagnosis|] [includes|include|of|is|]", "differential [diagnosis|] [would|may|could] include",
        "differential considerations [include|]", "consider", "equivocal", "indeterminate", "uncertain",
        "doubtful", "doubt", "rather than", "less likely", "[may|might|could] [represent|reflect|"
        "indicate|be due to|relate to|be related to]", "[may|might|could] [also|] [be|have]", "there may be",
        "there might be", "there could be", "raising the possibility of", "correlate [clinically|] for",
        "clinical correlation for", "suggestion of", "[evaluation|assessment] for",
        "[possibly|likely|probably|most likely|perhaps] [due to|related to|representing|reflecting|from]",
        "[may|might|could] be [compatible|consistent] with"), pre=_ANY, pre_commas=True),
    # Short modifiers: their scope stops at a comma ("opacity, likely atelectasis").
    CueRule("likely", "uncertainty", _phrases(
        "likely", "most likely", "more likely", "possibly", "probably", "presumably", "presumed", "may", "might",
        "could", "appears to be", "apparent", "perhaps"), pre=4),
    CueRule("borderline", "uncertainty", _phrases("borderline"), pre=3, post=2),
    # "?PNA" in an indication, "pneumonia?" in a hedged impression.
    CueRule("question mark", "uncertainty", ("?",), pre=2, post=1),
    CueRule("suspected", "uncertainty", _phrases("suspected"), pre=5, post=2),
    CueRule("versus", "uncertainty", _phrases("versus", "vs", "vs.", "and/or"), pre=3, post=2),
    CueRule("cannot be excluded", "uncertainty", _phrases(
        "[cannot|can not|can't|could not|may not] be [entirely|completely|fully|totally|definitely|definitively|] "
        "[excluded|ruled out|evaluated|assessed|confirmed|identified|detected|determined|characterized]",
        "[is|are|] not [entirely|completely|] [excluded|ruled out]", "not be [excluded|ruled out]",
        "[is|are|] not well [seen|visualized|evaluated|assessed]", "[is|are|] not well-[seen|visualized]", "[is|are] [questioned|questionable|equivocal|"
        "uncertain|indeterminate|possible|suspected|considered|a consideration|not excluded]",
        "[is|are|] difficult to [entirely|completely|fully|] exclude", "remains a possibility", "if any", "if present",
        "[is|are] less likely", "[is|are] [also|] in the differential", "[is|are] a differential consideration",
        "[may|might|could] [also|] [be present|be seen|be developing|be forming|coexist|be superimposed|"
        "be contributing|contribute|be considered]", "likely .", "likely ,", "likely present", "possible .",
        "possible ,", "not [definitely|clearly|well] [seen|excluded|identified]"),
        post=6, post_commas=True),
    # ---- hypothetical / definitional: no claim about this patient's image -----------
    # "CT is more sensitive in detecting small nodules", "pneumothorax appears as a visible
    # pleural line", "if pneumonia is suspected". A mention they scope over is dropped.
    CueRule("hypothetical", "hypothetical", _phrases(
        "more sensitive", "[is|are] sensitive for", "in detecting", "for detecting", "for detection of",
        "to detect", "to look for", "screening for", "if there is", "if there are", "in case of", "in the event of",
        "if",
        "would be expected", "would appear", "would suggest", "would indicate"), pre=8),
    CueRule("definition", "hypothetical", _phrases(
        "[typically|usually|classically|generally] [appears|appear|presents|present]", "appears as",
        "[is|are] [defined|characterized|characterised] [as|by]", "can appear as", "may appear as",
        "[typically|usually|often] [shows|show|causes|cause]", "is a condition", "refers to", "is seen as",
        "manifests as"), post=3),
    # ---- pseudo-negation: looks like a cue, states presence -------------------------
    CueRule("no change", "pseudo", _phrases(
        "[no|without] [significant|substantial|appreciable|] [interval|] change [in|of|]",
        "not [significantly|] changed", "gram negative", "not only", "no increase in", "no decrease in",
        "without [significant|] [increase|decrease|improvement] in", "not [significantly|] [increased|decreased]",
        "no [significant|] [interval|] [improvement|worsening] [in|of]"), pre=8, post=4, pre_commas=True),
    # ---- affirmation: presence stated outright; blocks cues farther away ------------
    CueRule("consistent with", "affirm", _phrases(
        "consistent with", "compatible with", "in keeping with", "diagnostic of", "characteristic of",
        "there [is|are|has been|have been]"), pre=6),
    CueRule("is seen", "affirm", _phrases(
        "[is|are] [again|] [seen|noted|present|redemonstrated|identified|demonstrated|visualized|evident|"
        "appreciated|unchanged|stable|new]", "again seen", "persist[s|]", "remain[s|]", "[has|have] [increased|"
        "decreased|developed|worsened|improved]"), post=3),
    # ---- scope terminators ----------------------------------------------------------
    CueRule("termination", "termination", _phrases(
        "but", "however", "although", "though", "except [for|]", "aside from", "apart from", "other than", "which",
        "whereas", "while", "yet", "with", "following", "after", "status post", "s/p", "since", "given",
        "otherwise", "in addition", "additionally", ";", ":", "and there", "and the", ", there",
        "because", "as well as", "instead", "that", "who")),
)

# A comma followed by one of these opens a new assertion unless the list is disjunctive
# ("no pneumothorax, small left effusion" vs "no consolidation, large effusion, or pneumothorax").
_NEW_ITEM_WORDS = frozenset(_SEVERITY_WORDS) | {"there", "the", "this", "these", "it", "residual", "possible",
                                                 "probable", "likely", "questionable", "suspected"}
_VERB_RE = re.compile(r"\b(?:is|are|was|were|has|have|had|remains?|appears?|seems?|measures?|demonstrates?|"
                      r"shows?|reveals?|persists?)\b")
_DISJUNCTION_RE = re.compile(r"(?:^|[\s,])(?:or|nor|and/or)\s|[a-z]/[a-z]")


@dataclass(frozen=True, slots=True)
class _Cue:
    rule: CueRule
    start: int
    end: int


# =====================================================================================
# spaCy pipeline: tokenizer, report-specific sentence breaks, sentencizer, cue matcher
# =====================================================================================



@Language.component("radchain_report_breaks")
def report_breaks(doc: Doc) -> Doc:
    """Sentence starts the sentencizer cannot see: after a blank line, after an upper-case
    header ("FINDINGS:"), and after a "?" that ends a question ("Effusion? No."). The
    sentencizer itself does not split at "?", because reports hedge with it ("?PNA").

    Works on token arrays, not on ``doc.text``: rebuilding the text visits every token in
    Python and would cost as much as the tokenizer.
    """
    n = len(doc)
    if n < 2:
        return doc
    arr = doc.to_array([IS_SPACE, IS_UPPER, ORTH, SPACY, IS_TITLE])
    space, upper, orth = arr[:, 0], arr[:, 1], arr[:, 2]
    colon, question, paren = (np.uint64(doc.vocab.strings[c]) for c in (":", "?", ")"))
    # Only whitespace tokens, colons, question marks and closing parentheses can mark a break: the
    # loop visits those (a few per cent of the tokens), not every token.
    is_space = space.astype(bool)
    marks = np.flatnonzero(is_space | (orth == colon) | (orth == question) | (orth == paren)).tolist()
    space_at = is_space.tolist()
    cut_after: list[int] = []
    for i in marks:
        mark = orth[i]
        if space_at[i] and doc[i].text.count("\n") >= 2:
            cut_after.append(i)
        elif mark == colon and i > 0 and upper[i - 1]:
            cut_after.append(i)
        elif mark == paren and i > 0 and doc[i - 1].is_digit and len(doc[i - 1]) <= 2 and i > 1:
            cut_after.append(i - 2)  # "... HEMORRHOIDS 2) Normal ileum": a numbered item starts a sentence
        elif mark == question and i + 1 < n and (arr[i, 3] or space_at[i + 1]):
            j = i + 1
            while j < n and space_at[j]:
                j += 1
            if j < n and (arr[j, 4] or upper[j]):  # the next word starts a new sentence
                cut_after.append(i)
    if not cut_after:
        return doc
    # Written as one array: Token.is_sent_start's setter scans the whole document per call.
    starts = doc.to_array([SENT_START])
    for i in cut_after:
        j = i + 1
        while j < n and space_at[j]:
            j += 1
        if j < n:
            starts[j] = 1
    doc.from_array([SENT_START], starts)
    return doc


def _report_tokenizer(nlp: Language) -> Tokenizer:
    """Splits punctuation off words and nothing else: about ten times faster than the
    default English rules, which is what keeps the labeler above 2,000 reports/s."""
    specials = {w: [{ORTH: w}] for w in ("vs.", "Vs.", "VS.", "e.g.", "i.e.", "Dr.", "approx.", "St.")}
    return Tokenizer(
        nlp.vocab,
        rules=specials,
        prefix_search=re.compile(r"""^[\(\[\{"'?]""").search,
        suffix_search=re.compile(r"""[\.,;:!\?\)\]\}"']$""").search,
        infix_finditer=re.compile(r"[,;/]|(?<=[a-z])\.(?=[A-Z])").finditer,
    )


@dataclass
class _Pipeline:
    nlp: Language
    matcher: PhraseMatcher
    rule_of: dict[int, CueRule]


@lru_cache(maxsize=1)
def _pipeline() -> _Pipeline:
    nlp = spacy.blank("en")
    nlp.tokenizer = _report_tokenizer(nlp)
    nlp.add_pipe("radchain_report_breaks")
    # "?" does not end a sentence here: reports use it as a hedge ("?pneumonia"). The
    # sentencizer leaves the starts set by report_breaks alone (overwrite=False).
    nlp.add_pipe("sentencizer", config={"punct_chars": [".", "!", "\u3002"]})
    matcher = PhraseMatcher(nlp.vocab, attr="LOWER")
    rule_of = {}
    for rule in CUE_RULES:
        matcher.add(rule.name, [nlp.make_doc(p) for p in rule.phrases])
        rule_of[nlp.vocab.strings[rule.name]] = rule
    return _Pipeline(nlp, matcher, rule_of)


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Sentence (start, end) offsets into ``text``, whitespace trimmed, list markers ("2.") dropped."""
    norm = _Normalized(text)
    return [(norm.start(s), norm.end(e)) for s, e in _sentences(_pipeline().nlp(norm.text), norm.text)]


def _sentences(doc: Doc, text: str) -> list[tuple[int, int]]:
    # Read the sentence starts as arrays: iterating doc.sents builds a Python object per
    # token and cost more than the tokenizer itself.
    if len(doc) == 0:
        return []
    arr = doc.to_array([SENT_START, IDX])
    bounds = [int(i) for i, flag in zip(arr[:, 1].tolist(), arr[:, 0].tolist()) if flag == 1]
    if not bounds or bounds[0] != 0:
        bounds.insert(0, 0)
    bounds.append(len(text))
    out = []
    for s, e in zip(bounds, bounds[1:]):
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if e > s and any(ch.isalpha() for ch in text[s:e]):
            out.append((s, e))
    return out


def _cues(doc: Doc, pipe: _Pipeline) -> list[_Cue]:
    """Non-overlapping cue matches, the longest at each position (offsets in characters)."""
    found = sorted(pipe.matcher(doc), key=lambda m: (m[1], -m[2]))
    out: list[_Cue] = []
    last_end = -1
    for match_id, s, e in found:
        if s < last_end:
            continue
        last_end = e
        first, last = doc[s], doc[e - 1]
        out.append(_Cue(pipe.rule_of[match_id], first.idx, last.idx + len(last)))
    return out


# =====================================================================================
# Normal paraphrases (expand_normals)
# =====================================================================================

_PARENCHYMA = ("Lung Opacity", "Consolidation", "Pneumonia", "Edema", "Atelectasis")
_ACUTE = ("Lung Opacity", "Consolidation", "Pneumonia", "Edema", "Pleural Effusion", "Pneumothorax")
# (name, regex on lower-cased text, observations stated, status)
NORMAL_PARAPHRASES: tuple[tuple[str, re.Pattern[str], tuple[str, ...], Status], ...] = (
    ("clear lungs", re.compile(
        r"\b(?:(?:the\s+)?(?:lungs?|lung fields?|lung parenchyma)\s+(?:(?:is|are|remain|remains|appear|appears)\s+)?"
        r"(?:\w+\s+(?:and|but)\s+)?(?<!not )(?:otherwise\s+)?clear\b(?!\s+of)|\bclear\s+lungs?\b)"),
     _PARENCHYMA, "absent"),
    ("no acute cardiopulmonary process", re.compile(
        r"\b(?:no|without)\s+(?:evidence\s+of\s+)?(?:acute|active)\s+(?:cardiopulmonary|intrathoracic|pulmonary|"
        r"cardiothoracic|chest|lung)\s+(?:process|abnormalit(?:y|ies)|disease|findings?|pathology|change)"),
     _ACUTE, "absent"),
    ("no acute osseous abnormality", re.compile(
        r"\b(?:no\s+(?:acute\s+)?(?:osseous|bony|skeletal)\s+(?:abnormalit(?:y|ies)|injury|lesions?|findings?)|"
        r"(?:osseous|bony)\s+structures\s+(?:are\s+)?(?:intact|unremarkable|normal))"),
     ("Fracture",), "absent"),
    ("sharp costophrenic angles", re.compile(
        r"\b(?:costophrenic\s+angles?\s+(?:is|are)\s+(?:\w+\s+)?sharp|sharp\s+costophrenic\s+angles?)"),
     ("Pleural Effusion",), "absent"),
    ("normal pulmonary vasculature", re.compile(
        r"\b(?:pulmonary\s+)?vascula(?:ture|rity)\s+(?:is|are)\s+(?:within\s+)?normal|"
        r"\bnormal\s+(?:pulmonary\s+)?vascula(?:ture|rity)"),
     ("Edema",), "absent"),
    ("normal study", re.compile(
        r"\b(?:normal\s+(?:chest\s+)?(?:radiograph|x-?ray|study|examination|exam|chest)|"
        r"no\s+(?:radiographic\s+)?(?:abnormalit(?:y|ies)|findings)\b)"),
     ("No Finding",), "present"),
)

# Matches in a span exactly when some paraphrase does (an alternation of them all, same flags).
_ANY_PARAPHRASE = _any_of(regex for _, regex, _, _ in NORMAL_PARAPHRASES)

# =====================================================================================
# Anatomy
# =====================================================================================

_LATERALITY = r"(?:left|right|bilateral|both|l|r)"
_BASE_LOCATIONS = (
    "upper lobe", "middle lobe", "lower lobe", "upper lobes", "lower lobes", "lingula", "lingular", "apex",
    "apices", "apical", "base", "bases", "basilar", "basal", "bibasilar", "bibasal", "biapical", "perihilar",
    "hilar", "hilum", "hila", "retrocardiac", "mid lung", "midlung", "upper lung", "lower lung", "upper zone",
    "lower zone", "mid zone", "upper lungs", "lower lungs", "costophrenic angle", "costophrenic angles",
    "hemithorax", "hemidiaphragm", "chest wall", "fissure", "rib", "ribs", "clavicle", "spine", "scapula",
    "humerus", "svc", "cavoatrial junction", "atrium", "ventricle", "stomach", "carina",
)


@lru_cache(maxsize=1)
def _anatomy_regex() -> re.Pattern[str]:
    terms = set(_BASE_LOCATIONS)
    try:
        knowledge = yaml.safe_load(KNOWLEDGE_MAP.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        knowledge = {}
    for entry in knowledge.values():
        if isinstance(entry, dict):
            for term in entry.get("anatomy", []) or []:
                t = str(term).lower().strip()
                if t and t not in ("heart", "cardiac silhouette", "lungs", "pleura"):
                    terms.update({t, t + "s", t[:-1] if t.endswith("s") else t})
    alternation = "|".join(sorted((re.escape(t) for t in terms), key=len, reverse=True))
    return re.compile(rf"\b(?:{_LATERALITY}[\s-]+(?:(?:sided|side)\s+)?(?:[a-z0-9]+\s+)?)?(?:{alternation})\b"
                      rf"|\b(?:left|right|bilateral|bilaterally)\b")


# =====================================================================================
# Status resolution
# =====================================================================================

def _lower(text: str) -> str:
    """Lower case with the same length, so offsets stay valid (a few characters, e.g. 'İ',
    lower-case to two)."""
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(c if len(c.lower()) != 1 else c.lower() for c in text)


_ODD_WHITESPACE = re.compile(r"\s{2,}|[^\S ]")  # any whitespace but a lone space
# Typographic apostrophes read as the plain one ("isn’t" is "isn't"): one character for one, so offsets hold.
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


class _Normalized:
    """``text`` with each whitespace run collapsed to one space ("\n\n" for a blank line),
    and the map of offsets back to ``text``.

    MIMIC wraps lines mid-sentence ("cannot be\n excluded"): spaCy makes every whitespace
    run longer than one space a token of its own, and a phrase matcher would then miss
    the cue. Matching runs on the collapsed copy; offsets are mapped back at the end.
    """

    __slots__ = ("text", "_ends", "_shifts")

    def __init__(self, original: str):
        self._ends: list[int] = []  # collapsed offset where a shrunken run ends
        self._shifts: list[int] = []  # original - collapsed offset from there on
        parts: list[str] = []
        last = 0
        shift = 0
        for m in _ODD_WHITESPACE.finditer(original):
            run = m.group()
            replacement = "\n\n" if run.count("\n") >= 2 else " "
            parts.append(original[last:m.start()])
            parts.append(replacement)
            last = m.end()
            if len(run) != len(replacement):
                self._ends.append(m.start() - shift + len(replacement))
                shift += len(run) - len(replacement)
                self._shifts.append(shift)
        if not parts:
            self.text = original.translate(_QUOTES)
            return
        parts.append(original[last:])
        self.text = "".join(parts).translate(_QUOTES)

    def start(self, pos: int) -> int:
        """Original offset of a collapsed start offset."""
        i = bisect.bisect_right(self._ends, pos) - 1
        return pos + (self._shifts[i] if i >= 0 else 0)

    def end(self, pos: int) -> int:
        """Original offset of a collapsed end (exclusive) offset."""
        return self.start(pos - 1) + 1 if pos > 0 else 0


def _within_words(low: str, a: int, b: int, limit: int) -> bool:
    """Are there at most ``limit`` words in low[a:b]? A long span stops being read after
    ``limit + 1`` words, so a cue far from a mention in a very long sentence costs no more than
    a near one."""
    if b - a <= 256:  # the usual case: a short span, split at C speed
        return len(low[a:b].split()) <= limit
    return sum(1 for _ in itertools.islice(_WORD.finditer(low, a, b), limit + 1)) <= limit


_WORD = re.compile(r"\S+")


def _blocked(low: str, a: int, b: int, terms: Sequence[int], commas_ok: bool, list_end: int | None = None) -> bool:
    """Does a terminator start in [a, b), or a comma that this scope may not cross?

    A scope that may cross commas (a list head such as "no" or "concerning for") still stops
    at a comma that opens a new assertion, unless the list is coordinated by "or"/"nor" before
    ``list_end`` (see ``_list_continues``).
    """
    i = bisect.bisect_left(terms, a)
    if i < len(terms) and terms[i] < b:
        return True
    comma = low.find(",", a, b)
    if comma == -1:
        return False
    if not commas_ok:
        return True
    return not _list_continues(low, comma, b, b if list_end is None else list_end)


def _list_continues(low: str, first: int, b: int, list_end: int) -> bool:
    """Is the text from a cue to ``b``, whose first comma is at ``first``, one coordinated list,
    so that the cue still reads the item at ``b``?

    "no consolidation, large effusion, or pneumothorax": yes, the list ends in "or".
    "no pneumothorax, small left effusion": no, "small" after the comma opens a new
    assertion; so do "the ...", "there ..." and an item with its own verb ("no effusion,
    heart is enlarged"). Without such an opener, a plain list continues ("no effusion,
    consolidation and pneumothorax").
    """
    if _DISJUNCTION_RE.search(low, first, max(list_end, b)):
        return True
    k = first
    while k != -1:
        nxt = low.find(",", k + 1, b)
        item = low[k + 1: nxt if nxt != -1 else b].split()
        if item and item[0] in ("and", "or", "nor"):
            item = item[1:]
        if item and (item[0] in _NEW_ITEM_WORDS or _VERB_RE.search(" ".join(item))):
            return False
        k = nxt
    return True


@dataclass(frozen=True, slots=True)
class _Decision:
    status: Status
    cue: str | None
    hedged: bool  # a cue (not only the default) decided it


class _SentenceCues:
    """The cues of one sentence (sorted by start): which one is nearest before or after a mention.
    Scans the list; ``_IndexedCues`` answers the same by bisection for long cue lists."""

    def __init__(self, cues: Sequence[_Cue]) -> None:
        self.cues = cues

    def before(self, start: int) -> int:
        """Index of the last non-terminator cue among those before the first cue that ends after
        ``start``; -1 when there is none."""
        found = -1
        for i, c in enumerate(self.cues):
            if c.end > start:
                break
            if c.rule.kind != "termination":
                found = i
        return found

    def after(self, end: int) -> int:
        """Index of the first non-terminator cue starting at or after ``end``; len(cues) when none."""
        for i, c in enumerate(self.cues):
            if c.start >= end and c.rule.kind != "termination":
                return i
        return len(self.cues)


class _IndexedCues(_SentenceCues):
    """``_SentenceCues`` by bisection, for a sentence with many cues (a pasted report without full
    stops): n mentions cost n log n instead of n squared. 900 KB as one sentence: 0.9 s, was 16 s."""

    def __init__(self, cues: Sequence[_Cue]) -> None:
        super().__init__(cues)
        self.starts = [c.start for c in cues]
        # running maximum of the ends: the first cue ending after a position is found by bisection
        self.max_ends = list(itertools.accumulate((c.end for c in cues), max))
        last, self.last_scope = -1, []  # index of the last non-terminator cue at or before i
        for i, c in enumerate(cues):
            if c.rule.kind != "termination":
                last = i
            self.last_scope.append(last)
        nxt, self.next_scope = len(cues), [0] * (len(cues) + 1)  # first non-terminator cue at or after i
        self.next_scope[len(cues)] = nxt
        for i in range(len(cues) - 1, -1, -1):
            if cues[i].rule.kind != "termination":
                nxt = i
            self.next_scope[i] = nxt

    def before(self, start: int) -> int:
        first_past = bisect.bisect_right(self.max_ends, start)
        return self.last_scope[first_past - 1] if first_past > 0 else -1

    def after(self, end: int) -> int:
        return self.next_scope[bisect.bisect_left(self.starts, end)]


def sentence_cues(cues: Sequence[_Cue]) -> _SentenceCues:
    return _IndexedCues(cues) if len(cues) > 32 else _SentenceCues(cues)


HYPOTHETICAL = "hypothetical"  # a _Decision status: the mention makes no claim and is dropped


def _resolve(low: str, start: int, end: int, sent: _SentenceCues, terms: Sequence[int],
             sentence_end: int | None = None) -> _Decision:
    """Status of the mention low[start:end] from the cues of its sentence.

    The nearest cue on each side decides (a farther cue is shadowed by a nearer one of any
    kind); it applies when the mention lies inside its window and no terminator (nor, for
    comma-bound cues, a comma; nor, for list heads, a comma that opens a new assertion)
    separates them. A hypothetical or definitional cue beats everything (no claim is made);
    then uncertainty beats negation.
    """
    cues = sent.cues
    j = bisect.bisect_left(terms, end)
    list_end = terms[j] if j < len(terms) else (len(low) if sentence_end is None else sentence_end)
    pre_index = sent.before(start)
    pre_hit: _Cue | None = None
    # The nearest cue before the mention decides; a nearer hedge whose short window does not
    # reach the mention lets a farther list head decide ("may represent atelectasis versus
    # edema or an atypical infectious process": "versus" is too far, "may represent" reaches).
    for _ in range(3):
        if pre_index < 0:
            break
        pre = cues[pre_index]
        if pre.rule.kind == "termination":
            break
        if not pre.rule.pre or _blocked(low, pre.end, start, terms, pre.rule.pre_commas, list_end):
            break
        if _within_words(low, pre.end, start, pre.rule.pre):
            pre_hit = pre
            if pre.rule.kind in ("uncertainty", "affirm"):
                pre_hit = _absorbing_negation(low, start, cues, pre_index, terms, list_end) or pre
            break
        if pre.rule.kind not in ("uncertainty", "negation"):
            break
        pre_index -= 1
    post_hit: _Cue | None = None
    post_index = sent.after(end)
    if post_index < len(cues):
        c = cues[post_index]
        if (c.rule.post and _within_words(low, end, c.start, c.rule.post)
                and not _blocked(low, end, c.start, terms, c.rule.post_commas, c.start)):
            post_hit = c
    hits = [h for h in (pre_hit, post_hit) if h is not None]
    for kind, status in (("hypothetical", HYPOTHETICAL), ("uncertainty", "uncertain"), ("negation", "absent")):
        for h in hits:
            if h.rule.kind == kind:
                return _Decision(status, re.sub(r"\s+", " ", low[h.start:h.end]), True)  # type: ignore[arg-type]
    return _Decision("present", None, bool(hits))


def _absorbing_negation(low: str, start: int, cues: Sequence[_Cue], inner_index: int,
                        terms: Sequence[int], list_end: int) -> _Cue | None:
    """A negation list head before ``cues[inner_index]`` whose scope reaches the mention:
    "no consolidation to suggest pneumonia", "no consolidation, suspicious opacity, or
    pneumothorax" (a hedge word inside a negated list is part of the list)."""
    for i in range(inner_index - 1, -1, -1):
        c = cues[i]
        if c.rule.kind == "negation" and c.rule.pre >= _ANY:
            if _blocked(low, c.end, start, terms, True, list_end):
                return None
            return c
        if c.rule.kind in ("negation", "pseudo", "hypothetical"):
            return None  # another hedge may sit between ("no line to suggest X or blunting to suggest Y")
    return None


def _clause(low: str, s0: int, s1: int, start: int, end: int, terms: Sequence[int],
            term_ends: Sequence[int]) -> tuple[int, int]:
    """The part of the sentence around a mention between commas and terminators."""
    left = max(s0, low.rfind(",", s0, start) + 1)
    i = bisect.bisect_left(term_ends, start + 1) - 1
    if i >= 0 and term_ends[i] > left:
        left = term_ends[i]
    right = low.find(",", end, s1)
    right = s1 if right == -1 else right
    j = bisect.bisect_left(terms, end)
    if j < len(terms) and terms[j] < right:
        right = terms[j]
    return left, right


_PREPOSITION = re.compile(r"\b(?:in|at|of|within|over|along|involving|near|adjacent to|above|below|"
                          r"overlying|projecting over|throughout|from|into|to)\b")


def _anatomy(low: str, left: int, right: int, start: int, end: int,
             mentions: Sequence[tuple[int, int]] = ()) -> str | None:
    """The location nearest the mention inside its clause; words that are themselves a
    mention ("mediastinum" in "normal heart size and unremarkable mediastinum") do not count."""
    best: tuple[int, str] | None = None
    for m in _anatomy_regex().finditer(low, left, right):
        a, b = m.span()
        if (a < end and b > start) or any(a < q and b > p for p, q in mentions):
            continue
        if a >= end and not _PREPOSITION.search(low, end, a):
            continue  # after the mention only as a prepositional phrase: "opacity in the left lobe"
        distance = start - b if b <= start else a - end
        candidate = (distance, re.sub(r"\s+", " ", m.group()).strip())
        # Prefer a location ("left lower lobe") over a bare side ("left") at similar distance.
        if best is None or candidate[0] < best[0] or (" " in candidate[1] and " " not in best[1]
                                                        and candidate[0] <= best[0] + 20):
            best = candidate
    return best[1] if best else None


# =====================================================================================
# Extraction
# =====================================================================================

_NEGATED_PREFIX = re.compile(r"(?:\bun|\bnon[\s-]?)$")


def _raw_hits(low: str, lex: _Lexicon) -> list[tuple[int, int, _Phrase]]:
    n = len(low)
    hits = []
    for m in lex.regex.finditer(low):
        p = m.start()
        for core in lex.prefixes[m.group(1)]:
            q = p + len(core)
            for ph in lex.phrases[core]:
                if ph.left_boundary and p > 0 and low[p - 1].isalnum():
                    continue
                if ph.right_boundary and q < n and low[q].isalnum():
                    continue
                hits.append((p, q, ph))
    return hits


def _mention_spans(low: str, lex: _Lexicon) -> list[tuple[int, int, _Phrase]]:
    """Mentions minus unmention overlaps, one per overlapping group of an observation."""
    hits = _raw_hits(low, lex)
    exclusions: dict[str, list[tuple[int, int]]] = {}
    for p, q, ph in hits:
        if ph.exclusion and not _NEGATED_PREFIX.search(low, max(0, p - 4), p):
            # "calcified nodule" is excluded, "noncalcified nodule" is not
            exclusions.setdefault(ph.observation, []).append((p, q))
    kept: list[tuple[int, int, _Phrase]] = []
    for p, q, ph in sorted((h for h in hits if not h[2].exclusion), key=lambda h: (h[2].observation, h[0], -h[1])):
        if any(p < xq and q > xp for xp, xq in exclusions.get(ph.observation, ())):
            continue
        if kept and kept[-1][2].observation == ph.observation and p < kept[-1][1]:
            prev = kept[-1]
            if q - p > prev[1] - prev[0]:  # overlapping phrases of one observation: keep the longer
                kept[-1] = (p, q, ph)
            continue
        kept.append((p, q, ph))
    kept.sort(key=lambda h: (h[0], h[1]))
    # Report whole words: "atelecta" matched in "atelectasis" is reported as "atelectasis".
    n = len(low)
    out = []
    for p, q, ph in kept:
        while q < n and low[q].isalnum():
            q += 1
        out.append((p, q, ph))
    return out


# Observations a chest report can also use for other body parts (combined studies: "Right
# elbow: no fracture or joint effusion"); a clause naming a non-chest part is not about the chest.
_CHEST_ONLY = frozenset({"Edema", "Pleural Effusion", "Fracture", "Lung Lesion", "Consolidation", "Pneumonia"})
_NON_CHEST_RE = re.compile(
    r"\b(?:ankles?|knees?|feet|foot|legs?|extremit(?:y|ies)|hands?|wrists?|elbows?|forearms?|fingers?|toes?|"
    r"hips?|pelvi[sc]|femurs?|femoral|tibia[l]?|fibula[r]?|skull|facial|scalp|calf|thigh|heel|calcane\w*|"
    r"patell\w*|olecranon|radius|ulna|metacarpal\w*|metatarsal\w*|phalan\w*|malleol\w*|orbit\w*|"
    r"mandib\w*|cervical spine|lumbar spine|kidneys?|renal|liver|hepatic|brain|cerebral|bowel)\b")
_HEADING_BEFORE = re.compile(r"[\s*#_\-\d.)(]*")
_HEADING_AFTER = re.compile(r"[a-z]*[\s*_]*:")


def _is_heading(low: str, s0: int, start: int, end: int) -> bool:
    """Is the mention a heading: only markup or numbering before it in its sentence, a colon after?"""
    return bool(_HEADING_BEFORE.fullmatch(low, s0, start) and _HEADING_AFTER.match(low, end))


@dataclass(slots=True)
class _Candidate:
    phrase: _Phrase
    start: int
    end: int
    decision: _Decision
    clause: tuple[int, int]


def _disjunctions(low: str, candidates: list[_Candidate]) -> None:
    """"A or B": two different, unhedged observations on either side of "or" -> uncertain."""
    for a, b in zip(candidates, candidates[1:]):
        if a.phrase.observation == b.phrase.observation or a.decision.hedged or b.decision.hedged:
            continue
        if _OR_GAP.fullmatch(low, a.end, b.start):
            a.decision = b.decision = _Decision("uncertain", "or", True)


_OR_GAP = re.compile(r"\s*,?\s*(?:and/)?or\s+(?:[a-z-]+\s+){0,2}")


def _extract(original: str, norm: _Normalized, doc: Doc, base_offset: int, expand_normals: bool,
             with_anatomy: bool = True) -> list[Mention]:
    """Mentions of ``original``; ``doc`` is spaCy's parse of ``norm.text`` (collapsed spaces)."""
    text = norm.text
    low = _lower(text)
    spans = _mention_spans(low, _lexicon(expand_normals))
    if not spans and not expand_normals:
        return []
    sentences = _sentences(doc, text)
    cues = _cues(doc, _pipeline())
    cue_starts = [c.start for c in cues]
    sent_starts = [s for s, _ in sentences]
    by_sentence: dict[int, list[tuple[int, int, _Phrase]]] = {}
    for p, q, ph in spans:
        k = bisect.bisect_right(sent_starts, p) - 1
        if k >= 0 and p < sentences[k][1]:
            by_sentence.setdefault(k, []).append((p, q, ph))
    out: list[Mention] = []
    for k, (s0, s1) in enumerate(sentences):
        items = by_sentence.get(k, ())
        if not items and not expand_normals:
            continue
        sent_cues = cues[bisect.bisect_left(cue_starts, s0):bisect.bisect_left(cue_starts, s1)]
        terms = [c.start for c in sent_cues if c.rule.kind == "termination"]
        term_ends = sorted(c.end for c in sent_cues if c.rule.kind == "termination")
        indexed = sentence_cues(sent_cues)
        candidates: list[_Candidate] = []
        for p, q, ph in items:
            decision = _resolve(low, p, q, indexed, terms, s1)
            if decision.status == HYPOTHETICAL:
                continue  # "CT is more sensitive in detecting small nodules": no claim
            clause = _clause(low, s0, s1, p, q, terms, term_ends)
            if ph.descriptor and decision.status == "present" and not _ENLARGEMENT_RE.search(low, *clause):
                continue  # "the heart size is stable" names no abnormality
            if decision.cue is None and _is_heading(low, s0, p, q):
                continue  # "**Pneumothorax**:" names a topic, not a finding
            if ph.observation in _CHEST_ONLY and _NON_CHEST_RE.search(low, *clause):
                continue  # "soft tissue edema of the ankle", "right knee effusion"
            candidates.append(_Candidate(ph, p, q, decision, clause))
        _disjunctions(low, candidates)
        o0, o1 = norm.start(s0), norm.end(s1)
        sentence = original[o0:o1]
        taken = [(c.start, c.end) for c in candidates]
        for i, c in enumerate(candidates):
            p, q = norm.start(c.start), norm.end(c.end)
            out.append(Mention(
                observation=c.phrase.observation, status=c.decision.status, start=p + base_offset,
                end=q + base_offset, phrase=original[p:q], sentence_start=o0 + base_offset,
                sentence_end=o1 + base_offset, sentence=sentence, cue=c.decision.cue,
                anatomy=_anatomy(low, *_own_window(candidates, i), c.start, c.end, taken) if with_anatomy else None))
        if expand_normals:
            named = {c.phrase.observation for c in candidates}
            out.extend(_paraphrases(original, norm, low, s0, s1, named, base_offset))
    out.sort(key=lambda m: (m.start, m.observation))
    return out


def _own_window(candidates: list[_Candidate], i: int) -> tuple[int, int]:
    """A mention's clause, cut at neighbouring mentions of other observations, so that
    "mild edema and small bilateral effusions" does not give the edema "bilateral"."""
    c = candidates[i]
    left, right = c.clause
    for other in reversed(candidates[:i]):
        if other.phrase.observation != c.phrase.observation:
            left = max(left, other.end)
            break
    for other in candidates[i + 1:]:
        if other.phrase.observation != c.phrase.observation:
            right = min(right, other.start)
            break
    return left, right


def _paraphrases(original: str, norm: _Normalized, low: str, s0: int, s1: int, named: set[str],
                 base_offset: int) -> list[Mention]:
    if not _ANY_PARAPHRASE.search(low, s0, s1):
        return []  # most sentences state no normal paraphrase: one scan instead of one per paraphrase
    out = []
    seen = set(named)
    o0, o1 = norm.start(s0), norm.end(s1)
    for name, regex, observations, status in NORMAL_PARAPHRASES:
        for m in regex.finditer(low, s0, s1):
            for obs in observations:
                if obs in seen:
                    continue
                seen.add(obs)
                p, q = norm.start(m.start()), norm.end(m.end())
                out.append(Mention(
                    observation=obs, status=status, start=p + base_offset, end=q + base_offset,
                    phrase=original[p:q], sentence_start=o0 + base_offset, sentence_end=o1 + base_offset,
                    sentence=original[o0:o1], cue=f"paraphrase: {name}"))
    return out


def find_mentions(text: str, *, base_offset: int = 0, expand_normals: bool = False,
                  with_anatomy: bool = True) -> list[Mention]:
    """Every finding mention in ``text``, in text order.

    Offsets (phrase and sentence) index ``text`` plus ``base_offset``, so a caller that
    passes one section of a report gets offsets into the whole report. Never raises on
    odd input: anything that is not a non-empty string yields []. ``with_anatomy=False``
    skips the anatomy lookup (the labeler does not need it; it costs a third of the time).
    """
    if not isinstance(text, str) or not text.strip():
        return []
    norm = _Normalized(text)
    return _extract(text, norm, _pipeline().nlp(norm.text), base_offset, expand_normals, with_anatomy)


def find_mentions_in_spans(text: str, spans: Sequence[tuple[int, int]], *,
                           expand_normals: bool = False, with_anatomy: bool = True) -> list[Mention]:
    """Mentions of several spans of one text (e.g. a report's FINDINGS and IMPRESSION),
    with offsets into ``text``."""
    return next(iter_mentions_in_spans([(text, spans)], expand_normals=expand_normals, with_anatomy=with_anatomy))


def iter_mentions_in_spans(items: Iterable[tuple[str, Sequence[tuple[int, int]]]], *,
                           expand_normals: bool = False, with_anatomy: bool = True,
                           chunk: int = 256) -> Iterator[list[Mention]]:
    """For each (text, spans) in order: the mentions of all its spans, offsets into text.

    Spans of many texts go through ``nlp.pipe`` together, ``chunk`` texts at a time.
    Out-of-range spans are clipped; a non-string text yields [].
    """
    nlp = _pipeline().nlp
    batch: list[tuple[str, Sequence[tuple[int, int]]]] = []

    def flush() -> Iterator[list[Mention]]:
        pieces: list[tuple[str, tuple[int, int]]] = []
        for index, (text, spans) in enumerate(batch):
            for s, e in _clipped(text, spans):
                piece = text[s:e]
                if piece.strip():
                    norm = _Normalized(piece)
                    pieces.append((norm.text, (index, s, piece, norm)))
        results: list[list[Mention]] = [[] for _ in batch]
        for doc, (index, offset, piece, norm) in nlp.pipe(pieces, as_tuples=True):
            results[index].extend(_extract(piece, norm, doc, offset, expand_normals, with_anatomy))
        batch.clear()
        yield from results

    for item in items:
        batch.append(item)
        if len(batch) >= chunk:
            yield from flush()
    if batch:
        yield from flush()


def _clipped(text: object, spans: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
    if not isinstance(text, str) or not spans:
        return []
    out = []
    for s, e in spans:
        try:
            s, e = max(0, int(s)), min(len(text), int(e))
        except (TypeError, ValueError):
            continue
        if e > s:
            out.append((s, e))
    return out


def findings_of(mentions: Iterable[Mention], observations: Iterable[str] | None = None) -> dict[str, Status]:
    """One status per observation: present beats uncertain beats absent (CheXpert order)."""
    wanted = set(observations) if observations is not None else None
    out: dict[str, Status] = {}
    for m in mentions:
        if wanted is not None and m.observation not in wanted:
            continue
        if m.observation not in out or STATUS_RANK[m.status] > STATUS_RANK[out[m.observation]]:
            out[m.observation] = m.status
    return out


def status_of_span(text: str, start: int, end: int) -> Status | None:
    """The status the reader gives the target ``text[start:end]`` (any phrase, not only the
    lexicon's): the same cues, scopes and lists as for mentions. None when the target sits in a
    hypothetical or definitional statement (no claim). Used to read a condition a caller names
    (NegEx-style evaluation, a check of a quote about a given finding)."""
    return statuses_of_spans([(text, start, end)])[0]


def statuses_of_spans(items: Iterable[tuple[str, int, int]], *, chunk: int = 512) -> list[Status | None]:
    """``status_of_span`` for many (text, start, end), parsed with ``nlp.pipe`` in chunks."""
    items = list(items)
    for text, start, end in items:
        if not isinstance(text, str) or not (0 <= start < end <= len(text)):
            raise ValueError(f"span ({start}, {end}) is not inside a text of "
                             f"{len(text) if isinstance(text, str) else 0} characters")
    pipe = _pipeline()
    out: list[Status | None] = []
    for k in range(0, len(items), chunk):
        part = items[k:k + chunk]
        norms = [_Normalized(text) for text, _, _ in part]
        for (text, start, end), norm, doc in zip(part, norms, pipe.nlp.pipe(n.text for n in norms)):
            out.append(_status_in_doc(norm, doc, start, end))
    return out


def _status_in_doc(norm: _Normalized, doc: Doc, start: int, end: int) -> Status | None:
    n_start = _collapsed_offset(norm, start)
    n_end = max(n_start + 1, _collapsed_offset(norm, end - 1) + 1)
    low = _lower(norm.text)
    sentences = _sentences(doc, norm.text) or [(0, len(norm.text))]
    s0, s1 = next(((a, b) for a, b in sentences if a <= n_start < b), (0, len(norm.text)))
    cues = [c for c in _cues(doc, _pipeline()) if s0 <= c.start < s1
            and not (c.start < n_end and c.end > n_start)]  # a cue inside the target is part of it
    terms = [c.start for c in cues if c.rule.kind == "termination"]
    decision = _resolve(low, n_start, n_end, sentence_cues(cues), terms, s1)
    return None if decision.status == HYPOTHETICAL else decision.status  # type: ignore[return-value]


def _collapsed_offset(norm: _Normalized, original: int) -> int:
    """Inverse of ``_Normalized.start``: the collapsed offset of an original offset."""
    lo, hi = 0, len(norm.text)
    while lo < hi:
        mid = (lo + hi) // 2
        if norm.start(mid) < original:
            lo = mid + 1
        else:
            hi = mid
    return min(lo, max(0, len(norm.text) - 1))
