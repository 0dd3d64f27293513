"""Temporal task: "Given a reference (prior) image and a new image, what is the progression of
{finding}?" A) stable B) worsening C) improving.

Findings: the five MS-CXR-T findings. Options keep the release's fixed order; per finding and
split the sampling takes the three labels in turn (round robin), so the letter does not give
the answer away when the data allow it.

Labels come from one of two sources:

- an MS-CXR-T-style CSV (one row per image pair, ``<finding>_progression`` columns holding
  improving / stable / worsening or blank). Its study ids are MIMIC integers; they are matched
  to warehouse study ids by their digits (a leading "s"/"p", zeros and a ".0" are ignored).
- comparison language: the sentence that decided the current study's label for the finding,
  matched against ``progression_cues`` in cxr_findings.yaml. A directional cue (improving or
  worsening) outweighs a stability cue ("persistent but increased" is worsening); both
  directions at once is ambiguous and skipped; a cue preceded in its clause by a negation
  ("no new consolidation") does not count. For a finding labelled negative only an improving
  cue ("resolved") gives a label: absent now and unchanged says nothing about progression.

Either way the prior study must exist in stg_studies, belong to the same patient and have an
image; ``image_paths`` is [prior image, current image].
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import polars as pl
import yaml

from extractors.resources import KNOWLEDGE_MAP
from extractors.tasks.common import (
    NEGATIVE, POSITIVE, RANK, StudyRef, TaskConfig, TaskOutput, make_sample, pick_rows, rng_for, round_robin_take,
)
from extractors.tasks.prepare import Corpus
from schemas.labels import OBSERVATIONS, TEMPORAL_OBSERVATIONS

TASK = "temporal"
STEM = "Given a reference (prior) image and a new image, what is the progression of {finding}?"
PROGRESSION_LABELS = ("stable", "worsening", "improving")  # option order A, B, C
CSV_NAME = "ms-cxr-t_temporal-classification.csv"
TEMPORAL_RANKS = tuple(RANK[o] for o in TEMPORAL_OBSERVATIONS)
CSV_COLUMN = {f"{o.lower().replace(' ', '_')}_progression": RANK[o] for o in TEMPORAL_OBSERVATIONS}

_DEFAULT_CUES = {
    "improving": ("improved", "improving", "decreased", "smaller", "resolving", "resolved"),
    "worsening": ("worsened", "worsening", "increased", "larger", "enlarging", "new", "progressed"),
    "stable": ("unchanged", "stable", "similar", "persistent", "no interval change"),
}
_NEGATORS = {"no", "not", "without", "neither", "nor", "never"}
_CLAUSE_BREAK = re.compile(r"[,;:.()]|\bbut\b|\bhowever\b|\balthough\b|\bwith\b", re.IGNORECASE)
_CANDIDATE_COLUMNS = ["study_id", "patient_id", "split", "image_path", "prior_study_id", "prior_image_path",
                      "obs", "label"]


# ---- comparison language -------------------------------------------------------------------

@lru_cache(maxsize=4)
def progression_cues(path: Path = KNOWLEDGE_MAP) -> dict[str, tuple[str, ...]]:
    """Cue phrases per label from the knowledge map (built-in defaults if the file lacks them)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        raw = data.get("progression_cues") or {}
        cues = {label: tuple(str(c).lower() for c in raw.get(label) or ()) for label in PROGRESSION_LABELS}
    except (OSError, yaml.YAMLError, AttributeError):
        cues = {}
    if not all(cues.get(label) for label in PROGRESSION_LABELS):
        return dict(_DEFAULT_CUES)
    return cues


def _phrase_pattern(phrases: tuple[str, ...]) -> str:
    # Longest first, so "no interval change" wins over a shorter cue inside it.
    alts = [r"\s+".join(map(re.escape, p.split())) for p in sorted(phrases, key=len, reverse=True)]
    return r"\b(?:" + "|".join(alts) + r")\b"


@lru_cache(maxsize=4)
def _compiled(cues_key: tuple[tuple[str, tuple[str, ...]], ...]) -> dict[str, re.Pattern[str]]:
    return {label: re.compile(_phrase_pattern(phrases), re.IGNORECASE) for label, phrases in cues_key}


def any_cue_regex(cues: Mapping[str, tuple[str, ...]]) -> str:
    """One case-insensitive pattern matching any cue: a cheap vectorised pre-filter."""
    return "(?i)" + _phrase_pattern(tuple(p for phrases in cues.values() for p in phrases))


