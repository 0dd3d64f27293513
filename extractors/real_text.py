"""How well radchain reads real report language: scoring against text nobody here wrote.

Two public sets live in ``shared/data/real`` (see its README):

* **IU X-ray / Open-i** reports with Open-i's gold labels for the development half (odd
  uids). Gold ``1`` means "annotated as present" and ``0`` "not annotated" (not "absent"),
  so only positive mentions are scored: per observation precision / recall / F1 of the
  labeler's *positive* labels, their macro mean over the observations whose conventions
  agree with CheXpert's, and the micro mean over all ten that have a CheXpert counterpart.
* **NegEx's annotated sentences**: a condition, a sentence, and whether the sentence
  negates it. The reader's status for the condition's span (``status_of_span``) is
  "Negated" when absent; accuracy and Negated P/R/F1.

Open-i's annotators followed MeSH indexing, not CheXpert's rules. Where a disagreement is
explained by a documented difference of convention, ``explain_iu`` names it (the raw
scores are not changed): the labeler is built for MIMIC-CXR's CheXpert labels and is not
bent towards Open-i. The file is read as distributed (its licence forbids modified
copies): inputs are built in memory.
"""

from __future__ import annotations

import csv
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from extractors.labeler import label_reports_with_mentions
from extractors.mentions import Mention, statuses_of_spans

# Open-i column(s) -> CheXpert observation; several columns may map to one (any positive -> positive).
OPENI_TO_CHEXPERT: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("Atelectasis",),
    "Cardiomegaly": ("Cardiomegaly",),
    "Consolidation": ("Consolidation",),
    "Edema": ("Edema",),
    "Pleural Effusion": ("Effusion",),
    "Pneumonia": ("Pneumonia",),
    "Pneumothorax": ("Pneumothorax",),
    "Lung Lesion": ("Mass", "Nodule"),
    "Pleural Other": ("Pleural_Thickening",),
    "No Finding": ("normal",),
}
# The observations whose annotation conventions agree (the floors apply to these);
# Edema and Pleural Other differ by definition (vascular congestion, fibrosis) and are reported only.
AGREEING = ("Atelectasis", "Cardiomegaly", "Consolidation", "Pleural Effusion", "Pneumonia", "Pneumothorax",
            "Lung Lesion", "No Finding")

# Published figures on the full Open-i gold (Wang et al., ChestX-ray8, CVPR 2017, Table 2;
# totals over their classes, positive mentions): (precision, recall, F1).
PUBLISHED_IU = {"MetaMap + NegEx": (0.84, 0.88, 0.86), "Wang et al. 2017": (0.90, 0.91, 0.90)}
# medspaCy 1.3.1's default ConText on the NegEx sentences, measured here (real/README.md).
PUBLISHED_NEGEX_MEDSPACY = {"accuracy": 0.937, "negated_f1": 0.930}


@dataclass(frozen=True)
class IUReport:
    uid: str
    text: str  # "FINDINGS: ...\n\nIMPRESSION: ..." built in memory
    sections: tuple[tuple[str, int, int], ...]
    mesh: str  # Open-i's MeSH indexing, used only to explain disagreements


def read_iu_reports(path: Path | str, uids: Iterable[str] | None = None) -> list[IUReport]:
    """IU reports with their FINDINGS and IMPRESSION as sections (indication and comparison are
    not labeled, as in MIMIC). ``uids`` keeps only those (e.g. the gold half)."""
    wanted = set(uids) if uids is not None else None
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            uid = (row.get("uid") or "").strip()
            if wanted is not None and uid not in wanted:
                continue
            text, sections = "", []
            for name in ("findings", "impression"):
                body = (row.get(name) or "").strip()
                if body:
                    text += ("\n\n" if text else "") + f"{name.upper()}: "
                    sections.append((name, len(text), len(text) + len(body)))
                    text += body
            out.append(IUReport(uid, text, tuple(sections), row.get("MeSH") or ""))
    return out


