"""Deployments, schedules, pools and limits declared in flows/deployments.py, and `radchain serve`.

The first tests build the Prefect deployment objects without a server. The rest start the
real `radchain serve` (a Prefect server on 127.0.0.1, the pools, a cpu worker, the
deployments), read back what it created, trigger the nightly `mine` deployment twice at
once (the second run waits for the first: deployment concurrency limit), ask `radchain
status`, and stop it with SIGTERM, checking that its processes are gone.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import time

import pytest

from flows.deployments import (
    CPU_POOL,
    GPU_POOL,
    REPO_DIR,
    deployment_specs,
    schedule_rows,
    to_runner_deployment,
)
from radchain.testing import radchain_command

RADCHAIN = radchain_command()
STUDIES = 40


# ---- declared in the repository (no server) ------------------------------------------------------
def test_the_five_deployments_are_declared(tmp_path):
    specs = {s.name: s for s in deployment_specs(source=tmp_path / "src", train_config="tiny-cpu")}
    assert set(specs) == {"mine", "train", "sft", "grpo", "evaluate"}
    assert {s.full_name for s in specs.values()} == {
        "radchain-pipeline/mine", "radchain-train/train", "radchain-sft/sft", "radchain-grpo/grpo",
        "radchain-evaluate/evaluate"}
    assert specs["mine"].work_pool == CPU_POOL and specs["mine"].cron == "0 2 * * *"
    assert specs["train"].work_pool == CPU_POOL and specs["train"].cron == "0 4 * * 0"
    assert all(specs[n].work_pool == GPU_POOL and specs[n].cron is None for n in ("sft", "grpo", "evaluate"))
    assert specs["train"].parameters == {"config": "tiny-cpu", "use_deployments": True}
    assert specs["mine"].parameters["source"]["path"] == str((tmp_path / "src").resolve())
    assert specs["mine"].parameters["stages"] == ["ingest", "label", "tasks", "mine", "datasets"]
    assert specs["mine"].parameters["options"]["show_progress"] is True  # scheduled runs get mine-progress
    assert all(s.concurrency == 1 and "radchain" in s.tags for s in specs.values())
    rows = schedule_rows(list(specs.values()))
    assert {r["deployment"]: r["schedule"] for r in rows}["radchain-pipeline/mine"] == "0 2 * * * (UTC)"


@pytest.mark.parametrize("collision,strategy", [("enqueue", "ENQUEUE"), ("cancel", "CANCEL_NEW")])
def test_runner_deployments_carry_schedule_limit_retries_and_source(tmp_path, collision, strategy):
    specs = deployment_specs(source=tmp_path / "src")
    for spec in specs:
        dep = to_runner_deployment(spec, schedules_active=False, collision=collision)
        assert dep.name == spec.name and dep.flow_name == spec.flow_name
        assert dep.work_pool_name == spec.work_pool
        assert dep.entrypoint == spec.entrypoint
        assert dep.storage.to_pull_step() == {
            "prefect.deployments.steps.set_working_directory": {"directory": str(REPO_DIR)}}
        assert dep.concurrency_limit == 1
        assert dep.concurrency_options.collision_strategy.value == strategy
        env = dep.job_variables["env"]
        assert env["PREFECT_FLOWS_DEFAULT_RETRIES"] == str(spec.flow_retries)
        assert env["PREFECT_TASKS_DEFAULT_RETRIES"] == str(spec.task_retries)
        assert set(dep.tags) == set(spec.tags)
        if spec.cron:
            (sched,) = dep.schedules
            assert sched.schedule.cron == spec.cron and sched.schedule.timezone == "UTC"
            assert sched.active is False
        else:
            assert not dep.schedules
        # Every declared parameter is a parameter of the flow.
        names = set(dep._parameter_openapi_schema.properties)
        assert set(spec.parameters) <= names, spec.name
    assert to_runner_deployment(specs[0]).schedules[0].active is True


def test_a_bad_collision_strategy_is_refused(tmp_path):
    with pytest.raises(ValueError, match="collision strategy"):
        to_runner_deployment(deployment_specs(source=tmp_path)[0], collision="drop")


def test_the_train_dag_calls_the_deployments_it_declares():
    from flows import training_flows

    source = inspect.getsource(training_flows.train_flow)
    for name in ("radchain-sft/sft", "radchain-grpo/grpo", "radchain-evaluate/evaluate"):
        assert f'"{name}"' in source
    assert "use_deployments" in inspect.signature(training_flows.train_flow).parameters


def test_llm_slots_limit_nothing_without_a_server():
    from flows.locking import LLM_LIMIT_SLOTS, llm_slots

    with llm_slots(5) as n:
        assert n == 5
    with llm_slots(10_000) as n:
        assert n == LLM_LIMIT_SLOTS


def test_serve_refuses_a_non_loopback_host(radchain_home):
    out = subprocess.run([*RADCHAIN, "serve", "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True,
                         env={**os.environ, "RADCHAIN_HOME": str(radchain_home)}, timeout=120)
    assert out.returncode == 2
    assert "loopback only" in out.stderr


def test_status_without_a_server_says_so(radchain_home):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["RADCHAIN_HOME"] = str(radchain_home)
    out = subprocess.run([*RADCHAIN, "status"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    assert "radchain serve" in out.stderr


# ---- `radchain serve` for real --------------------------------------------------------------------
def _free_port() -> int:
    from flows.supervisor import pick_free_port

    return pick_free_port()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`radchain serve` in a subprocess (own process group) with a cpu worker; yields its details."""
    from extractors.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("serve")
    home = root / "home"
    corpus = generate_corpus(root / "corpus", studies=STUDIES, seed=13).out
    port = _free_port()
    env = {**os.environ, "RADCHAIN_HOME": str(home), "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_LOGGING_LEVEL": "WARNING", "COLUMNS": "200"}
    env.pop("PREFECT_API_URL", None)
    log = root / "serve.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [*RADCHAIN, "serve", "--port", str(port), "--workers", "cpu", "--no-schedules", "--source", str(corpus),
             "--extractor", "rules"],
            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(root), start_new_session=True)
    deadline = time.monotonic() + 300
    while "Prefect UI:" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"radchain serve did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    state = json.loads((home / "serve" / "serve.json").read_text())
    info = dict(proc=proc, port=port, api_url=f"http://127.0.0.1:{port}/api", home=home, log=log, state=state,
                corpus=corpus, env=env)
    try:
        yield info
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def api(served):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: served["api_url"]}):
        yield


