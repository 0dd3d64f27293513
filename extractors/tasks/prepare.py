"""Turn the three input tables into one tidy per-study table the builders sample from.

Everything here is polars expressions (no Python loops over rows): the full MIMIC-CXR corpus
is 227,835 studies and 3.2M label rows.

Gates, in order (the first failing one is the study's rejection reason):

- NO_SPLIT: the study has no split.
- SPLIT_CONFLICT: the patient's studies carry more than one split. Splits are per patient so
  that no patient's images leak between train and test; such a patient is kept out entirely.
- NO_FINDINGS_TEXT: the report has neither a findings nor an impression section (nothing for
  a reasoning chain to be mined from).
- NO_IMAGE: the study has no image path at all.
- IMAGE_CORRUPT: the study's best image is a file Pillow cannot read (stg_images.status, checked at
  ingest): it has no usable image, and at least one of its files is there but broken.
- IMAGE_MISSING: none of the study's image files exists. Not a gate for a reports-only source (no
  image of the whole corpus exists, e.g. MIMIC-CXR reports without the JPG download): its samples
  keep their image paths, as text-only data (training skips rows whose images are not on disk).

Label problems (NO_LABELS, ONLY_UNCERTAIN) are not gates: a study without usable labels may
still be a temporal sample from the MS-CXR-T CSV. They only name the reason when nothing
could be built.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from extractors.tasks.common import NEGATIVE, NO_FINDING_RANK, POSITIVE, RANK, TARGET_RANKS, UNCERTAIN, USED_RANKS
from schemas.labels import TEMPORAL_OBSERVATIONS

STUDY_COLUMNS = {
    "study_id": pl.String, "patient_id": pl.String, "prior_study_id": pl.String, "split": pl.String,
    "has_findings": pl.Boolean, "has_impression": pl.Boolean, "study_order": pl.Int64,
}
IMAGE_COLUMNS = {
    "dicom_id": pl.String, "study_id": pl.String, "path": pl.String, "view_position": pl.String,
    "exists": pl.Boolean, "status": pl.String,
}
LABEL_COLUMNS = {"study_id": pl.String, "observation": pl.String, "value": pl.String, "sentence": pl.String}

# View positions ranked for the primary image: frontal PA first (the standard view), then AP
# (portable, magnifies the heart), other frontal variants, unknown, and lateral views last.
_VIEW_RANK = {"PA": 0, "AP": 1, "AP AXIAL": 2, "PA LLD": 2, "AP LLD": 2, "AP RLD": 2, "PA RLD": 2,
              "LATERAL": 4, "LL": 4, "LAO": 4, "RAO": 4, "LPO": 4, "SWIMMERS": 4, "XTABLE LATERAL": 4}
_OBS_BY_LOWER = {name.lower(): rank for name, rank in RANK.items() if rank in USED_RANKS}

GATE_DETAIL = {
    "NO_SPLIT": "the study has no split (train/validate/test)",
    "SPLIT_CONFLICT": "the patient's studies are in more than one split; the patient is left out",
    "NO_FINDINGS_TEXT": "the report has neither a findings nor an impression section",
    "NO_IMAGE": "the study has no image path in stg_images",
    "IMAGE_MISSING": "none of the study's image files exists (stg_images.status = missing)",
    "IMAGE_CORRUPT": "the study's image file is not a readable image (stg_images.status = corrupt)",
    "NO_LABELS": "the study has no usable label rows in int_labels",
    "ONLY_UNCERTAIN": "no target observation is labelled positive or negative (all uncertain or not mentioned)",
    "NO_ELIGIBLE_TASK": "labels exist but fit no task's sampling rules",
}


def with_columns_present(df: pl.DataFrame | None, columns: dict[str, pl.DataType]) -> pl.DataFrame:
    """Add missing columns as nulls and cast known ones, so odd inputs degrade instead of crash."""
    df = df if df is not None else pl.DataFrame()
    exprs = []
    for name, dtype in columns.items():
        if name in df.columns:
            exprs.append(pl.col(name).cast(dtype, strict=False))
        else:
            exprs.append(pl.lit(None, dtype=dtype).alias(name))
    return df.select(exprs)


def clean_text_id(col: str) -> pl.Expr:
    """Trimmed id; empty strings become null."""
    s = pl.col(col).str.strip_chars()
    return pl.when(s == "").then(None).otherwise(s).alias(col)


@dataclass
class Corpus:
    # Every study considered: study_id, patient_id, split, prior_study_id, image_path, gate.
    studies: pl.DataFrame
    # Studies that passed the gates: the columns above (gate null) plus pos/neg/unc (sorted
    # lists of target ranks), no_finding (the No Finding value or null) and label_gate.
    profiles: pl.DataFrame
    # Deduplicated labels of gate-passing studies: study_id, obs (rank), value.
    labels: pl.DataFrame
    # Non-empty image paths: dicom_id, study_id, path (for the temporal dicom lookup).
    images: pl.DataFrame
    # The sentence that decided each temporal-finding label: study_id, obs, sentence.
    sentences: pl.DataFrame


def image_status() -> pl.Expr:
    """stg_images.status, or one derived from ``exists`` for tables without it (null: unknown)."""
    return pl.coalesce(
        pl.col("status").str.strip_chars().str.to_lowercase(),
        pl.when(pl.col("exists") == True).then(pl.lit("ok"))  # noqa: E712 (a polars expression)
        .when(pl.col("exists") == False).then(pl.lit("missing")),  # noqa: E712
    )


def primary_images(images: pl.DataFrame) -> pl.DataFrame:
    """One image per study: an existing frontal image when there is one, otherwise any path
    (a broken file before a missing one); ``image_status`` is that image's status."""
    view = pl.col("view_position").str.strip_chars().str.to_uppercase()
    return (
        images.filter(pl.col("study_id").is_not_null() & pl.col("path").is_not_null())
        .with_columns(image_status())
        .with_columns(
            exists_rank=pl.when(pl.col("exists").fill_null(False)).then(0)
            .when(pl.col("status") == "corrupt").then(1).otherwise(2),
            view_rank=view.replace_strict(_VIEW_RANK, default=3, return_dtype=pl.Int8),
        )
        .sort("study_id", "exists_rank", "view_rank", "path")
        .group_by("study_id", maintain_order=True)
        .agg(image_path=pl.col("path").first(), image_status=pl.col("status").first())
    )


