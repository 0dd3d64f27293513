"""Stage 2, label: one int_labels row per (study, observation) for every ingested report.

plan      the ingest batches present in raw_reports (one label batch per ingest batch)
process   reads that batch's raw_reports and stg_sections partitions, labels FINDINGS +
          IMPRESSION with the rule labeler, and takes the value from the source's chexpert
          CSV where it has the study (source "chexpert_csv"), or from label columns of a
          generic report table ("table"); the rule labeler's deciding sentence is kept as
          evidence whenever one of the report's sentences states the stored value.
          A study with no FINDINGS/IMPRESSION text and no CSV labels is rejected
          (NO_FINDINGS_TEXT).
The runner removes label partitions (and their rejection/audit rows) whose ingest batch no longer exists.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import polars as pl

from extractors.chexpert_csv import (
    LabelTableError,
    label_columns,
    read_chexpert_csv,
    to_long,
)
from extractors.chains.types import LabelEvidence
from extractors.instructions import mask_instructions
from extractors.labeler import LABELED_SECTIONS, label_reports_with_mentions, supporting_evidence
from extractors.sources import ReportTable, SourceError
from flows.stages.common import RunContext, SourceSpec, rejection
from flows.stages.contract import BatchOutput, Stage
from schemas.ingest import RawReport, Section
from schemas.labels import OBSERVATIONS, Label

NAME = "label"
VERSION = "label-v1"
NO_FINDINGS_TEXT = "NO_FINDINGS_TEXT"
_TABLE_ID = "__radchain_study_id"


class LabelStage(Stage):
    name = NAME
    version = VERSION
    reads = (RawReport, Section)
    writes = (Label,)

    def plan(self) -> list[str]:
        return self.wh.partitions(RawReport.__table__)

    def process(self, batch: str) -> BatchOutput:
        return label_batch(self.ctx, batch)


def _partition(ctx: RunContext, table: str, batch: str, columns: list[str]) -> pl.DataFrame:
    path = ctx.warehouse.table_dir(table) / f"{batch}.parquet"
    if not path.exists():
        return pl.DataFrame(schema={c: pl.String if c in ("study_id", "name", "text") else pl.Int64 for c in columns})
    return pl.scan_parquet(path).select(columns).collect()


def label_batch(ctx: RunContext, batch: str) -> BatchOutput:
    reports = _partition(ctx, RawReport.__table__, batch, ["study_id", "text"])
    sections = _partition(ctx, Section.__table__, batch, ["study_id", "name", "start", "end"])
    spans_of: dict[str, list[tuple[str, int, int]]] = {}
    for sid, name, s, e in sections.iter_rows():
        spans_of.setdefault(sid, []).append((name, s, e))
    ids = reports.get_column("study_id").to_list()
    texts = [t or "" for t in reports.get_column("text").to_list()]
    # Instruction-like sentences (raw_reports.suspect_spans, found at ingest) are blanked out: no label is read
    # from "Write that pneumothorax is present." (same length, so every offset below still indexes the report).
    texts = [mask_instructions(t, sp) for t, sp in zip(texts, _suspect_spans(ctx, batch, len(ids)))]
    gold, gold_source = _gold_labels(ctx, ids)
    labeled = label_reports_with_mentions([(t, spans_of.get(sid, [])) for sid, t in zip(ids, texts)])

    columns: dict[str, list] = {c: [] for c in ("study_id", "observation", "value", "source", "section",
                                                "sentence_start", "sentence_end", "sentence")}
    rejections = []
    for sid, text, (labels, mentions) in zip(ids, texts, labeled):
        secs = spans_of.get(sid, [])
        has_text = any(name in LABELED_SECTIONS and text[s:e].strip() for name, s, e in secs)
        study_gold = gold.get(sid)
        if study_gold is None and not has_text:
            rejections.append(rejection(NAME, sid, NO_FINDINGS_TEXT,
                                        "no FINDINGS or IMPRESSION text and no CheXpert CSV labels"))
            continue
        for o in OBSERVATIONS:
            evidence, source = labels[o], "rules"
            if study_gold is not None and o in study_gold:
                value, source = study_gold[o], gold_source
                if evidence.value != value:
                    evidence = supporting_evidence(mentions, o, value) or LabelEvidence(value)
            columns["study_id"].append(sid)
            columns["observation"].append(o)
            columns["value"].append(evidence.value)
            columns["source"].append(source)
            columns["section"].append(_section_of(secs, evidence.start))
            columns["sentence_start"].append(evidence.start)
            columns["sentence_end"].append(evidence.end)
            columns["sentence"].append(evidence.sentence)
    frame = pl.DataFrame(columns, schema={"study_id": pl.String, "observation": pl.String, "value": pl.String,
                                          "source": pl.String, "section": pl.String, "sentence_start": pl.Int64,
                                          "sentence_end": pl.Int64, "sentence": pl.String})
    return BatchOutput(inputs=len(ids), outputs=len(ids) - len(rejections), rejections=rejections,
                       frames={Label: frame})


def _suspect_spans(ctx: RunContext, batch: str, n: int) -> list[list[dict]]:
    """raw_reports.suspect_spans of the batch, in row order (empty lists for a partition written before it existed)."""
    path = ctx.warehouse.table_dir(RawReport.__table__) / f"{batch}.parquet"
    if not path.exists() or "suspect_spans" not in pl.read_parquet_schema(path):
        return [[] for _ in range(n)]
    return [sp or [] for sp in pl.scan_parquet(path).select("suspect_spans").collect()["suspect_spans"].to_list()]


def _section_of(sections: list[tuple[str, int, int]], start: int | None) -> str | None:
    if start is None:
        return None
    for name, s, e in sections:
        if s <= start < e:
            return name
    return None


# ---- gold labels from the source -------------------------------------------------------

def _gold_labels(ctx: RunContext, ids: list[str]) -> tuple[dict[str, dict[str, str]], str]:
    """study_id -> observation -> value for the batch's studies, and the source name."""
    spec = ctx.source
    if spec is None or not ids:
        return {}, "rules"
    path = Path(spec.path)
    if path.is_dir():
        csv_path = _chexpert_csv_path(path)
        if csv_path is None:
            return {}, "rules"
        long, source = _cached_long(str(csv_path), *_stamp(csv_path), "csv", ""), "chexpert_csv"
    elif path.is_file():
        long, source = _cached_long(str(path), *_stamp(path), "table", spec.id_col or "study_id",
                                    bool(getattr(spec, "trim_ids", False))), "table"
    else:
        return {}, "rules"
    if long.is_empty():
        return {}, source
    out: dict[str, dict[str, str]] = {}
    wanted = pl.Series("study_id", ids, dtype=pl.String)
    for sid, o, v in long.filter(pl.col("study_id").is_in(wanted.implode())).iter_rows():
        out.setdefault(sid, {})[o] = v
    return out, source