def test_serve_prints_the_ui_and_the_deployments(served):
    out = served["log"].read_text()
    assert f"Prefect UI: http://127.0.0.1:{served['port']}" in out
    for name in ("radchain-pipeline/mine", "radchain-train/train", "radchain-sft/sft", "radchain-grpo/grpo",
                 "radchain-evaluate/evaluate"):
        assert name in out
    assert "llm-calls" in out
    assert served["state"]["api_url"] == served["api_url"]
    # Its Prefect database lives under RADCHAIN_HOME.
    assert (served["home"] / "prefect").is_dir()


def test_serve_created_pools_limit_and_deployments(served, api):
    from prefect import get_client
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

    with get_client(sync_client=True) as client:
        for pool in (CPU_POOL, GPU_POOL):
            assert client.read_work_pool(pool).type == "process"
        assert client.read_workers_for_work_pool(
            CPU_POOL, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"])))
        limit = client.read_global_concurrency_limit_by_name("llm-calls")
        assert limit.limit == 32 and limit.active
        deps = {f"{d.name}": d for d in client.read_deployments()}
    assert set(deps) == {"mine", "train", "sft", "grpo", "evaluate"}
    mine = deps["mine"]
    assert mine.work_pool_name == CPU_POOL
    assert mine.global_concurrency_limit.limit == 1
    assert mine.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert mine.parameters["source"]["path"] == str(served["corpus"].resolve())
    assert [s.schedule.cron for s in mine.schedules] == ["0 2 * * *"]
    assert [s.active for s in mine.schedules] == [False]  # --no-schedules
    assert deps["train"].work_pool_name == CPU_POOL and deps["train"].parameters["use_deployments"] is True
    assert [s.schedule.cron for s in deps["train"].schedules] == ["0 4 * * 0"]
    assert deps["evaluate"].pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                            {"directory": str(REPO_DIR)}}]