def read_openi_gold(path: Path | str) -> dict[str, frozenset[str]]:
    """uid -> the CheXpert observations Open-i annotates as present (``filename`` is CXR<uid>)."""
    gold: dict[str, frozenset[str]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            uid = (row.get("filename") or "").removeprefix("CXR").strip()
            gold[uid] = frozenset(o for o, cols in OPENI_TO_CHEXPERT.items()
                                  if any((row.get(c) or "").strip() == "1" for c in cols))
    return gold


@dataclass
class PositiveScore:
    observation: str
    gold_positive: int
    predicted_positive: int
    true_positive: int
    conventions: dict[str, int] = field(default_factory=dict)  # disagreements a convention explains

    @property
    def precision(self) -> float:
        return self.true_positive / self.predicted_positive if self.predicted_positive else 0.0

    @property
    def recall(self) -> float:
        return self.true_positive / self.gold_positive if self.gold_positive else 0.0

    @property
    def f1(self) -> float:
        return _f1(self.true_positive, self.predicted_positive, self.gold_positive)

    @property
    def disagreements(self) -> int:
        return self.predicted_positive + self.gold_positive - 2 * self.true_positive


def _f1(tp: int, predicted: int, gold: int) -> float:
    return 2 * tp / (predicted + gold) if predicted + gold else 0.0


@dataclass
class IUResult:
    studies: int
    scores: list[PositiveScore]
    seconds: float

    def score(self, observation: str) -> PositiveScore:
        return next(s for s in self.scores if s.observation == observation)

    @property
    def macro_agreeing(self) -> float:
        return sum(self.score(o).f1 for o in AGREEING) / len(AGREEING)

    @property
    def macro_all(self) -> float:
        return sum(s.f1 for s in self.scores) / len(self.scores)

    def micro(self) -> tuple[float, float, float]:
        tp = sum(s.true_positive for s in self.scores)
        pred = sum(s.predicted_positive for s in self.scores)
        gold = sum(s.gold_positive for s in self.scores)
        return (tp / pred if pred else 0.0, tp / gold if gold else 0.0, _f1(tp, pred, gold))

    @property
    def reports_per_second(self) -> float:
        return self.studies / self.seconds if self.seconds else 0.0


def score_iu(reports: Sequence[IUReport], gold: dict[str, frozenset[str]]) -> IUResult:
    """Label the reports that have gold and score positive mentions per observation."""
    reports = [r for r in reports if r.uid in gold]
    t0 = time.perf_counter()
    labeled = label_reports_with_mentions([(r.text, list(r.sections)) for r in reports])
    seconds = time.perf_counter() - t0
    scores = []
    for o in OPENI_TO_CHEXPERT:
        s = PositiveScore(o, 0, 0, 0)
        conventions: Counter[str] = Counter()
        for r, (labels, mentions) in zip(reports, labeled):
            g = o in gold[r.uid]
            p = labels[o].value == "positive"
            s.gold_positive += g
            s.predicted_positive += p
            s.true_positive += g and p
            if g != p:
                reason = explain_iu(o, g, labels[o].value, r, mentions)
                if reason:
                    conventions[reason] += 1
        s.conventions = dict(conventions.most_common())
        scores.append(s)
    return IUResult(len(reports), scores, seconds)


# ---- conventions -----------------------------------------------------------------------

_CONGESTION = re.compile(r"congest|vascular|vascularity|venous")
_CALCIFIED_NODULE = re.compile(r"calcified\s+(?:\w+\s+){0,2}(?:nodul|granulom)|granulom", re.I)
_NODULAR_DENSITY = re.compile(r"nodular\s+(?:densit|opacit|opacification)")
_INFECTION = re.compile(r"infect")


def explain_iu(observation: str, gold: bool, predicted: str, report: IUReport,
               mentions: Sequence[Mention]) -> str | None:
    """The documented convention that explains a disagreement, or None (a reading error).

    Each reason is a difference between Open-i's MeSH indexing and CheXpert's definitions,
    checked on the phrase the labeler read (never on the gold row alone)."""
    own = [m for m in mentions if m.observation == observation and m.status == "present"]
    phrases = " ".join(m.phrase.lower() for m in own)
    mesh = report.mesh.lower()
    if gold and predicted == "uncertain":
        return "Open-i codes a hedged finding as present (CheXpert: uncertain)"
    if observation == "No Finding":
        if gold and not report.sections:
            return "no FINDINGS/IMPRESSION text (Open-i indexed the study anyway)"
        if not gold and "no indexing" in mesh:
            return "Open-i did not index the study"
        if not gold and any(m.observation == "Support Devices" and m.status == "present" for m in mentions):
            return "Open-i's normal excludes devices (CheXpert's No Finding ignores Support Devices)"
        if not gold and not _OPENI_ABNORMAL_IN_CHEXPERT.search(mesh):
            return "Open-i indexes a finding outside CheXpert's vocabulary (low volumes, aorta, spine ...)"
        return None
    if not gold and predicted == "positive":
        if observation == "Edema" and _CONGESTION.search(phrases):
            return "CheXpert counts vascular congestion as Edema"
        if observation == "Pleural Other" and "fibros" in phrases:
            return "CheXpert counts fibrosis as Pleural Other"
        if observation == "Lung Lesion" and _NODULAR_DENSITY.search(phrases):
            return "CheXpert counts a nodular density/opacity as Lung Lesion (Open-i: Density/Opacity)"
        if observation == "Pneumonia" and _INFECTION.search(phrases):
            return "CheXpert reads infection/infectious as Pneumonia"
        if observation == "Pneumothorax" and any("hydropneumothorax" in m.sentence.lower() for m in own):
            return "CheXpert counts hydropneumothorax as Pneumothorax"
        if observation == "Cardiomegaly" and "cardiac shadow" in mesh and "cardiomegaly" not in mesh:
            return "Open-i indexes an enlarged cardiac silhouette as Cardiac Shadow, not Cardiomegaly"
    if gold and predicted != "positive":
        if observation == "Lung Lesion" and _CALCIFIED_NODULE.search(report.text):
            return "CheXpert does not count calcified granulomas as Lung Lesion"
    return None


# MeSH headings of Open-i that correspond to a CheXpert observation (or its other-finding list).
_OPENI_ABNORMAL_IN_CHEXPERT = re.compile(
    r"atelecta|cardiomegaly|consolidation|edema|effusion|pneumonia|pneumothorax|nodule|mass|thickening|"
    r"opacity|infiltrate|airspace disease|emphysema|fibrosis|granulom|calcinosis|calcified|hernia|fracture|"
    r"scoliosis|kyphosis|copd|obstructive|hyperdistention|bullous|cicatrix|density|degenerative|spondylosis|"
    r"osteophyte|tortuous|atherosclerosis|deformity|diaphragm|costophrenic|markings|lucency|pulmonary artery|"
    r"hilum|mediastinum|cardiac shadow|aorta|lymph|cyst|sclerosis|osteopenia|interstitial")


# ---- NegEx sentences --------------------------------------------------------------------

@dataclass(frozen=True)
class NegExSentence:
    condition: str
    sentence: str
    negated: bool  # gold: "Negated" (else "Affirmed")


def read_negex(path: Path | str) -> list[NegExSentence]:
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader, None)
        for row in reader:
            if len(row) >= 4:
                out.append(NegExSentence(row[1], row[2], row[3].strip().lower() == "negated"))
    return out