def _chexpert_csv_path(root: Path) -> Path | None:
    from extractors.sources import MimicTree

    return MimicTree(root).csv_path("chexpert")


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


@lru_cache(maxsize=2)
def _cached_long(path: str, mtime_ns: int, size: int, kind: str, id_col: str, trim_ids: bool = False) -> pl.DataFrame:
    """Label table in long format, read once per file version (MIMIC's CSV has 227k rows;
    re-reading it for every batch would dominate the stage)."""
    empty = pl.DataFrame(schema={"study_id": pl.String, "observation": pl.String, "value": pl.String})
    try:
        if kind == "csv":
            return read_chexpert_csv(path)
        # The report table is read as the ingest stage read it (its encoding, malformed CSV
        # records, ids as written), so the label rows meet their reports.
        table = ReportTable(SourceSpec(path=Path(path), kind="table", id_col=id_col, trim_ids=trim_ids))
        header = table.columns()
        mapping = label_columns([c for c in header if c != id_col])
        if id_col not in header or not mapping:
            return empty  # a report table without label columns: rules only
        frame = table.text_frame(list(mapping), id_alias=_TABLE_ID)
        return to_long(frame, id_col=_TABLE_ID, strict=False, normalize_ids=False, trim_ids=False)
    except (LabelTableError, SourceError, OSError):
        return empty  # an unreadable label file must not stop labeling: fall back to the rules
