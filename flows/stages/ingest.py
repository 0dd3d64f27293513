"""Stage 1, ingest: read a report source into raw_reports, stg_sections, stg_studies, stg_images.

plan      lists deterministic batches of the source (file paths or row ranges, never text)
process   reads one batch, parses sections: raw_reports + stg_sections rows and the batch's
          rejections (the runner writes them as partitions named by the batch id)
finalize  removes what later stages derived from studies that changed or are gone, then builds
          stg_studies and stg_images (partition "all") from what the batches wrote plus the
          source's metadata

The runner removes partitions an earlier, larger run left before finalize reads the tables.
finalize has no audit row: its inputs are the studies the batches already counted, and an audit
row for it would count every report twice in the per-stage sums. Its writes are recorded in
fct_materializations.
"""

from __future__ import annotations

import gc
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

import polars as pl
import pyarrow as pa

from extractors.instructions import FLAG as INSTRUCTION_FLAG
from extractors.instructions import find_instructions
from extractors.language import looks_english
from extractors.sections import parse_sections
from extractors.sources import (
    Reason,
    ReportBatch,
    SourceBatch,
    SourceError,
    default_split,
    image_rows,
    plan_batches,
    read_batch,
    source_kind,
    study_attributes,
)
from flows.stages.common import RunContext, SourceSpec, rejection
from flows.stages.contract import BatchOutput, Stage
from schemas.base import stable_id
from schemas.ingest import Image, RawReport, Section, Study

NAME = "ingest"
VERSION = "ingest-v1"
# A section body is "usable" when it holds at least one word (two letters in a row).
_WORD_RE = re.compile(r"[A-Za-z]{2}")

# The warehouse's baseline (study_id, content_hash) of the reports held before an ingest started.
_BASELINE = "ingest-reports"
# What later stages derived from a study: (table, the columns that name a study).
_DOWNSTREAM_BY_STUDY = (("int_labels", ("study_id",)), ("int_vqa_samples", ("study_id", "prior_study_id")),
                        ("int_chains", ("study_id",)))
log = logging.getLogger("radchain.stages.ingest")


def _source(ctx: RunContext) -> SourceSpec:
    if ctx.source is None:
        raise SourceError("the ingest stage needs a source: pass the path of a MIMIC-CXR tree or a report table")
    return ctx.source


class IngestStage(Stage):
    name = NAME
    version = VERSION
    reads = ()
    writes = (RawReport, Section, Study, Image)
    final_tables = (Study, Image)

    def plan(self) -> list[SourceBatch]:
        batches = plan_batches(_source(self.ctx), self.ctx.settings.batch_size)
        # Kept until finalize (a file, so a killed run's baseline is the one the next run compares with).
        self.wh.keep_baseline(_BASELINE, _report_frame(self.ctx))
        return batches

    def process(self, batch: SourceBatch) -> BatchOutput:
        with _gc_paused():
            read = read_batch(_source(self.ctx), batch)
            reports, sections, no_sections = _parse(read)
        rejections = [_rejection_row(r.entity_id, r.source, r.reason_code, r.detail) for r in read.rejections]
        rejections += no_sections
        return BatchOutput(inputs=read.inputs, outputs=reports.num_rows, rejections=rejections,
                           frames={RawReport: reports, Section: sections})

    def finalize(self) -> dict:
        ctx, wh = self.ctx, self.wh
        spec = _source(ctx)
        before = wh.baseline(_BASELINE)
        clear_stale_downstream(ctx, None if before is None else dict(before.iter_rows()))
        wh.drop_baseline(_BASELINE)

        reports = wh.scan(RawReport).select("study_id", "patient_id", "source").collect()
        images = image_rows(spec, reports)
        _warn_about_images(spec, images)
        studies = build_studies(reports, study_attributes(spec), _section_flags(ctx), images)
        return {Study: studies, Image: images}


def _report_frame(ctx: RunContext) -> pl.DataFrame:
    return ctx.warehouse.scan(RawReport).select("study_id", "content_hash").collect()


def _report_hashes(ctx: RunContext) -> dict[str, str]:
    return dict(_report_frame(ctx).iter_rows())


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a batch builds ~50,000 small acyclic objects.

    Each allocation burst otherwise triggers full collections that walk every live object;
    pausing them makes parsing about a third faster. Reference counting still frees memory.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _rejection_row(entity_id: str, source: str, reason_code: str, detail: str) -> dict:
    row = rejection(NAME, entity_id, reason_code, f"{detail} [{source}]")
    if reason_code == Reason.DUPLICATE_ID:
        # Several copies of one id are each a rejection: the source keeps their ids distinct.
        row["rejection_id"] = stable_id(NAME, entity_id, reason_code, source)
    return row