def condition_span(item: NegExSentence) -> tuple[int, int] | None:
    """Where the condition stands in the sentence (case-insensitive), preferring an occurrence
    that is not a heading ("ALLERGIES: He has no known allergies."); None when absent."""
    low, cond = item.sentence.lower(), item.condition.lower().strip()
    if not cond:
        return None
    first = low.find(cond)
    i = first
    while i != -1 and low[i + len(cond):].lstrip().startswith(":"):
        i = low.find(cond, i + 1)
    start = i if i != -1 else first
    return None if start == -1 else (start, start + len(cond))


def radchain_negated(items: Sequence[NegExSentence]) -> list[bool]:
    """radchain's reader: negated when the condition's span reads absent (an unfound condition
    or a hypothetical statement reads as affirmed, as NegEx's two classes require)."""
    spans = [condition_span(it) for it in items]
    asked = [(it.sentence, *sp) for it, sp in zip(items, spans) if sp is not None]
    statuses = iter(statuses_of_spans(asked))
    return [sp is not None and next(statuses) == "absent" for sp in spans]


def medspacy_negated(items: Sequence[NegExSentence]) -> list[bool]:
    """medspaCy 1.3.1's default pipeline (PyRuSH sentences, target matcher, ConText) with each
    condition added as a target rule; negated when the entity over the condition is negated."""
    import medspacy
    from medspacy.ner import TargetRule

    try:  # PyRuSH logs every token at DEBUG through loguru
        from loguru import logger
        logger.disable("PyRuSH")
    except ImportError:
        pass
    nlp = medspacy.load()
    conditions = sorted({it.condition.strip() for it in items if it.condition.strip()})
    nlp.get_pipe("medspacy_target_matcher").add([TargetRule(c, "CONDITION") for c in conditions])
    out = []
    for it, doc in zip(items, nlp.pipe([it.sentence for it in items])):
        span = condition_span(it)
        negated = False
        if span is not None:
            for ent in doc.ents:
                if ent.start_char < span[1] and ent.end_char > span[0]:
                    negated = bool(ent._.is_negated)
                    break
        out.append(negated)
    return out


