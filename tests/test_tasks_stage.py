"""The `tasks` stage end to end on a small warehouse: partitions, rejections, audit, re-runs."""

from __future__ import annotations

import logging
import random

import polars as pl
import pytest

from flows.stages import tasks as stage
from flows.stages.common import RunContext, SourceSpec
from flows.stages.runner import execute_batch, run_stages
from radchain.settings import Settings
from schemas.base import Lineage
from schemas.ingest import Image, Study
from schemas.labels import OBSERVATIONS, TARGET_OBSERVATIONS, Label
from schemas.vqa import TASKS, VqaSample
from warehouse import Warehouse

LINEAGE = Lineage(run_id="fixture", batch_id="b0", code_version="test")


def populate(wh: Warehouse, n_patients: int = 60, seed: int = 0) -> None:
    rng = random.Random(seed)
    studies, images, labels = [], [], []
    n = 0
    for p in range(n_patients):
        patient = f"{10000000 + p}"
        split = ("train", "validate", "test")[p % 3]
        prior = None
        for order in range(1 + p % 3):
            n += 1
            sid = f"{50000000 + n}"
            no_text = n % 17 == 0  # a few reports without findings or impression
            studies.append(dict(study_id=sid, patient_id=patient, study_datetime=None, study_order=order,
                                prior_study_id=prior, split=split, n_images=1, has_findings=not no_text,
                                has_impression=not no_text))
            images.append(dict(dicom_id=f"d{n}", study_id=sid, patient_id=patient, path=f"files/{sid}.jpg",
                               view_position="PA", exists=True))
            for obs in OBSERVATIONS:
                value = rng.choices(["positive", "negative", "uncertain", "not_mentioned"], [0.2, 0.4, 0.05, 0.35])[0]
                if obs not in TARGET_OBSERVATIONS:
                    value = "not_mentioned"
                sentence = f"Increased {obs.lower()}." if value == "positive" else None
                labels.append(dict(study_id=sid, observation=obs, value=value, source="rules", section="findings",
                                   sentence_start=0 if sentence else None,
                                   sentence_end=len(sentence) if sentence else None, sentence=sentence))
            prior = sid
    wh.write(Study, "b0", studies, LINEAGE)
    wh.write(Image, "b0", images, LINEAGE)
    wh.write(Label, "b0", labels, LINEAGE)


@pytest.fixture
def make_ctx(tmp_path):
    settings = Settings(home=tmp_path / "home")
    wh = Warehouse(settings.warehouse_dir).ensure()

    def make(run_id: str = "run1", source: SourceSpec | None = None, **options) -> RunContext:
        return RunContext(settings=settings, warehouse=wh, run_id=run_id, source=source, options=options)

    return make


@pytest.fixture
def ctx(make_ctx):
    c = make_ctx()
    populate(c.warehouse)
    return c


def test_stage_writes_samples_rejections_and_audit(ctx, caplog):
    assert stage.TasksStage(ctx).plan() == ["all"]
    with caplog.at_level(logging.INFO, logger="radchain.stages.tasks"):
        result = execute_batch(stage.TasksStage(ctx), "all")
    assert stage.TasksStage(ctx).finalize() is None
    wh = ctx.warehouse
    assert wh.partitions("int_vqa_samples") == sorted(TASKS)
    samples = wh.read(VqaSample)
    per_task = dict(samples.group_by("task").len().iter_rows())
    assert set(per_task) == set(TASKS) and all(n > 0 for n in per_task.values())
    assert samples["sample_id"].n_unique() == samples.height
    assert set(samples["run_id"]) == {"run1"}
    # every partition holds only its own task
    for task in TASKS:
        part = pl.read_parquet(wh.table_dir("int_vqa_samples") / f"{task}.parquet")
        assert set(part["task"]) == {task}

    rejections = wh.read("int_rejections").filter(pl.col("stage") == "tasks")
    assert rejections.height == result.rejected > 0
    assert set(rejections["reason_code"]) == {"NO_FINDINGS_TEXT"}
    audit = wh.read("audit_stage_counts").filter(pl.col("stage") == "tasks").row(0, named=True)
    assert audit["inputs"] == result.inputs == wh.count("stg_studies")
    assert audit["inputs"] == audit["outputs"] + audit["rejected"] + audit["skipped"]
    assert result.outputs == samples["study_id"].n_unique()

    message = " ".join(r.getMessage() for r in caplog.records)
    assert f"'binary': {per_task['binary']}" in message and "temporal source language" in message

    wh.refresh_views()
    by_sql = dict((r["task"], r["n"]) for r in wh.sql(
        "SELECT task, count(*) AS n FROM int_vqa_samples GROUP BY task").to_pylist())
    assert by_sql == per_task