def _negated(sentence: str, start: int) -> bool:
    """A negation among the last few words of the clause before the cue ("no new ...")."""
    clause = _CLAUSE_BREAK.split(sentence[:start])[-1]
    words = re.findall(r"[a-z]+", clause.lower())[-4:]
    return any(w in _NEGATORS for w in words)


def cue_labels(sentence: str, cues: Mapping[str, tuple[str, ...]] | None = None) -> set[str]:
    """Progression labels whose (non-negated) cues occur in the sentence."""
    cues = cues or progression_cues()
    patterns = _compiled(tuple((k, tuple(v)) for k, v in sorted(cues.items())))
    found = set()
    for label, pattern in patterns.items():
        if any(not _negated(sentence, m.start()) for m in pattern.finditer(sentence)):
            found.add(label)
    return found


def classify_progression(sentence: str | None, value: str, cues: Mapping[str, tuple[str, ...]] | None = None
                         ) -> tuple[str | None, str]:
    """(label, reason): the label, or None with why not (NO_SENTENCE, NO_PROGRESSION_CUE, ...)."""
    if not sentence or not sentence.strip():
        return None, "NO_SENTENCE"
    found = cue_labels(sentence, cues)
    directional = found & {"improving", "worsening"}
    if len(directional) > 1:
        return None, "AMBIGUOUS_CUE"
    if value == NEGATIVE:
        # Absent now: only "resolved"-type language says something about the change.
        return ("improving", "OK") if directional == {"improving"} else (None, "ABSENT_WITHOUT_IMPROVEMENT")
    if directional:
        return directional.pop(), "OK"
    if "stable" in found:
        return "stable", "OK"
    return None, "NO_PROGRESSION_CUE"


# ---- shared prior-study checks -----------------------------------------------------------------

def _attach_prior(pairs: pl.DataFrame, corpus: Corpus, out: TaskOutput) -> pl.DataFrame:
    """Keep pairs whose prior exists, is the same patient's and has an image; count the rest."""
    priors = corpus.studies.select(
        pl.col("study_id").alias("prior_study_id"), pl.col("patient_id").alias("prior_patient_id"),
        pl.col("image_path").alias("prior_primary_image"),
    )
    if "prior_image_path" not in pairs.columns:
        pairs = pairs.with_columns(prior_image_path=pl.lit(None, dtype=pl.String))
    joined = pairs.join(priors, on="prior_study_id", how="left").with_columns(
        prior_image_path=pl.coalesce("prior_image_path", "prior_primary_image"),
        prior_known=pl.col("prior_patient_id").is_not_null(),
    )
    no_prior = pl.col("prior_study_id").is_null()
    missing = ~no_prior & ~pl.col("prior_known")
    other_patient = pl.col("prior_known") & (pl.col("prior_patient_id") != pl.col("patient_id"))
    no_image = pl.col("prior_known") & ~other_patient & pl.col("prior_image_path").is_null()
    for reason, cond in (("NO_PRIOR", no_prior), ("PRIOR_MISSING", missing),
                         ("PRIOR_OTHER_PATIENT", other_patient), ("PRIOR_NO_IMAGE", no_image)):
        out.skip(reason, joined.filter(cond).height)
    return joined.filter(~(no_prior | missing | other_patient | no_image))


# ---- candidates from comparison language ---------------------------------------------------------

def language_candidates(corpus: Corpus, out: TaskOutput) -> pl.DataFrame:
    labelled = (
        corpus.labels.filter(pl.col("obs").is_in(list(TEMPORAL_RANKS)) & pl.col("value").is_in([POSITIVE, NEGATIVE]))
        .join(corpus.profiles.select("study_id", "patient_id", "split", "image_path", "prior_study_id"),
              on="study_id", how="inner")
    )
    with_prior = _attach_prior(labelled, corpus, out)
    with_sentence = with_prior.join(corpus.sentences, on=["study_id", "obs"], how="left")
    out.skip("NO_SENTENCE", with_sentence.filter(pl.col("sentence").is_null()).height)
    cues = progression_cues()
    has_cue = pl.col("sentence").str.contains(any_cue_regex(cues))
    out.skip("NO_PROGRESSION_CUE", with_sentence.filter(pl.col("sentence").is_not_null() & ~has_cue).height)
    cued = with_sentence.filter(pl.col("sentence").is_not_null() & has_cue)
    # Python only over distinct (sentence, value) pairs; report language repeats a lot.
    distinct = cued.select("sentence", "value").unique()
    verdicts = [classify_progression(s, v, cues) for s, v in distinct.iter_rows()]
    distinct = distinct.with_columns(
        label=pl.Series([lab for lab, _ in verdicts], dtype=pl.String),
        reason=pl.Series([why for _, why in verdicts], dtype=pl.String),
    )
    classified = cued.join(distinct, on=["sentence", "value"], how="left")
    for reason, n in classified.filter(pl.col("label").is_null())["reason"].value_counts().iter_rows():
        out.skip(str(reason), int(n))
    return classified.filter(pl.col("label").is_not_null()).select(_CANDIDATE_COLUMNS)