@dataclass
class NegExResult:
    name: str
    sentences: int
    correct: int
    tp: int
    fp: int
    fn: int
    seconds: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.sentences if self.sentences else 0.0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        return _f1(self.tp, self.tp + self.fp, self.tp + self.fn)

    @property
    def sentences_per_second(self) -> float:
        return self.sentences / self.seconds if self.seconds else 0.0


def score_negex(name: str, items: Sequence[NegExSentence],
                predict: Callable[[Sequence[NegExSentence]], list[bool]]) -> NegExResult:
    t0 = time.perf_counter()
    predicted = predict(items)
    seconds = time.perf_counter() - t0
    r = NegExResult(name, len(items), 0, 0, 0, 0, seconds)
    for it, p in zip(items, predicted):
        r.correct += p == it.negated
        r.tp += p and it.negated
        r.fp += p and not it.negated
        r.fn += it.negated and not p
    return r


# ---- verifier: evidence that reads opposite to its step ---------------------------------

_NEGATED_OPENING = re.compile(r"\s*(?:no|without|negative for|there is no|there are no)\b", re.I)


@dataclass
class PolarityResult:
    sentences: int  # IU sentences that open with a negation and name a finding
    steps: int  # observation steps built from them, claiming a named finding present
    accepted: int  # of those, steps the verifier accepted (quote read as not contradicting)

    @property
    def accepted_share(self) -> float:
        return self.accepted / self.steps if self.steps else 0.0


def verifier_polarity_on(reports: Sequence[IUReport]) -> PolarityResult:
    """For every IU sentence that opens with "No"/"Without" and names a CheXpert finding, an
    observation step claiming each finding it names *present* with that sentence as its only
    evidence (the defect the issue measured: "No focal consolidation, large pleural effusion, or
    pneumothorax is identified." quoted for "pleural effusion present"). Counts the steps
    ``check_quote_polarity`` accepts. A finding the sentence also states present elsewhere
    ("no pneumothorax, small effusion") is not claimed."""
    from extractors.chains.verify import check_quote_polarity
    from extractors.mentions import find_mentions
    from schemas.chains import Evidence, ReasoningStep, StepFinding
    from schemas.labels import OBSERVATIONS

    result = PolarityResult(0, 0, 0)
    seen: set[str] = set()
    for r in reports:
        for m in find_mentions(r.text, with_anatomy=False):
            sentence = m.sentence.strip()
            if sentence in seen or not _NEGATED_OPENING.match(sentence):
                continue
            seen.add(sentence)
            mentions = find_mentions(sentence, with_anatomy=False)
            present = {x.observation for x in mentions if x.status == "present"}
            named = sorted({x.observation for x in mentions if x.observation in OBSERVATIONS
                            and x.observation != "No Finding"} - present)
            if not named:
                continue
            result.sentences += 1
            for observation in named:
                step = ReasoningStep(kind="observation", text=f"{observation} is present.",
                                     findings=[StepFinding(observation=observation, status="present")],
                                     evidence=[Evidence(quote=sentence)])
                result.steps += 1
                result.accepted += not check_quote_polarity(0, step)
    return result