def gate_studies(studies: pl.DataFrame, images: pl.DataFrame, require_images: bool = True) -> pl.DataFrame:
    """The first failing gate per study (module docstring); ``require_images=False`` (a reports-only
    source) lets studies whose image files are missing through."""
    st = (
        with_columns_present(studies, STUDY_COLUMNS)
        .with_columns(clean_text_id("study_id"), clean_text_id("patient_id"), clean_text_id("split"),
                      clean_text_id("prior_study_id"))
        .filter(pl.col("study_id").is_not_null())
        # A duplicated study id keeps one deterministic row.
        .sort("study_id", "study_order", "patient_id", "split", nulls_last=True)
        .unique(subset="study_id", keep="first", maintain_order=True)
        # A study without a patient is its own patient (it cannot leak into another split).
        .with_columns(patient_id=pl.col("patient_id").fill_null(pl.col("study_id")))
    )
    conflict = (
        st.group_by("patient_id")
        .agg(split_conflict=pl.col("split").drop_nulls().n_unique() > 1)
    )
    has_text = pl.col("has_findings").fill_null(False) | pl.col("has_impression").fill_null(False)
    return (
        st.join(conflict, on="patient_id", how="left")
        .join(primary_images(images), on="study_id", how="left")
        .with_columns(
            gate=pl.when(pl.col("split").is_null()).then(pl.lit("NO_SPLIT"))
            .when(pl.col("split_conflict")).then(pl.lit("SPLIT_CONFLICT"))
            .when(~has_text).then(pl.lit("NO_FINDINGS_TEXT"))
            .when(pl.col("image_path").is_null()).then(pl.lit("NO_IMAGE"))
            .when(pl.col("image_status") == "corrupt").then(pl.lit("IMAGE_CORRUPT"))
            .when((pl.col("image_status") == "missing") & pl.lit(require_images)).then(pl.lit("IMAGE_MISSING"))
            .otherwise(None)
        )
        # A study whose image is unusable gives no image to anyone (a temporal pair's prior included).
        .with_columns(image_path=pl.when(pl.col("gate").is_in(["IMAGE_CORRUPT", "IMAGE_MISSING"]))
                      .then(None).otherwise(pl.col("image_path")))
        .select("study_id", "patient_id", "split", "prior_study_id", "image_path", "gate")
    )


def has_images(images: pl.DataFrame) -> bool:
    """Whether any image of the source is usable; if none is, the source is reports-only."""
    return images.height > 0 and bool((images["status"] == "ok").any())