def _parse(read: ReportBatch) -> tuple[pa.Table, pa.Table, list[dict]]:
    """Sections of every report, column-wise; reports without usable text are rejected."""
    keep: list[int] = []
    no_sections: list[dict] = []
    flat: list = []  # every ParsedSection of the batch, in order
    owners: list[str] = []
    ordinals: list[int] = []
    for i, (sid, text) in enumerate(zip(read.study_id, read.text)):
        secs = parse_sections(text)
        if not any(s.name != "preamble" and _WORD_RE.search(s.body) for s in secs):
            no_sections.append(_rejection_row(sid, read.source[i], Reason.NO_SECTIONS,
                                              "no section header and no usable text"))
            continue
        if not looks_english(" ".join(s.body for s in secs if s.name in ("findings", "impression"))):
            no_sections.append(_rejection_row(sid, read.source[i], Reason.UNSUPPORTED_LANGUAGE,
                                              "findings/impression are not in English"))
            continue
        keep.append(i)
        flat.extend(secs)
        owners.extend([sid] * len(secs))
        ordinals.extend(range(len(secs)))
    # Transpose once in C (zip) instead of appending to nine lists per section.
    names, headers, starts, ends, bodies, inferred = zip(*flat) if flat else ((),) * 6
    if len(keep) == len(read.study_id):
        picked = read
    else:
        picked = ReportBatch(read.batch_id, read.inputs)
        for i in keep:
            picked.add(read.study_id[i], read.patient_id[i], read.source[i], read.text[i], read.content_hash[i])
    suspects = [find_instructions(t) for t in picked.text]  # instruction-like sentences: flagged, kept
    span_type = RawReport.arrow_schema().field("suspect_spans").type
    reports = pa.table({
        "study_id": pa.array(picked.study_id, pa.string()),
        "patient_id": pa.array(picked.patient_id, pa.string()),
        "source": pa.array(picked.source, pa.string()),
        "text": pa.array(picked.text, pa.string()),
        "n_chars": pa.array([len(t) for t in picked.text], pa.int64()),
        "content_hash": pa.array(picked.content_hash, pa.string()),
        "flags": pa.array([[INSTRUCTION_FLAG] if sp else [] for sp in suspects], pa.list_(pa.string())),
        "suspect_spans": pa.array([[dict(start=x.start, end=x.end, kind=x.kind) for x in sp] for sp in suspects],
                                  span_type),
    })
    sections = pa.table({
        # Readable and deterministic: the same report always yields the same ids.
        "section_id": pa.array([f"{sid}:{o}" for sid, o in zip(owners, ordinals)], pa.string()),
        "study_id": pa.array(owners, pa.string()),
        "ordinal": pa.array(ordinals, pa.int64()),
        "name": pa.array(names, pa.string()),
        "header": pa.array(headers, pa.string()),
        "start": pa.array(starts, pa.int64()),
        "end": pa.array(ends, pa.int64()),
        "text": pa.array(bodies, pa.string()),
        "inferred": pa.array(inferred, pa.bool_()),
    })
    return reports, sections, no_sections


def _warn_about_images(spec: SourceSpec, images: pl.DataFrame) -> None:
    """Say loudly when image paths do not exist or do not decode, or a table source has no image column."""
    if source_kind(spec) == "table" and not spec.image_col:
        log.warning("ingest: the report table has no image column (--image-col): no study has an image, so the "
                    "tasks stage will build no samples")
    if images.height:
        bad = images.filter(~pl.col("exists"))
        if bad.height:
            counts = dict(bad.group_by("status").len().iter_rows())
            log.warning("ingest: %d of %d image files are unusable (%d missing, %d corrupt), e.g. %s",
                        bad.height, images.height, counts.get("missing", 0), counts.get("corrupt", 0),
                        bad.sort("path")["path"][0])


def _section_flags(ctx: RunContext) -> pl.DataFrame:
    """study_id, has_findings, has_impression (a section of that name with a non-empty body)."""
    return (
        ctx.warehouse.scan(Section)
        .filter(pl.col("name").is_in(["findings", "impression"]) & (pl.col("end") > pl.col("start")))
        .group_by("study_id")
        .agg((pl.col("name") == "findings").any().alias("has_findings"),
             (pl.col("name") == "impression").any().alias("has_impression"))
        .collect()
    )