def test_llm_slots_occupy_the_global_limit(served, api):
    from prefect import get_client

    from flows.locking import llm_slots

    with llm_slots(4) as n:
        assert n == 4
        with get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name("llm-calls").active_slots == 4
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("llm-calls").active_slots == 0


def test_two_triggers_of_mine_run_one_after_the_other(served, api):
    from prefect import get_client
    from prefect.deployments import run_deployment

    first = run_deployment("radchain-pipeline/mine", timeout=0)
    second = run_deployment("radchain-pipeline/mine", timeout=0)
    deadline = time.monotonic() + 420
    with get_client(sync_client=True) as client:
        while True:
            runs = [client.read_flow_run(first.id), client.read_flow_run(second.id)]
            if all(r.state and r.state.is_final() for r in runs):
                break
            assert time.monotonic() < deadline, [r.state for r in runs]
            time.sleep(1)
        histories = [[s.name for s in client.read_flow_run_states(r.id)] for r in runs]
    assert [r.state.name for r in runs] == ["Completed", "Completed"], histories
    # One of them was held back by the deployment's concurrency limit, and they did not overlap.
    assert any("AwaitingConcurrencySlot" in h for h in histories), histories
    a, b = sorted(runs, key=lambda r: r.start_time)
    assert b.start_time >= a.end_time

    from warehouse import Warehouse

    wh = Warehouse(served["home"] / "warehouse")
    rows = wh.sql("SELECT count(*) AS n, count(DISTINCT chain_id) AS d FROM int_chains").to_pylist()[0]
    assert rows["n"] == rows["d"] > 0
    assert wh.sql("SELECT count(*) AS n FROM raw_reports").to_pylist()[0]["n"] == STUDIES


def test_deploy_reapplies_the_deployments_and_keeps_a_resized_llm_limit(served, api):
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit("llm-calls", GlobalConcurrencyLimitUpdate(limit=40))
    out = subprocess.run([*RADCHAIN, "deploy", "--api-url", served["api_url"], "--source", str(served["corpus"]),
                          "--no-schedules", "--collision", "cancel", "--train-config", "qwen2vl-2b"],
                         capture_output=True, text=True, env=served["env"], timeout=300)
    assert out.returncode == 0, out.stderr
    assert "radchain-pipeline/mine" in out.stdout
    with get_client(sync_client=True) as client:
        deps = {d.name: d for d in client.read_deployments()}
        assert client.read_global_concurrency_limit_by_name("llm-calls").limit == 40  # the operator's size stays
    assert len(deps) == 5
    assert deps["mine"].concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert deps["sft"].parameters["config"] == "qwen2vl-2b"


def test_status_summarises_the_last_runs(served):
    # No --api-url and no PREFECT_API_URL: status finds the server `radchain serve` recorded.
    out = subprocess.run([*RADCHAIN, "status", "--format", "json"], capture_output=True, text=True,
                         env=served["env"], timeout=120)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    mine = [r for r in rows if r["flow"] == "radchain-pipeline"]
    assert len(mine) >= 2
    assert all(r["deployment"] == "mine" and r["state"] == "Completed" for r in mine)
    assert all(r["duration"] and r["start"] for r in mine)
    assert "ingest 40→40" in mine[0]["stages"] and "mine " in mine[0]["stages"]
    table = subprocess.run([*RADCHAIN, "status"], capture_output=True, text=True, env=served["env"], timeout=120)
    assert table.returncode == 0 and "radchain-pipeline" in table.stdout


def test_serve_stops_its_processes_on_sigterm(served):
    import psutil

    proc = served["proc"]
    children = [psutil.Process(p) for p in (served["state"]["server_pid"], *served["state"]["workers"].values())]
    assert all(c.is_running() for c in children)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(90) == 0, served["log"].read_text()[-3000:]
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive
    assert "stopped." in served["log"].read_text()
    assert not (served["home"] / "serve" / "serve.json").exists()
    from flows.supervisor import port_free

    assert port_free("127.0.0.1", served["port"])
