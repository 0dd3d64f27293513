"""Distributed fan-out: the pipeline's batches as task runs on a multi-process Dask cluster give the
same tables as the default in-process runner.

One synthetic corpus, three warehouses: the default runner, `runner=dask` (a LocalCluster the flow
starts, 2 worker processes) and `dask_address=` (a cluster started here, which the flow connects to).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from flows.stages.common import SourceSpec
from flows.stages.contract import stage_names
from warehouse_support import table_hashes

STUDIES = 120
BATCH_SIZE = 30  # 4 ingest batches, 4 label batches, 4 mine batches
STAGES = stage_names()  # every stage, in DAG order
def _run(home: Path, corpus: Path, stages: list[str], flow=None, **options):
    from flows.pipeline import pipeline_flow
    from radchain.settings import reset_settings_cache

    flow = flow or pipeline_flow
    from warehouse import Warehouse

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RADCHAIN_HOME", str(home))
        mp.setenv("RADCHAIN_BATCH_SIZE", str(BATCH_SIZE))
        reset_settings_cache()
        try:
            results = flow(source=SourceSpec(path=corpus), stages=stages,
                                    options={"extractor": "rules", "show_progress": False, **options})
        finally:
            reset_settings_cache()
    return results, Warehouse(home / "warehouse")


@pytest.fixture(scope="module", autouse=True)
def patient_prefect_api():
    """Prefect's temporary API gets 20 s to start by default; a busy 2-core machine may need more."""
    from prefect.settings import (
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    with temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180}):
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from extractors.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("dask-corpus")
    generate_corpus(root, studies=STUDIES, seed=21, images=False)
    return root


@pytest.fixture(scope="module")
def default_run(corpus, tmp_path_factory):
    results, wh = _run(tmp_path_factory.mktemp("default-home"), corpus, STAGES)
    return dict(results=results, wh=wh, hashes=table_hashes(wh))


def test_dask_local_cluster_gives_the_default_runners_tables(default_run, corpus, tmp_path_factory):
    results, wh = _run(tmp_path_factory.mktemp("dask-home"), corpus, STAGES, runner="dask", dask_workers=2)
    # Same batches per stage, each counted once.
    for stage in STAGES:
        got = sorted((r.batch_id, r.inputs, r.outputs, r.rejected, r.skipped) for r in results[stage])
        want = sorted((r.batch_id, r.inputs, r.outputs, r.rejected, r.skipped) for r in default_run["results"][stage])
        assert got == want, stage
    assert len(results["ingest"]) == len(results["label"]) == STUDIES // BATCH_SIZE
    hashes, want = table_hashes(wh), default_run["hashes"]
    assert {t for t, (n, _) in want.items() if n} >= {
        "raw_reports", "stg_sections", "stg_studies", "int_labels", "int_vqa_samples", "int_chains",
        "int_chain_steps", "mart_sft_examples", "mart_rl_prompts", "mart_benchmark", "audit_stage_counts"}
    assert hashes == want, {t for t in want if hashes.get(t) != want[t]}
    # No half-written partition anywhere.
    assert not list((wh.root / "parquet").rglob(".*.tmp-*"))
    # The run graph of batches run on the workers: named stage[batch] with counts, each stage's batches
    # waiting for the previous stage's finalize only.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    (run_id,) = set(wh.read("audit_stage_counts")["run_id"])
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    names = {str(t.id): t.name for t in runs}
    for t in runs:
        parents = {names[str(i.id)] for inputs in t.task_inputs.values() for i in inputs if str(i.id) in names}
        stage, part = t.name.split("[", 1)
        if part.startswith("finalize"):
            assert parents and {p.split("[")[0] for p in parents} == {stage}, (t.name, parents)
        else:
            before = STAGES[STAGES.index(stage) - 1] if STAGES.index(stage) else None
            assert parents == ({n for n in names.values() if n.startswith(f"{before}[finalize]")} if before else set())
            assert " in, " in part and " out, " in part, t.name