def build_studies(reports: pl.DataFrame, attributes: pl.DataFrame, flags: pl.DataFrame,
                  images: pl.DataFrame) -> pl.DataFrame:
    """One row per accepted report: time order per patient, prior study, split, image count.

    Studies of a patient are ordered by time (unknown times last), then by study id. The
    prior study is the previous one in that order, and only when both times are known:
    without dates, the order of MIMIC's random study ids says nothing about time.
    """
    n_images = images.filter(pl.col("exists")).group_by("study_id").agg(pl.len().cast(pl.Int64).alias("n_images"))
    df = (
        reports.select("study_id", "patient_id")
        .join(attributes, on="study_id", how="left")
        .join(flags, on="study_id", how="left")
        .join(n_images, on="study_id", how="left")
        .sort(["patient_id", pl.col("study_datetime").is_null(), "study_datetime", "study_id"])
        .with_columns(
            pl.int_range(pl.len()).over("patient_id").cast(pl.Int64).alias("study_order"),
            pl.col("study_id").shift(1).over("patient_id").alias("_prev_id"),
            pl.col("study_datetime").shift(1).over("patient_id").alias("_prev_time"),
        )
        .with_columns(
            pl.when(pl.col("study_datetime").is_not_null() & pl.col("_prev_time").is_not_null())
            .then(pl.col("_prev_id")).alias("prior_study_id"),
            # A study the split file misses takes its patient's split (no patient in two
            # splits), else the deterministic hash of the patient id.
            pl.coalesce(pl.col("split"), pl.col("split").drop_nulls().first().over("patient_id"),
                        pl.col("patient_id").map_elements(default_split, return_dtype=pl.String))
            .alias("split"),
            pl.col("n_images").fill_null(0),
            pl.col("has_findings").fill_null(False),
            pl.col("has_impression").fill_null(False),
        )
    )
    return df.select("study_id", "patient_id", "study_datetime", "study_order", "prior_study_id", "split",
                     "n_images", "has_findings", "has_impression")


def clear_stale_downstream(ctx: RunContext, before: dict[str, str] | None) -> dict[str, int]:
    """Remove what later stages derived from studies this ingest dropped or changed.

    A study is stale when it is no longer in raw_reports (``--stages ingest`` on another source,
    or a smaller one) or its report text changed (``before`` holds the content hashes from
    before this ingest, or before a killed one; None when unknown, then only absent studies count). Their labels, samples
    (also as a temporal sample's prior) and chains, with the chains' steps, are removed, so
    label/tasks/mine/datasets never join old rows with new reports. Rejections, audit rows and
    LLM call records stay: they are the history of the runs that wrote them. Built dataset
    versions (mart_*) are snapshots and stay too. Returns rows removed per table.
    """
    wh = ctx.warehouse
    now = _report_hashes(ctx)
    current = pl.Series(list(now), dtype=pl.String)
    changed = pl.Series([sid for sid, h in (before or {}).items() if sid in now and now[sid] != h], dtype=pl.String)

    def stale(col: str) -> pl.Expr:
        c = pl.col(col)
        return c.is_not_null() & (~c.is_in(current.implode()) | c.is_in(changed.implode()))

    removed: dict[str, int] = {}
    stale_samples = (wh.scan("int_vqa_samples")
                     .filter(stale("study_id") | stale("prior_study_id")).select("sample_id").collect()["sample_id"])
    stale_chains = (wh.scan("int_chains").filter(stale("study_id") | pl.col("sample_id").is_in(stale_samples.implode()))
                    .select("chain_id").collect()["chain_id"])
    for table, cols in _DOWNSTREAM_BY_STUDY:
        expr = stale(cols[0])
        for c in cols[1:]:
            expr = expr | stale(c)
        if table == "int_chains":
            expr = expr | pl.col("sample_id").is_in(stale_samples.implode())
        removed[table] = wh.drop_rows(table, expr)
    removed["int_chain_steps"] = wh.drop_rows("int_chain_steps", pl.col("chain_id").is_in(stale_chains.implode())
                                              | pl.col("sample_id").is_in(stale_samples.implode()))
    if any(removed.values()):
        log.warning("ingest: studies that changed (%d) or are gone since the last ingest had rows in later "
                    "stages; removed them (%s): run label, tasks, mine and datasets again",
                    changed.len(), ", ".join(f"{n} {t}" for t, n in removed.items() if n))
    return removed