def dedupe_labels(labels: pl.DataFrame, study_ids: pl.Series) -> pl.DataFrame:
    """(study, observation rank, value) with one value per pair; contradicting rows count as uncertain."""
    lab = (
        with_columns_present(labels, LABEL_COLUMNS)
        .select(
            pl.col("study_id").str.strip_chars(),
            obs=pl.col("observation").str.strip_chars().str.to_lowercase()
            .replace_strict(_OBS_BY_LOWER, default=None, return_dtype=pl.Int8),
            value=pl.col("value").str.strip_chars().str.to_lowercase(),
        )
        .filter(pl.col("obs").is_not_null() & pl.col("value").is_in([POSITIVE, NEGATIVE, UNCERTAIN])
                & pl.col("study_id").is_in(study_ids.implode()))
        .unique()
    )
    return (
        lab.group_by("study_id", "obs")
        .agg(value=pl.when(pl.len() > 1).then(pl.lit(UNCERTAIN)).otherwise(pl.col("value").first()))
    )


def deciding_sentences(labels: pl.DataFrame, study_ids: pl.Series) -> pl.DataFrame:
    """First non-empty sentence per (study, temporal observation): the comparison-language input."""
    temporal = [RANK[o] for o in TEMPORAL_OBSERVATIONS]
    return (
        with_columns_present(labels, LABEL_COLUMNS)
        .select(
            pl.col("study_id").str.strip_chars(),
            obs=pl.col("observation").str.strip_chars().str.to_lowercase()
            .replace_strict(_OBS_BY_LOWER, default=None, return_dtype=pl.Int8),
            sentence=pl.col("sentence"),
        )
        .filter(pl.col("obs").is_in(temporal) & (pl.col("sentence").str.strip_chars() != "")
                & pl.col("study_id").is_in(study_ids.implode()))
        .sort("study_id", "obs", "sentence")
        .group_by("study_id", "obs", maintain_order=True)
        .agg(pl.col("sentence").first())
    )


def label_profiles(lab: pl.DataFrame) -> pl.DataFrame:
    is_target = pl.col("obs").is_in(list(TARGET_RANKS))

    def ranks(value: str) -> pl.Expr:
        return pl.col("obs").filter(is_target & (pl.col("value") == value)).sort()

    return lab.group_by("study_id").agg(
        pos=ranks(POSITIVE),
        neg=ranks(NEGATIVE),
        unc=ranks(UNCERTAIN),
        no_finding=pl.col("value").filter(pl.col("obs") == NO_FINDING_RANK).first(),
    )


def prepare(labels: pl.DataFrame | None, studies: pl.DataFrame | None, images: pl.DataFrame | None,
            require_images: bool | None = None) -> Corpus:
    """``require_images``: see TaskConfig (None: only when some image of the source is usable)."""
    imgs = (
        with_columns_present(images, IMAGE_COLUMNS)
        .with_columns(clean_text_id("study_id"), clean_text_id("dicom_id"), clean_text_id("path"))
        .with_columns(image_status())
    )
    require = has_images(imgs) if require_images is None else require_images
    gated = gate_studies(with_columns_present(studies, STUDY_COLUMNS), imgs, require_images=require)
    passing = gated.filter(pl.col("gate").is_null())
    lab = dedupe_labels(labels, passing["study_id"])
    empty = pl.lit([], dtype=pl.List(pl.Int8))
    profiles = (
        passing.join(label_profiles(lab).with_columns(has_labels=pl.lit(True)), on="study_id", how="left")
        .with_columns(
            pos=pl.col("pos").fill_null(empty), neg=pl.col("neg").fill_null(empty),
            unc=pl.col("unc").fill_null(empty),
        )
        .with_columns(
            label_gate=pl.when(pl.col("has_labels").is_null()).then(pl.lit("NO_LABELS"))
            .when((pl.col("pos").list.len() + pl.col("neg").list.len() == 0)
                  & (pl.col("no_finding").fill_null("") != POSITIVE)).then(pl.lit("ONLY_UNCERTAIN"))
            .otherwise(None)
        )
        .drop("has_labels")
    )
    return Corpus(
        studies=gated,
        profiles=profiles,
        labels=lab,
        sentences=deciding_sentences(labels, passing["study_id"]),
        # Usable images only (the temporal CSV names exact dicoms): no broken file, and no missing one
        # unless the whole source is reports-only.
        images=imgs.filter(pl.col("path").is_not_null() & pl.col("study_id").is_not_null()
                           & (pl.col("status").is_null() | (pl.col("status") == "ok")
                              | ((pl.col("status") == "missing") & pl.lit(not require))))
        .select("dicom_id", "study_id", "path"),
    )
