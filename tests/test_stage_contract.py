"""The stage contract and its runner: DAG order from declared tables, a stage added in one module
(tests/toy_stage.py), the runner's cleanup and lineage, and the stage graph Prefect records."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from flows.stages.common import SourceSpec
from flows.stages.contract import Stage, StageOrderError, dag_order, discover, stage_names
from schemas.base import Lineage, TableRecord

REPO = Path(__file__).resolve().parents[1]
BUILTIN = ["ingest", "label", "tasks", "mine", "datasets"]
# The stage graph the run should draw: each stage's batches wait for these stages' finalize.
EDGES = {"ingest": set(), "label": {"ingest"}, "tasks": {"label"}, "mine": {"tasks"}, "datasets": {"mine"},
         "toy": {"label"}}


@pytest.fixture
def toy():
    """Import the toy stage module (declaring its classes registers them); forget it afterwards."""
    module = importlib.import_module("toy_stage")
    yield module
    Stage.registry.pop("toy", None)
    TableRecord.registry.pop("int_toy_positives", None)
    sys.modules.pop("toy_stage", None)


def test_the_stage_list_is_the_dag_of_declared_tables():
    assert stage_names() == BUILTIN
    stages = discover()
    # Each edge exists because a stage reads a table the previous one declares it writes.
    for before, after in zip(BUILTIN, BUILTIN[1:]):
        assert {t.__table__ for t in stages[before].writes} & {t.__table__ for t in stages[after].reads}
    # The order does not depend on the order stages are given in.
    assert [s.name for s in dag_order(reversed(list(stages.values())))] == BUILTIN


def test_a_cycle_of_reads_and_writes_is_refused():
    from schemas.labels import Label
    from schemas.vqa import VqaSample

    class A(Stage):
        name, version, reads, writes = "cycle-a", "a-v1", (Label,), (VqaSample,)

    class B(Stage):
        name, version, reads, writes = "cycle-b", "b-v1", (VqaSample,), (Label,)

    try:
        with pytest.raises(StageOrderError, match="cycle"):
            dag_order([A, B])
    finally:
        Stage.registry.pop("cycle-a")
        Stage.registry.pop("cycle-b")


def test_a_stage_without_a_version_is_refused():
    with pytest.raises(TypeError, match="no version"):
        class NoVersion(Stage):  # noqa: F841
            name = "no-version"
    assert "no-version" not in Stage.registry


@pytest.fixture
def corpus(tmp_path_factory) -> Path:
    from extractors.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("contract") / "corpus"
    generate_corpus(root, studies=40, seed=5, images=False)
    return root


def test_a_stage_added_in_one_module_runs_in_dag_order_with_cleanup_and_lineage(toy, corpus, tmp_path,
                                                                                 monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import pipeline_flow, run_stages
    from flows.pipeline import make_context
    from radchain.build_info import code_version, git_commit
    from radchain.settings import reset_settings_cache
    from warehouse import Warehouse

    # Registered by being declared: nothing under flows/ names it.
    assert stage_names() == BUILTIN + ["toy"]
    assert not [p for p in (REPO / "flows").rglob("*.py") if "toy" in p.read_text(encoding="utf-8").lower()]

    monkeypatch.setenv("RADCHAIN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RADCHAIN_BATCH_SIZE", "15")
    reset_settings_cache()
    try:
        # Given in any order: the run follows the DAG.
        state = pipeline_flow(source=SourceSpec(path=corpus), stages=["toy", *reversed(BUILTIN)],
                              options={"extractor": "rules"}, return_state=True)
        results = state.result()
        flow_run_id = str(state.state_details.flow_run_id)
        wh = Warehouse(tmp_path / "home" / "warehouse")
        assert list(results) == BUILTIN + ["toy"]
        toy_results = results["toy"]
        assert [r.batch_id for r in toy_results] == wh.partitions("int_labels") == ["b00000", "b00001", "b00002"]

        # Lineage: the flow run id and the code version (with the commit in a git checkout) on every row.
        rows = wh.read("int_toy_positives")
        assert rows.height == sum(r.outputs for r in toy_results) > 0
        assert set(rows["run_id"]) == {flow_run_id}
        assert set(rows["code_version"]) == {f"{code_version()}/toy-v1"}
        if git_commit():
            assert f"+g{git_commit()}/" in rows["code_version"][0]
        audit = wh.read("audit_stage_counts").filter(pl.col("stage") == "toy").sort("batch_id")
        assert audit["batch_id"].to_list() == ["b00000", "b00001", "b00002"] and set(audit["run_id"]) == {flow_run_id}
        for r in audit.iter_rows(named=True):
            assert r["inputs"] == r["outputs"] + r["rejected"] + r["skipped"] > 0
        assert audit["rejected"].sum() == wh.read("int_rejections").filter(pl.col("stage") == "toy").height
        _every_partition_is_recorded(wh)

        # The run graph: task runs named stage[batch] with their counts, one edge per stage dependency.
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        names = {str(t.id): t.name for t in runs}
        toy_batches = sorted(n for n in names.values() if n.startswith("toy[b"))
        assert len(toy_batches) == 3
        for name, r in zip(toy_batches, toy_results):
            assert name == f"toy[{r.batch_id}] {r.inputs} in, {r.outputs} out, {r.rejected} rejected" + (
                f", {r.skipped} skipped" if r.skipped else "")
        assert "toy[finalize] 3 batches" in names.values()
        # Progress is the runner's, for every stage that declares a unit: mine (samples) and the toy (batches).
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        progress = {a.key: a for a in artifacts if a.type == "progress"}
        assert set(progress) == {"mine-progress", "toy-progress"}
        assert progress["toy-progress"].data == 100.0
        assert progress["toy-progress"].description == "toy: 3/3 batches processed"
        for t in runs:
            stage, part = re.match(r"([a-z]+)\[([^\]]+)\]", t.name).groups()
            parents = {names[str(i.id)] for inputs in t.task_inputs.values() for i in inputs if str(i.id) in names}
            parent_stages = {re.match(r"([a-z]+)\[", p).group(1) for p in parents}
            if part != "finalize":
                # A batch waits for the finalize of the stages it reads from, never for another batch.
                assert all("[finalize]" in p for p in parents), (t.name, parents)
                assert parent_stages == EDGES[stage], (t.name, parents)
            else:
                assert parent_stages == {stage}, (t.name, parents)  # its own batches

        # Re-run the toy stage alone, after a stale partition appeared (as a larger, earlier run leaves one),
        # with an option of its own: the stale partition goes, with its rejection, audit and records.
        stale = Lineage(run_id="old", batch_id="b99999", code_version="test")
        wh.write_batch("toy", "b99999", stale, {toy.ToyPositives: [dict(study_id="x", positives=1)]})
        wh.write(importlib.import_module("schemas.audit").Rejection, "toy-b99999", [], stale)
        ctx = make_context(source=SourceSpec(path=corpus), extractor="rules", toy_min_positives=2, show_progress=False)
        again = run_stages(ctx, ["toy"])["toy"]
        assert wh.partitions("int_toy_positives") == ["b00000", "b00001", "b00002"]
        assert "toy-b99999" not in wh.partitions("int_rejections")
        mats = wh.read("fct_materializations")
        assert mats.filter(pl.col("partition").str.contains("b99999")).height == 0
        assert sum(r.skipped for r in again) > 0  # toy_min_positives=2 reached the stage, typed
        assert wh.read("int_toy_positives")["positives"].min() >= 2
        _every_partition_is_recorded(wh)
    finally:
        reset_settings_cache()


def _every_partition_is_recorded(wh) -> None:
    """Each Parquet partition of every table has a fct_materializations row with its row count."""
    mats = {(t, p): n for t, p, n in wh.read("fct_materializations").select("table_name", "partition", "rows")
            .iter_rows()}
    for folder in sorted(wh.parquet_dir.iterdir()):
        if folder.name == "fct_materializations":
            continue
        for f in sorted(folder.glob("*.parquet")):
            if f.name == "_schema.parquet":
                continue
            assert mats.get((folder.name, f.stem)) == pq.read_metadata(f).num_rows, (folder.name, f.stem)


def test_options_are_typed_per_stage(tmp_path, caplog):
    from pydantic import ValidationError

    from flows.stages.mine import MineOptions, MineStage
    from flows.stages.runner import RunOptions
    from flows.pipeline import make_context
    from radchain.settings import Settings

    ctx = make_context(Settings(home=tmp_path), extractor="rules", budget_usd="1.5", show_progress=False)
    stage = MineStage(ctx)
    assert isinstance(stage.options, MineOptions) and stage.options.budget_usd == 1.5
    assert RunOptions.of(ctx).show_progress is False
    with pytest.raises(ValidationError, match="extractor"):
        MineStage(make_context(Settings(home=tmp_path), extractor="gpt"))
    assert ctx.options == {"extractor": "rules", "budget_usd": "1.5", "show_progress": False}  # never written to
    # A misspelt option is named, not silently dropped.
    from flows.pipeline import run_stages

    with caplog.at_level("WARNING", logger="radchain.runner"):
        run_stages(make_context(Settings(home=tmp_path), budget=3, extractor="rules"), [])
    assert "options no stage or runner declares (ignored): budget" in caplog.text