def test_dask_address_runs_batches_on_the_clusters_worker_processes(default_run, corpus, tmp_path_factory):
    from distributed import Client, LocalCluster
    from prefect import get_client

    # Workers of a cluster radchain did not start need PREFECT_API_URL in their own environment (as
    # on remote machines); here: the temporary API this test process already runs.
    with get_client(sync_client=True) as prefect_client:
        api_url = str(prefect_client.api_url)
    assert api_url.startswith("http://127.0.0.1")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", env={"PREFECT_API_URL": api_url}) as cluster, \
            Client(cluster) as client:
        results, wh = _run(tmp_path_factory.mktemp("dask-addr-home"), corpus, ["ingest", "label"],
                           runner="dask", dask_address=cluster.scheduler_address)
        # The stage code ran in the workers (other processes), not only in this one.
        seen = client.run(lambda: ("flows.stages.label" in __import__("sys").modules, __import__("os").getpid()))
    assert len(seen) == 2 and all(flag for flag, _ in seen.values())
    assert os.getpid() not in {pid for _, pid in seen.values()}
    assert len(results["label"]) == STUDIES // BATCH_SIZE
    hashes, want = table_hashes(wh), default_run["hashes"]
    for table in ("raw_reports", "stg_sections", "stg_studies", "int_labels"):
        assert hashes[table] == want[table], table


def test_a_flow_given_its_own_task_runner_fans_out_on_it(default_run, corpus, tmp_path_factory):
    """The path prefect-ray takes: ``pipeline_flow.with_options(task_runner=RayTaskRunner(...))`` with the
    default runner option submits every batch to the flow's runner. A thread-pool subclass stands in."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.pipeline import pipeline_flow
    from flows.runners import unseal

    submitted: list[str] = []

    class FanOut(ThreadPoolTaskRunner):
        def submit(self, task, parameters, wait_for=None, dependencies=None):
            submitted.append(unseal(parameters["stage"]).name)  # the stage object, sealed from Prefect's search
            return super().submit(task, parameters, wait_for, dependencies)

    flow = pipeline_flow.with_options(task_runner=FanOut(max_workers=2))
    results, wh = _run(tmp_path_factory.mktemp("fanout-home"), corpus, ["ingest", "label"], flow=flow)
    n = STUDIES // BATCH_SIZE
    assert sorted(submitted) == ["ingest"] * n + ["label"] * n and len(results["label"]) == n
    hashes, want = table_hashes(wh), default_run["hashes"]
    for table in ("raw_reports", "stg_sections", "stg_studies", "int_labels"):
        assert hashes[table] == want[table], table


def test_runner_options_are_validated():
    from flows.runners import RunnerError, RunnerSpec

    assert RunnerSpec.from_options(None).kind == "default"
    assert RunnerSpec.from_options({"runner": "dask", "dask_address": "tcp://h:8786"}).address == "tcp://h:8786"
    for bad in ({"runner": "spark"}, {"dask_address": "tcp://h:8786"}, {"runner": "dask", "dask_workers": 0},
                {"runner": "dask", "dask_workers": 2, "dask_address": "tcp://h:8786"}):
        with pytest.raises(RunnerError):
            RunnerSpec.from_options(bad)


def test_worker_context_drops_flow_local_options_and_pickles(tmp_path):
    import threading

    from flows.pipeline import make_context
    from flows.runners import RunnerError, worker_context
    from radchain.settings import Settings

    ctx = make_context(Settings(home=tmp_path), SourceSpec(path=tmp_path), extractor="rules",
                       progress=lambda n: None, runner="dask", lock=threading.Lock())
    with pytest.raises((TypeError, pickle.PicklingError, AttributeError)):
        pickle.dumps(ctx)  # the flow's own context holds a callback and a lock
    with pytest.raises(RunnerError, match="cannot be sent"):
        worker_context(ctx)  # an unpicklable stage option is a clear error, not a hang on the cluster
    ctx.options.pop("lock")
    shipped = worker_context(ctx)
    assert set(shipped.options) == {"extractor"} and "progress" in ctx.options  # the original is untouched
    back = pickle.loads(pickle.dumps(shipped))
    assert back.settings.home == ctx.settings.home and back.warehouse.root == ctx.warehouse.root
    assert back.source == ctx.source and back.run_id == ctx.run_id


def test_cli_rejects_a_bad_runner(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    res = CliRunner().invoke(app, ["run", "--source", str(tmp_path), "--runner", "spark"])
    assert res.exit_code == 2 and "spark" in res.output
    res = CliRunner().invoke(app, ["run", "--source", str(tmp_path), "--dask-address", "tcp://127.0.0.1:1"])
    assert res.exit_code == 2 and "dask" in res.output