def test_rerun_replaces_rows_and_stale_partitions(ctx, make_ctx):
    execute_batch(stage.TasksStage(ctx), "all")
    first = sorted(ctx.warehouse.read(VqaSample)["sample_id"].to_list())
    stale = ctx.warehouse.table_dir("int_vqa_samples") / "old-layout.parquet"
    stale.write_bytes((ctx.warehouse.table_dir("int_vqa_samples") / "binary.parquet").read_bytes())
    rerun = make_ctx(run_id="run2")
    run_stages(rerun, ["tasks"])  # the runner removes the partition no batch of this run wrote
    samples = rerun.warehouse.read(VqaSample)
    assert sorted(samples["sample_id"].to_list()) == first
    assert set(samples["run_id"]) == {"run2"}
    assert not stale.exists()
    assert rerun.warehouse.read("int_rejections").filter(pl.col("stage") == "tasks")["rejection_id"].is_unique().all()


def test_caps_seed_and_task_options(ctx, make_ctx):
    execute_batch(stage.TasksStage(ctx), "all")
    default_ids = set(ctx.warehouse.read(VqaSample)["sample_id"])
    capped = make_ctx(run_id="r2", seed=99, caps={"binary": 2, "open": 1}, task_types=["binary", "open"])
    result = execute_batch(stage.TasksStage(capped), "all")
    samples = capped.warehouse.read(VqaSample)
    counts = dict(samples.group_by("task").len().iter_rows())
    assert set(counts) == {"binary", "open"}
    assert counts["open"] <= 3  # one per split
    per_group = samples.filter(pl.col("task") == "binary").group_by("split", "findings").len()
    assert per_group["len"].max() <= 2
    assert result.inputs == result.outputs + result.rejected + result.skipped
    reseeded = make_ctx(run_id="r4", seed=99)
    execute_batch(stage.TasksStage(reseeded), "all")
    assert set(reseeded.warehouse.read(VqaSample)["sample_id"]) != default_ids
    with pytest.raises(ValueError):
        execute_batch(stage.TasksStage(make_ctx(run_id="r3", caps={"everything": 5})), "all")


def test_temporal_csv_beside_a_mimic_source(ctx, make_ctx, tmp_path):
    studies = ctx.warehouse.read(Study).filter(pl.col("prior_study_id").is_not_null() & pl.col("has_findings"))
    current, prior = studies.row(0, named=True)["study_id"], studies.row(0, named=True)["prior_study_id"]
    root = tmp_path / "mimic"
    root.mkdir()
    (root / "ms-cxr-t_temporal-classification.csv").write_text(
        "dicom_id,study_id,subject_id,previous_dicom_id,previous_study_id,consolidation_progression,"
        "edema_progression,pleural_effusion_progression,pneumonia_progression,pneumothorax_progression\n"
        f"x,s{current},1,y,{prior},,improving,,,\n"
    )
    with_csv = make_ctx(run_id="csv", source=SourceSpec(path=root, kind="mimic"))
    assert stage.temporal_csv_path(with_csv) == root / "ms-cxr-t_temporal-classification.csv"
    execute_batch(stage.TasksStage(with_csv), "all")
    temporal = with_csv.warehouse.read(VqaSample).filter(pl.col("task") == "temporal")
    assert temporal.height == 1
    row = temporal.row(0, named=True)
    assert (row["study_id"], row["prior_study_id"], row["answer_text"], row["answer_letter"]) == (
        current, prior, "improving", "C")
    assert row["image_paths"] == [f"files/{prior}.jpg", f"files/{current}.jpg"]
    assert stage.temporal_csv_path(make_ctx(source=SourceSpec(path=tmp_path / "elsewhere"))) is None


def test_empty_warehouse_runs_cleanly(make_ctx):
    empty = make_ctx(run_id="empty")
    result = execute_batch(stage.TasksStage(empty), "all")
    assert (result.inputs, result.outputs, result.rejected, result.skipped) == (0, 0, 0, 0)
    assert empty.warehouse.count("int_vqa_samples") == 0
    assert empty.warehouse.partitions("int_vqa_samples") == sorted(TASKS)


def test_runs_through_the_pipeline_runner(ctx):
    from flows.pipeline import run_stages

    results = run_stages(ctx, ["tasks"])
    (batch,) = results["tasks"]
    assert batch.stage == "tasks" and batch.outputs > 0
