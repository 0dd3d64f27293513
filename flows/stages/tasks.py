"""Stage `tasks`: VQA samples of the five task types from labels, studies and images.

One unit of work ("all"): sampling is global (balanced per finding and split across the whole
corpus), so it cannot be split into independent batches. The work itself is in
extractors/tasks; this module reads the three tables, finds the optional MS-CXR-T CSV, and
writes int_vqa_samples as one partition per task (``binary`` ... ``temporal``), each replaced
on a re-run, plus study-level rejections and one audit row.

Options (TasksOptions): ``seed`` (default settings.seed), ``caps`` (task -> int, see
extractors.tasks.common.TaskCaps), ``temporal_source`` (auto|csv|language|both),
``temporal_csv`` (explicit CSV path), ``task_types`` (subset of the five tasks), ``require_images``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import polars as pl

from extractors.tasks import CSV_NAME, TaskConfig, build_tasks, label_sources, read_temporal_csv
from flows.stages.common import RunContext, rejection
from flows.stages.contract import BatchOutput, Stage, StageOptions
from schemas.ingest import Image, Study
from schemas.labels import Label
from schemas.vqa import TASKS, VqaSample

NAME = "tasks"
VERSION = "tasks-v1"
BATCH = "all"
log = logging.getLogger("radchain.stages.tasks")


class TasksOptions(StageOptions):
    # Checked by extractors.tasks.TaskConfig.from_options (one clear message per wrong value), so typed loosely.
    seed: Any = None
    caps: Any = None
    temporal_source: Any = "auto"
    temporal_csv: str | None = None
    task_types: Any = None
    require_images: Any = None


class TasksStage(Stage):
    name = NAME
    version = VERSION
    reads = (Label, Study, Image)
    writes = (VqaSample,)
    Options = TasksOptions

    def plan(self) -> list[str]:
        return [BATCH]

    def process(self, batch: str) -> BatchOutput:
        return build_samples(self.ctx, self.options)


def temporal_csv_path(ctx: RunContext, options: TasksOptions | None = None) -> Path | None:
    """An explicit ``temporal_csv`` option, else the CSV beside a MIMIC source tree, if present."""
    explicit = (options or TasksOptions.of(ctx)).temporal_csv
    if explicit:
        return Path(explicit)
    if ctx.source is None:
        return None
    root = Path(ctx.source.path)
    folder = root if root.is_dir() else root.parent
    for name in (CSV_NAME, CSV_NAME + ".gz"):  # MIMIC CSVs are often kept gzipped
        if (folder / name).is_file():
            return folder / name
    return None


def read_inputs(ctx: RunContext) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Only the columns the builders use (int_labels is the big one: 14 rows per study)."""
    labels = ctx.warehouse.scan(Label).select("study_id", "observation", "value", "sentence").collect()
    studies = ctx.warehouse.scan(Study).select(
        "study_id", "patient_id", "study_order", "prior_study_id", "split", "has_findings", "has_impression"
    ).collect()
    scan = ctx.warehouse.scan(Image)
    present = scan.collect_schema().names()
    # status (ok/missing/corrupt) is read when the ingest that wrote stg_images recorded it.
    images = scan.select([c for c in ("dicom_id", "study_id", "path", "view_position", "exists", "status")
                          if c in present or c != "status"]).collect()
    return labels, studies, images


def build_samples(ctx: RunContext, options: TasksOptions) -> BatchOutput:
    config = TaskConfig.from_options(options.model_dump(exclude_none=True), default_seed=ctx.settings.seed)
    if config.require_images is None and ctx.source is not None and Path(ctx.source.path).is_file():
        # A report table names its images explicitly (--image-col): a path that is not there is an error
        # of that row, never a reports-only corpus.
        config = replace(config, require_images=True)
    labels, studies, images = read_inputs(ctx)
    csv_path = temporal_csv_path(ctx, options)
    csv = read_temporal_csv(csv_path) if csv_path is not None else None
    if csv_path is not None and csv is None:
        log.warning("tasks: temporal CSV %s is missing or unreadable; using comparison language", csv_path)
    result = build_tasks(labels, studies, images, temporal_csv=csv, config=config)
    if config.require_images is None and images.height and "status" in images.columns \
            and not (images["status"] == "ok").any():
        log.warning("tasks: none of the source's %d image files exists or is readable (a reports-only source): "
                    "samples keep image paths that are not on disk, and training skips them", images.height)

    rejections = [rejection(NAME, r.study_id, r.reason_code, r.detail) for r in result.rejections]
    summary = result.summary()
    log.info(
        "tasks: samples per task %s; studies in=%d out=%d rejected=%d skipped=%d; rejection reasons %s; "
        "skip reasons %s; temporal source %s",
        summary["samples"], result.inputs, result.outputs, result.rejected, result.skipped,
        summary["rejections"], summary["skip_reasons"],
        "+".join(label_sources(config.temporal_source, csv is not None)) or "none",
    )
    # One partition per task, every one written (empty when not built), so a re-run never leaves stale rows.
    return BatchOutput(inputs=result.inputs, outputs=result.outputs, skipped=result.skipped, rejections=rejections,
                       partitions={VqaSample: {task: result.samples.get(task, []) for task in TASKS}})
