"""Compare labeler output with gold labels: per-observation scores and exact matches.

Values are CheXpert's four: positive, negative, uncertain, not_mentioned. Per
observation we report precision / recall / F1 of positive labels (the figure CheXpert
papers quote), F1 of negative and of uncertain labels (agreement on the other
mentioned values), and plain agreement over all four values. A study is an exact match
when every shared observation agrees. Observations are compared only where the gold
table has them (a gold set with another vocabulary is mapped through aliases first).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl

from extractors.chexpert_csv import (
    LabelTableError,
    alias_columns,
    normalize_study_id,
    read_chexpert_csv,
    read_table,
    to_long,
)
from extractors.labeler import label_reports
from extractors.sections import parse_sections
from schemas.labels import OBSERVATIONS

TEXT_COLUMN_GUESSES = ("text", "report", "reports", "report_text", "findings_impression")
ROW_ID = "_row"  # id used when a table has no id column: the 1-based row number
Labels = Mapping[str, Mapping[str, str]]  # study_id -> observation -> value


@dataclass
class ObservationScore:
    observation: str
    studies: int
    gold_positive: int
    predicted_positive: int
    true_positive: int
    precision: float | None
    recall: float | None
    f1: float | None
    negative_f1: float | None
    uncertain_f1: float | None
    agreement: float | None


@dataclass
class Mismatch:
    study_id: str
    observation: str
    gold: str
    predicted: str
    sentence: str | None = None


@dataclass
class EvalResult:
    studies: int
    observations: list[str]
    scores: list[ObservationScore]
    exact_matches: int
    missing_predictions: int = 0  # gold studies the labeler had no report for
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def exact_match_rate(self) -> float | None:
        return self.exact_matches / self.studies if self.studies else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exact_match_rate"] = self.exact_match_rate
        return d


def _f1(tp: int, predicted: int, gold: int) -> tuple[float | None, float | None, float | None]:
    precision = tp / predicted if predicted else None
    recall = tp / gold if gold else None
    if precision is None or recall is None:
        f1 = None if predicted == 0 and gold == 0 else 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def evaluate(predicted: Labels, gold: Labels, *, observations: Sequence[str] | None = None,
             sentences: Mapping[str, Mapping[str, str | None]] | None = None,
             max_mismatches: int = 50, positive_only: bool = False) -> EvalResult:
    """Score ``predicted`` against ``gold`` on the studies in gold.

    ``observations`` defaults to those the gold labels carry. A gold study with no
    prediction counts as all not_mentioned and is counted in ``missing_predictions``.
    ``positive_only`` (a gold set that annotates positives only): a study agrees on an
    observation when both or neither call it positive; negative/uncertain F1 are not scored.
    """
    if positive_only:
        predicted = {sid: {o: ("positive" if v == "positive" else "not_mentioned") for o, v in labels.items()}
                     for sid, labels in predicted.items()}
        gold = {sid: {o: ("positive" if v == "positive" else "not_mentioned") for o, v in labels.items()}
                for sid, labels in gold.items()}
    if observations is None:
        seen = {o for labels in gold.values() for o in labels}
        observations = [o for o in OBSERVATIONS if o in seen]
    ids = sorted(gold)
    scores = []
    exact = {sid: True for sid in ids}
    mismatches: list[Mismatch] = []
    for o in observations:
        counts = {v: [0, 0, 0] for v in ("positive", "negative", "uncertain")}  # tp, predicted, gold
        agree = 0
        for sid in ids:
            g = gold[sid].get(o, "not_mentioned")
            p = predicted.get(sid, {}).get(o, "not_mentioned")
            for v, c in counts.items():
                c[0] += g == v and p == v
                c[1] += p == v
                c[2] += g == v
            if g == p:
                agree += 1
            else:
                exact[sid] = False
                if len(mismatches) < max_mismatches:
                    sentence = (sentences or {}).get(sid, {}).get(o)
                    mismatches.append(Mismatch(sid, o, g, p, sentence))
        precision, recall, f1 = _f1(*counts["positive"])
        scores.append(ObservationScore(
            observation=o, studies=len(ids), gold_positive=counts["positive"][2],
            predicted_positive=counts["positive"][1], true_positive=counts["positive"][0],
            precision=precision, recall=recall, f1=f1, negative_f1=_f1(*counts["negative"])[2],
            uncertain_f1=_f1(*counts["uncertain"])[2], agreement=agree / len(ids) if ids else None))
    return EvalResult(
        studies=len(ids), observations=list(observations), scores=scores,
        exact_matches=sum(exact.values()), missing_predictions=sum(1 for sid in ids if sid not in predicted),
        mismatches=mismatches)


# ---- building the two sides ------------------------------------------------------------

def long_to_labels(long: pl.DataFrame) -> dict[str, dict[str, str]]:
    """(study_id, observation, value) rows -> study_id -> observation -> value."""
    out: dict[str, dict[str, str]] = {}
    for sid, o, v in long.select("study_id", "observation", "value").iter_rows():
        out.setdefault(sid, {})[o] = v
    return out


def sections_for_labeling(text: str) -> list[tuple[str, int, int]] | None:
    """The report's sections when it has FINDINGS/IMPRESSION (headed or inferred from
    paragraphs, as the ingest stage stores them); None (= whole text) otherwise."""
    secs = parse_sections(text) if isinstance(text, str) else []
    if any(s.name in ("findings", "impression") for s in secs):
        return [(s.name, s.start, s.end) for s in secs]
    return None


def predict(reports: Iterable[tuple[str, str]]) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str | None]]]:
    """Label (study_id, text) pairs: values and deciding sentences per study."""
    reports = list(reports)
    labels = label_reports([(text, sections_for_labeling(text)) for _, text in reports])
    values = {sid: {o: e.value for o, e in lab.items()} for (sid, _), lab in zip(reports, labels)}
    sentences = {sid: {o: e.sentence for o, e in lab.items()} for (sid, _), lab in zip(reports, labels)}
    return values, sentences


def guess_text_column(columns: Sequence[str]) -> str | None:
    lowered = {c.lower(): c for c in columns}
    for guess in TEXT_COLUMN_GUESSES:
        if guess in lowered:
            return lowered[guess]
    return None


def read_reports(path: Path | str, *, text_col: str | None = None,
                 id_col: str | None = None) -> tuple[list[tuple[str, str]], pl.DataFrame]:
    """(study_id, text) pairs from a CSV / Parquet / JSONL table, plus the table itself.

    ``text_col`` is guessed ("text", "report", "Reports" ...) when not given; ``id_col``
    defaults to study_id when present, else ids are 1-based row numbers.
    """
    df = read_table(path)
    text_col = text_col or guess_text_column(df.columns)
    if text_col is None or text_col not in df.columns:
        raise LabelTableError(
            f"{path}: text column {text_col!r} not found; columns: {', '.join(df.columns)} (use --text-col)")
    ids = _ids(df, id_col, path)
    texts = [t if isinstance(t, str) else "" for t in df.get_column(text_col).to_list()]
    return list(zip(ids, texts)), df


def _ids(df: pl.DataFrame, id_col: str | None, path: Path | str) -> list[str]:
    if id_col is None and "study_id" in df.columns:
        id_col = "study_id"
    if id_col is None:
        return [str(i + 1) for i in range(df.height)]
    if id_col not in df.columns:
        raise LabelTableError(f"{path}: id column {id_col!r} not found; columns: {', '.join(df.columns)}")
    return [normalize_study_id(v) or f"{ROW_ID}{i + 1}" for i, v in enumerate(df.get_column(id_col).to_list())]


GOLD_ZERO_MODES = ("negative", "unannotated")
_VALUE_RANK = {"positive": 3, "uncertain": 2, "negative": 1, "not_mentioned": 0}


def gold_from_table(df: pl.DataFrame, *, id_col: str | None, aliases: Mapping[str, str] | None,
                    path: Path | str, gold_zero: str = "negative",
                    unmapped: list[str] | None = None) -> dict[str, dict[str, str]]:
    """Gold labels from a wide table; ids as in ``read_reports`` (row numbers without an id column).

    Several columns may map to one observation: the observation takes the strongest value of
    its columns (positive > uncertain > negative > blank), so any mapped column positive makes
    it positive. ``gold_zero="unannotated"`` reads 0 as "not annotated" (Open-i, ChestX-ray14:
    only positives are annotated) instead of "negative". Columns that map to no observation
    are appended to ``unmapped`` when given.
    """
    if gold_zero not in GOLD_ZERO_MODES:
        raise LabelTableError(f"gold_zero must be one of {', '.join(GOLD_ZERO_MODES)}, not {gold_zero!r}")
    label_cols = [c for c in df.columns if c != id_col]
    mapped, nothing = alias_columns(label_cols, aliases)
    if unmapped is not None:
        unmapped.extend(c for c in nothing if c != ROW_ID)
    if not mapped:
        raise LabelTableError(f"{path}: no gold label columns (CheXpert names or --aliases) found")
    ids = _ids(df, id_col, path)
    out: dict[str, dict[str, str]] = {sid: {} for sid in ids}
    for observation, cols in mapped.items():
        for col in cols:
            frame = pl.DataFrame({ROW_ID: ids, col: df.get_column(col)})
            for sid, _, value in to_long(frame, id_col=ROW_ID, aliases={col: observation},
                                         normalize_ids=False).iter_rows():
                if gold_zero == "unannotated" and value == "negative":
                    value = "not_mentioned"
                current = out[sid].get(observation, "not_mentioned")
                if _VALUE_RANK[value] >= _VALUE_RANK[current]:
                    out[sid][observation] = value
    return out


def warnings_for(result: EvalResult, gold: Labels, *, gold_zero: str, unmapped: Sequence[str] = ()) -> list[str]:
    """What a reader of the scores should be told: ignored gold columns, observations with no
    gold positive, and results that look like a misread gold convention."""
    out = []
    if unmapped:
        out.append(f"gold columns mapped to no CheXpert observation (ignored): {', '.join(unmapped)}; "
                   "map them with --aliases")
    for s in result.scores:
        if s.gold_positive == 0:
            out.append(f"{s.observation}: no gold positive, its P/R/F1 says nothing")
    values = {v for labels in gold.values() for v in labels.values()}
    if gold_zero == "negative" and "negative" in values and "uncertain" not in values and result.studies:
        negative_f1 = [s.negative_f1 for s in result.scores if s.negative_f1 is not None]
        if result.exact_matches == 0 or (negative_f1 and max(negative_f1) < 0.05):
            out.append("the gold has only 1 and 0 and no study matches exactly (negative F1 near 0): if 0 means "
                       "'not annotated' (Open-i, ChestX-ray14), rerun with --gold-zero unannotated")
    return out


def read_mimic_reports(root: Path | str, limit: int | None = None) -> tuple[list[tuple[str, str]], Path]:
    """(study_id, text) of a MIMIC-CXR-style tree and the path of its chexpert CSV."""
    from extractors.sources import MimicTree

    tree = MimicTree(Path(root))
    csv_path = tree.csv_path("chexpert")
    if csv_path is None:
        raise FileNotFoundError(f"no mimic-cxr-2.0.0-chexpert.csv under {root}")
    reports = []
    for rel in tree.list_reports()[: limit or None]:
        sid = normalize_study_id(Path(rel).stem) or rel
        try:
            text = (tree.root / rel).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        reports.append((sid, text))
    return reports, csv_path


def evaluate_mimic(root: Path | str, *, limit: int | None = None, max_mismatches: int = 50) -> EvalResult:
    """Label a MIMIC-style tree's reports and compare with its chexpert CSV."""
    reports, csv_path = read_mimic_reports(root, limit)
    gold = long_to_labels(read_chexpert_csv(csv_path))
    wanted = {sid for sid, _ in reports}
    gold = {sid: v for sid, v in gold.items() if sid in wanted}
    predicted, sentences = predict(reports)
    return evaluate(predicted, gold, sentences=sentences, max_mismatches=max_mismatches)