# ---- candidates from an MS-CXR-T-style CSV -------------------------------------------------------

def id_key(expr: pl.Expr) -> pl.Expr:
    """Digits-only form of a MIMIC id: "s50414267", "50414267" and "50414267.0" all match."""
    return (
        expr.cast(pl.String).str.strip_chars().str.replace(r"\.0+$", "")
        .str.replace(r"^[sSpP](\d)", "${1}").str.replace(r"^0+(\d)", "${1}")
    )


def read_temporal_csv(path: Path | str) -> pl.DataFrame | None:
    """The CSV as strings, or None when it is missing or unreadable (never raises)."""
    try:
        df = pl.read_csv(path, infer_schema=False)
        df = df.rename({c: c.strip().lower() for c in df.columns})
    except (OSError, pl.exceptions.PolarsError, UnicodeDecodeError, ValueError):
        return None
    return df if "study_id" in df.columns else None


def csv_candidates(corpus: Corpus, csv: pl.DataFrame, out: TaskOutput) -> pl.DataFrame:
    finding_cols = [c for c in CSV_COLUMN if c in csv.columns]
    if not finding_cols or "study_id" not in csv.columns:
        out.skip("CSV_WITHOUT_LABEL_COLUMNS")
        return pl.DataFrame(schema={c: pl.String for c in _CANDIDATE_COLUMNS}).with_columns(pl.col("obs").cast(pl.Int8))
    base = {c: pl.col(c).cast(pl.String) if c in csv.columns else pl.lit(None, dtype=pl.String).alias(c)
            for c in ("dicom_id", "study_id", "previous_dicom_id", "previous_study_id")}
    long = (
        csv.select(*[e.alias(n) for n, e in base.items()], *[pl.col(c).cast(pl.String) for c in finding_cols])
        .unpivot(index=list(base), on=finding_cols, variable_name="column", value_name="label")
        .with_columns(
            obs=pl.col("column").replace_strict(CSV_COLUMN, return_dtype=pl.Int8),
            label=pl.col("label").str.strip_chars().str.to_lowercase(),
        )
        .filter(pl.col("label").is_not_null() & (pl.col("label") != ""))
    )
    out.skip("CSV_UNKNOWN_LABEL", long.filter(~pl.col("label").is_in(PROGRESSION_LABELS)).height)
    long = long.filter(pl.col("label").is_in(PROGRESSION_LABELS))
    keys = corpus.studies.select("study_id", key=id_key(pl.col("study_id"))).unique(subset="key", keep="first")
    # Map CSV ids to warehouse ids by their digits; an unmatched prior keeps its text (reported missing).
    long = (
        long.with_columns(key=id_key(pl.col("study_id")), prior_key=id_key(pl.col("previous_study_id")))
        .drop("study_id")
        .join(keys, on="key", how="left")
        .join(keys.rename({"study_id": "prior_study_id", "key": "prior_key"}), on="prior_key", how="left")
        .with_columns(prior_study_id=pl.coalesce("prior_study_id", "previous_study_id"))
    )
    out.skip("CSV_STUDY_UNKNOWN", long.filter(pl.col("study_id").is_null()).height)
    current = long.join(
        corpus.profiles.select("study_id", "patient_id", "split", pl.col("image_path").alias("primary_image")),
        on="study_id", how="inner",
    )
    out.skip("CSV_STUDY_GATED", long.filter(pl.col("study_id").is_not_null()).height - current.height)
    # The CSV names the exact images of the pair; a dicom counts only if it belongs to that
    # study. Otherwise each study's primary image stands in.
    dicoms = corpus.images.filter(pl.col("dicom_id").is_not_null()).unique(subset=["study_id", "dicom_id"])
    current_dicoms = dicoms.select("dicom_id", "study_id", pl.col("path").alias("dicom_path"))
    prior_dicoms = dicoms.select(pl.col("dicom_id").alias("previous_dicom_id"),
                                 pl.col("study_id").alias("prior_study_id"), pl.col("path").alias("prior_image_path"))
    current = (
        current.join(current_dicoms, on=["dicom_id", "study_id"], how="left")
        .join(prior_dicoms, on=["previous_dicom_id", "prior_study_id"], how="left")
        .with_columns(image_path=pl.coalesce("dicom_path", "primary_image"))
    )
    paired = _attach_prior(current, corpus, out).select(_CANDIDATE_COLUMNS)
    # One label per pair and finding; a pair labelled two ways is dropped rather than guessed.
    key = ["study_id", "prior_study_id", "image_path", "prior_image_path", "obs"]
    agreed = paired.group_by(key).agg(pl.col("label").unique(), n=pl.col("label").n_unique())
    out.skip("CSV_CONFLICTING_LABELS", agreed.filter(pl.col("n") > 1).height)
    agreed = agreed.filter(pl.col("n") == 1).with_columns(pl.col("label").list.first()).drop("n")
    study_cols = paired.select("study_id", "patient_id", "split").unique(subset="study_id")
    return agreed.join(study_cols, on="study_id").select(_CANDIDATE_COLUMNS)


# ---- sampling ------------------------------------------------------------------------------------

def label_sources(temporal_source: str, have_csv: bool) -> tuple[str, ...]:
    """Which label sources a run uses: "auto" means the CSV when there is one, else language."""
    if temporal_source == "auto":
        return ("csv",) if have_csv else ("language",)
    if temporal_source == "both":
        return ("csv", "language") if have_csv else ("language",)
    if temporal_source == "csv":
        return ("csv",) if have_csv else ()
    return ("language",)


def temporal_candidates(corpus: Corpus, config: TaskConfig, csv: pl.DataFrame | None, out: TaskOutput) -> pl.DataFrame:
    sources = label_sources(config.temporal_source, csv is not None)
    if config.temporal_source == "csv" and csv is None:
        out.skip("NO_TEMPORAL_CSV")
    frames = []
    if "csv" in sources and csv is not None:
        frames.append(csv_candidates(corpus, csv, out).with_columns(source=pl.lit("csv")))
    if "language" in sources:
        lang = language_candidates(corpus, out)
        if frames:  # the CSV's label wins for any (study, finding) it covers
            lang = lang.join(frames[0].select("study_id", "obs").unique(), on=["study_id", "obs"], how="anti")
        frames.append(lang.with_columns(source=pl.lit("language")))
    if not frames:
        return pl.DataFrame(schema={**{c: pl.String for c in _CANDIDATE_COLUMNS}, "obs": pl.Int8, "source": pl.String})
    return pl.concat([f.with_columns(pl.col("obs").cast(pl.Int8)) for f in frames], how="vertical_relaxed")


def build_temporal(corpus: Corpus, config: TaskConfig, csv: pl.DataFrame | None = None) -> TaskOutput:
    out = TaskOutput(TASK)
    cand = temporal_candidates(corpus, config, csv, out)
    out.eligible = set(cand["study_id"].to_list())
    order = ("study_id", "prior_study_id", "image_path", "prior_image_path")
    for (split, obs), group in sorted(cand.partition_by(["split", "obs"], as_dict=True).items()):
        finding = OBSERVATIONS[obs]
        by_label = []
        for label in PROGRESSION_LABELS:
            rows = group.filter(pl.col("label") == label)
            rng = rng_for(config.seed, TASK, split, finding, label)
            by_label.append(pick_rows(rows, rows.height, rng, order))
            rng.shuffle(by_label[-1])
        for row in round_robin_take(by_label, config.caps.temporal):
            study = StudyRef(row["study_id"], row["patient_id"], row["split"], row["image_path"])
            label = row["label"]
            out.samples.append(make_sample(
                TASK, study, STEM.format(finding=finding.lower()), PROGRESSION_LABELS,
                answer_index=PROGRESSION_LABELS.index(label), answer_text=label,
                findings=[finding], answer_findings=[finding],
                image_paths=[row["prior_image_path"], row["image_path"]], prior_study_id=row["prior_study_id"],
            ))
    return out
