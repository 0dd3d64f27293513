"""Data checks, quality gates and run history, through the real flows on a real warehouse.

Module fixture ``gated``: a synthetic corpus goes through ingest, label and tasks (rules, one pipeline
flow run); then mining runs through the LLM extractor against the in-repo fake OpenAI server, whose
default answers never state the gold answer, so the verifier rejects every chain (the issue's 100%
rejection run). That run must end Failed with the acceptance gate's reason and build no dataset; a
datasets-only run after it (the mine gate not in play) must not register its empty version; train
must refuse. The three runs must stay three rows of v_runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from flows.stages.common import SourceSpec

STUDIES = 30


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    from extractors.synthetic import generate_corpus
    from flows.pipeline import pipeline_flow
    from radchain.settings import get_settings, reset_settings_cache
    from radchain.testing import FakeOpenAIServer
    from warehouse import Warehouse

    root = tmp_path_factory.mktemp("checks")
    corpus = root / "corpus"
    generate_corpus(corpus, studies=STUDIES, seed=11, images=False)
    quiet = {"show_progress": False}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RADCHAIN_HOME", str(root / "home"))
        mp.setenv("RADCHAIN_LLM_REQUESTS_PER_MINUTE", "0")
        mp.setenv("RADCHAIN_LLM_TOKENS_PER_MINUTE", "0")
        mp.setenv("RADCHAIN_LLM_REFINE_ROUNDS", "1")
        reset_settings_cache()
        spec = SourceSpec(path=corpus)
        first = pipeline_flow(source=spec, stages=["ingest", "label", "tasks"], options={"extractor": "rules", **quiet},
                              return_state=True)
        wh = Warehouse(get_settings().warehouse_dir)
        with FakeOpenAIServer() as server:  # default answers: a chain whose conclusion never states the answer
            mp.setenv("OPENAI_BASE_URL", server.base_url)
            mp.setenv("OPENAI_API_KEY", "sk-fake-checks")
            reset_settings_cache()
            mined = pipeline_flow(source=spec, stages=["mine", "datasets"], options={"extractor": "llm", **quiet},
                                  return_state=True)
            requests = server.requests
        mp.delenv("OPENAI_BASE_URL")
        mp.delenv("OPENAI_API_KEY")
        reset_settings_cache()
        built = pipeline_flow(source=spec, stages=["datasets"], options=quiet, return_state=True)
        yield dict(wh=wh, root=root, corpus=corpus, first=first, mined=mined, built=built, requests=requests,
                   home=root / "home")
        reset_settings_cache()


def _runs(wh) -> list[dict]:
    return wh.sql("SELECT * FROM v_runs ORDER BY started_at").to_pylist()


# ---- the scenario ------------------------------------------------------------------------
def test_a_run_that_rejects_every_chain_ends_failed_with_the_reason(gated):
    wh, state = gated["wh"], gated["mined"]
    assert gated["requests"] > 0
    mine = wh.sql("SELECT sum(inputs) i, sum(outputs) o, sum(rejected) r FROM audit_stage_counts "
                  "WHERE stage = 'mine'").to_pylist()[0]
    assert mine["i"] > 0 and mine["o"] == 0 and mine["r"] == mine["i"]  # every chain rejected
    assert state.is_failed()
    message = state.message
    assert "\n" not in message
    assert "audit_stage_counts.mine_acceptance" in message and "after stage mine" in message
    assert f"mine accepted 0 of {mine['i']} decided samples (0.00); the minimum acceptance rate is 0.50" in message
    # The run stopped at the gate: the datasets stage never ran, and no version exists.
    run = [r for r in _runs(wh) if r["run_id"] == str(state.state_details.flow_run_id)][0]
    assert run["state"] == "Failed" and run["stages"] == ["mine"] and run["requested_stages"] == ["mine", "datasets"]
    assert run["reason"].startswith("DataCheckFailed: after stage mine, data check audit_stage_counts.mine_acceptance")
    assert run["llm_cost_usd"] > 0 and run["llm_calls"] >= mine["i"]
    # The gate (error) and the rejection-rate warning both failed; only the gate stops the run.
    assert run["checks_failed"] == 1 and run["checks_warned"] == 1
    assert run["failed_checks"] == ["audit_stage_counts.mine_acceptance", "audit_stage_counts.rejection_rate"]
    failed = wh.sql(f"SELECT check_name, severity, failing_rows, sample_ids, detail FROM fct_check_results "
                    f"WHERE run_id = '{run['run_id']}' AND NOT passed ORDER BY check_name").to_pylist()
    assert [(r["check_name"], r["severity"], r["failing_rows"], r["sample_ids"]) for r in failed] == [
        ("audit_stage_counts.mine_acceptance", "error", 1, ["mine"]),
        ("audit_stage_counts.rejection_rate", "warn", 1, ["mine"])]
    assert failed[1]["detail"] == f"mine rejected {mine['i']} of {mine['i']} inputs (1.00); the threshold is 0.50"


def test_the_empty_dataset_is_not_registered(gated):
    """The datasets stage alone (mine's gate not in play) builds a version with no accepted chain: an empty
    benchmark, so its splits_not_empty check fails, the run ends Failed and the version is removed again."""
    wh, state = gated["wh"], gated["built"]
    assert state.is_failed()
    assert "fct_dataset_versions.splits_not_empty" in state.message and "was not registered" in state.message
    audit = wh.sql("SELECT outputs FROM audit_stage_counts WHERE stage = 'datasets'").to_pylist()
    assert audit and wh.count("int_chains") == 0
    assert wh.count("fct_dataset_versions") == 0
    for mart in ("mart_sft_examples", "mart_rl_prompts", "mart_benchmark"):
        assert wh.count(mart) == 0, mart
    mats = wh.read("fct_materializations")
    assert mats.filter(pl.col("table_name").str.starts_with("mart_")).is_empty()
    # The failed check says which version it was and keeps a row for it.
    version = state.message.split("dataset version ")[1].split(" ")[0]
    row = wh.sql("SELECT * FROM fct_check_results WHERE check_name = 'fct_dataset_versions.splits_not_empty' "
                 f"AND stage = 'datasets'").to_pylist()
    assert row[0]["passed"] is False and row[0]["sample_ids"] == [version] and row[0]["dataset_version"] == version
    assert "0 benchmark rows" in row[0]["detail"]


def test_train_refuses_when_no_version_passed(gated, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from radchain.settings import reset_settings_cache

    monkeypatch.setenv("RADCHAIN_HOME", str(gated["home"]))
    reset_settings_cache()
    result = CliRunner().invoke(app, ["train", "--max-examples", "2"])
    assert result.exit_code == 2, result.output
    assert "no dataset version in the warehouse" in result.output and "Traceback" not in result.output
    assert gated["wh"].count("fct_training_runs") == 0


def test_train_refuses_a_version_without_passing_checks_and_picks_the_newest_that_passed(tmp_path, monkeypatch):
    """Versions built outside a pipeline run have no check results: refused, with the reason; once a
    pipeline run builds (and checks) one, train picks it even when a newer unchecked one exists."""
    from extractors.synthetic import generate_corpus
    from flows.pipeline import make_context, pipeline_flow, run_stages
    from flows.training_flows import NoCheckedDataset, checked_dataset_version
    from radchain.settings import reset_settings_cache
    from schemas.base import Lineage
    from schemas.datasets import DatasetVersion

    monkeypatch.setenv("RADCHAIN_HOME", str(tmp_path / "home"))
    reset_settings_cache()
    corpus = tmp_path / "corpus"
    generate_corpus(corpus, studies=40, seed=3, images=False)
    ctx = make_context(source=SourceSpec(path=corpus), extractor="rules", show_progress=False)
    run_stages(ctx, ["ingest", "label", "tasks", "mine", "datasets"])  # no flow: no checks ran
    unchecked = ctx.warehouse.read("fct_dataset_versions")["dataset_version"][0]
    with pytest.raises(NoCheckedDataset, match=f"the newest, {unchecked}, is refused .it has no data check results"):
        checked_dataset_version(ctx.warehouse)

    state = pipeline_flow(source=SourceSpec(path=corpus), stages=["datasets"], options={"show_progress": False},
                          return_state=True)
    assert state.is_completed(), state.message
    assert checked_dataset_version(ctx.warehouse) == unchecked  # same inputs: the same version, now checked
    # A newer version without check results (a hand-written row) is skipped, and the choice is said.
    newer = dict(ctx.warehouse.read("fct_dataset_versions").drop("run_id", "batch_id", "code_version").row(0, named=True))
    newer.update(dataset_version="ds-hand-written", built_at=newer["built_at"].replace(year=2099))
    ctx.warehouse.write(DatasetVersion, "ds-hand-written", [newer], Lineage(run_id="x", batch_id="x", code_version="x"))
    assert checked_dataset_version(ctx.warehouse) == unchecked
    reset_settings_cache()


# ---- run history -----------------------------------------------------------------------------------
def test_v_runs_has_one_row_per_flow_run(gated):
    wh = gated["wh"]
    runs = _runs(wh)
    ids = [str(gated[k].state_details.flow_run_id) for k in ("first", "mined", "built")]
    assert [r["run_id"] for r in runs] == ids  # audit_stage_counts alone would collapse them
    assert [r["state"] for r in runs] == ["Completed", "Failed", "Failed"]
    first = runs[0]
    assert first["stages"] == ["ingest", "label", "tasks"] and first["reason"] is None
    assert first["llm_cost_usd"] == 0 and first["checks_failed"] == 0 and first["checks_passed"] > 20
    by_stage = {s["stage"]: s for s in first["stage_counts"]}
    audit = wh.sql("SELECT stage, sum(inputs) i FROM audit_stage_counts WHERE stage IN ('ingest', 'label', 'tasks') "
                   "GROUP BY stage").to_pylist()
    assert {a["stage"]: a["i"] for a in audit} == {k: v["inputs"] for k, v in by_stage.items()}
    assert by_stage["ingest"]["inputs"] == STUDIES
    assert all(r["finished_at"] >= r["started_at"] for r in runs)


# ---- the checks themselves --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A warehouse whose every check passes (rule backend, one pipeline run)."""
    from extractors.synthetic import generate_corpus
    from flows.pipeline import pipeline_flow
    from radchain.settings import get_settings, reset_settings_cache
    from warehouse import Warehouse

    root = tmp_path_factory.mktemp("clean")
    generate_corpus(root / "corpus", studies=80, seed=2, images=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RADCHAIN_HOME", str(root / "home"))
        reset_settings_cache()
        state = pipeline_flow(source=SourceSpec(path=root / "corpus"),
                              options={"extractor": "rules", "show_progress": False}, return_state=True)
        assert state.is_completed(), state.message
        yield dict(wh=Warehouse(get_settings().warehouse_dir), home=root / "home",
                   run_id=str(state.state_details.flow_run_id))
        reset_settings_cache()


PARAMS = dict(min_acceptance=0.5, max_rejection_rate=0.5, max_answer_share=0.7)


def test_every_check_ran_after_its_stage_and_passed(clean):
    from warehouse.checks import all_checks

    wh = clean["wh"]
    results = wh.sql(f"SELECT stage, check_name, passed FROM fct_check_results WHERE run_id = '{clean['run_id']}'")
    rows = results.to_pylist()
    assert rows and all(r["passed"] for r in rows), [r for r in rows if not r["passed"]]
    by_stage: dict[str, set[str]] = {}
    for r in rows:
        by_stage.setdefault(r["stage"], set()).add(r["check_name"])
    assert "int_chains.sample_id->int_vqa_samples" in by_stage["mine"]
    assert "int_chain_steps.chain_id->int_chains" in by_stage["mine"]
    assert "int_chain_steps.evidence_offsets" in by_stage["mine"]
    assert "mart_sft_examples.no_test_patient" in by_stage["datasets"]
    assert "raw_reports.unique(study_id)" in by_stage["ingest"] and "raw_reports.unique(study_id)" not in by_stage["mine"]
    # Tables every stage writes: their run-scoped checks (the gate) after each stage, their keys after the last.
    assert "audit_stage_counts.mine_acceptance" in by_stage["mine"] and "audit_stage_counts.rejection_rate" in by_stage["ingest"]
    assert "int_rejections.unique(rejection_id)" in by_stage["datasets"]
    assert "int_rejections.unique(rejection_id)" not in by_stage["ingest"]
    # Every declared check of a data table ran after the stage that writes it.
    ran = set().union(*by_stage.values())
    for c in all_checks(["raw_reports", "int_labels", "int_vqa_samples", "int_chains", "mart_rl_prompts"]):
        assert c.name in ran, c.name
    run = [r for r in _runs(wh) if r["run_id"] == clean["run_id"]][0]
    assert run["state"] == "Completed" and run["checks_passed"] == len(rows) and run["checks_failed"] == 0


def _first_row(wh, table: str) -> dict:
    return dict(wh.read(table).drop("run_id", "batch_id", "code_version").row(0, named=True))


def _outcomes(wh, tables):
    from warehouse.checks import all_checks, run_checks

    return {o.check.name: o for o in run_checks(wh, all_checks(tables), None, PARAMS)}


@pytest.fixture
def corrupt(clean):
    """Write bad rows into a partition named 'corrupt' of any table; removed afterwards."""
    from schemas.base import Lineage
    from warehouse import table_model

    wh = clean["wh"]
    written: list[str] = []

    def write(table: str, rows: list[dict]) -> None:
        wh.write(table_model(table), "corrupt", rows, Lineage(run_id="corrupt", batch_id="corrupt",
                                                              code_version="test"))
        written.append(table)

    yield write
    for table in written:
        wh.delete_partitions(table, prefix="corrupt")


def test_relationship_checks_name_the_orphans(clean, corrupt):
    wh = clean["wh"]
    chain = _first_row(wh, "int_chains")
    chain.update(chain_id="orphan-chain", sample_id="no-such-sample")
    corrupt("int_chains", [chain])
    step = _first_row(wh, "int_chain_steps")
    step.update(chain_id="no-such-chain")
    corrupt("int_chain_steps", [step])
    out = _outcomes(wh, ["int_chains", "int_chain_steps"])
    sample = out["int_chains.sample_id->int_vqa_samples"]
    assert not sample.passed and sample.failing_rows == 1 and sample.sample_ids == ["orphan-chain"]
    assert sample.detail == "no-such-sample not in int_vqa_samples"
    steps = out["int_chain_steps.chain_id->int_chains"]
    assert not steps.passed and steps.sample_ids == [f"no-such-chain|{step['step_index']}"]
    # The orphan chain has no steps: its n_steps does not match either.
    assert out["int_chains.n_steps_matches"].sample_ids == ["orphan-chain"]


def test_evidence_offsets_outside_their_text_fail(clean, corrupt):
    wh = clean["wh"]
    steps = wh.read("int_chain_steps").filter(pl.col("evidence").list.len() > 0)
    row = dict(steps.drop("run_id", "batch_id", "code_version").row(0, named=True))
    quote = row["evidence"][0]
    bad = dict(row, step_index=999, evidence=[dict(quote, start=quote["start"] + 1, end=quote["end"] + 1)])
    corrupt("int_chain_steps", [bad])
    o = _outcomes(wh, ["int_chain_steps"])["int_chain_steps.evidence_offsets"]
    assert not o.passed and o.sample_ids == [f"{row['chain_id']}|999"]
    assert quote["quote"] in o.detail


def test_a_test_split_patient_in_a_training_mart_fails(clean, corrupt):
    wh = clean["wh"]
    test_sample = wh.sql("SELECT s.sample_id, s.patient_id FROM int_vqa_samples s JOIN stg_studies t "
                         "USING (study_id) WHERE t.split = 'test' LIMIT 1").to_pylist()[0]
    example = _first_row(wh, "mart_rl_prompts")
    example.update(example_id="leaked", sample_id=test_sample["sample_id"], split="train")
    corrupt("mart_rl_prompts", [example])
    o = _outcomes(wh, ["mart_rl_prompts"])["mart_rl_prompts.no_test_patient"]
    assert not o.passed and o.sample_ids == ["leaked"] and test_sample["patient_id"] in o.detail


def test_keys_and_accepted_values(clean, corrupt):
    wh = clean["wh"]
    report = _first_row(wh, "raw_reports")
    corrupt("raw_reports", [report])  # the same study twice
    label = _first_row(wh, "int_labels")
    label.update(study_id=label["study_id"], observation="Made Up", value="maybe")
    corrupt("int_labels", [label])
    out = _outcomes(wh, ["raw_reports", "int_labels"])
    dup = out["raw_reports.unique(study_id)"]
    assert not dup.passed and dup.sample_ids == [report["study_id"]] and dup.detail == "2 rows share this key"
    bad = out["int_labels.accepted_values(value)"]
    assert not bad.passed and bad.sample_ids == [f"{label['study_id']}|Made Up"] and bad.detail == "value = maybe"
    assert out["int_labels.unique(study_id,observation)"].passed


def test_check_command_records_results_and_exits_1_on_an_error(clean, corrupt, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from radchain.settings import reset_settings_cache

    monkeypatch.setenv("RADCHAIN_HOME", str(clean["home"]))
    reset_settings_cache()
    runner = CliRunner()
    ok = runner.invoke(app, ["check", "--stage", "mine", "--format", "json"])
    assert ok.exit_code == 0, ok.output
    rows = json.loads(ok.stdout)
    assert rows and {r["result"] for r in rows} == {"passed"}
    assert "int_chain_steps.evidence_offsets" in {r["check"] for r in rows}
    assert "raw_reports.unique(study_id)" not in {r["check"] for r in rows}

    chain = _first_row(clean["wh"], "int_chains")
    chain.update(chain_id="orphan", sample_id="gone")
    corrupt("int_chains", [chain])
    bad = runner.invoke(app, ["check", "--table", "int_chains"])
    assert bad.exit_code == 1, bad.output
    assert "int_chains.sample_id->int_vqa_samples failed: gone not in int_vqa_samples" in " ".join(bad.output.split())
    stored = clean["wh"].sql("SELECT run_id, stage, passed FROM fct_check_results "
                             "WHERE check_name = 'int_chains.sample_id->int_vqa_samples' AND stage = 'on-demand' "
                             "ORDER BY checked_at").to_pylist()
    assert [r["passed"] for r in stored][-2:] == [True, False]
    assert all(r["run_id"].startswith("check-") for r in stored)
    assert runner.invoke(app, ["check", "--table", "nope"]).exit_code == 2
    reset_settings_cache()


def test_min_acceptance_setting_env_and_flag(monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.checks import check_params_from
    from radchain.settings import Settings

    assert Settings().checks.min_acceptance == 0.5
    monkeypatch.setenv("RADCHAIN_CHECKS_MIN_ACCEPTANCE", "0.8")
    s = Settings()
    assert check_params_from(s)["min_acceptance"] == 0.8
    assert check_params_from(s, 0.1)["min_acceptance"] == 0.1  # `radchain run --min-acceptance 0.1`
    bad = CliRunner().invoke(app, ["run", "--min-acceptance", "1.5"])
    assert bad.exit_code == 2 and "--min-acceptance must be between 0 and 1" in bad.output


def test_docs_writes_a_static_catalog_with_lineage_and_check_results(clean, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from radchain.settings import reset_settings_cache
    from warehouse import catalog

    monkeypatch.setenv("RADCHAIN_HOME", str(clean["home"]))
    reset_settings_cache()
    result = CliRunner().invoke(app, ["docs", "--out", str(tmp_path / "site")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing to fetch at view time
    assert page.count("<svg") == 1 and 'class="node" data-name="int_chains"' in page
    # Lineage edges: mine writes int_chains; datasets reads it; a view reads its tables.
    assert 'data-source="mine" data-target="int_chains"' in page
    assert 'data-source="int_chains" data-target="datasets"' in page
    assert 'data-source="audit_runs" data-target="v_runs"' in page
    for spec in catalog():
        assert f"id=table-{spec.name}>" in page
    # Column descriptions from Field(description=...), and each check's last result.
    assert "up to 5 ids of failing rows" in page
    assert "<code>int_chains.sample_id-&gt;int_vqa_samples</code>" in page
    assert "<span class=pass>passed</span>" in page
    reset_settings_cache()


def test_cli_run_that_fails_a_check_prints_one_line_and_exits_1(gated, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from radchain.settings import reset_settings_cache

    monkeypatch.setenv("RADCHAIN_HOME", str(gated["home"]))
    reset_settings_cache()
    try:
        result = CliRunner().invoke(app, ["run", "--source", str(gated["corpus"]), "--stages", "datasets"])
    finally:
        reset_settings_cache()
    assert result.exit_code == 1, result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    line = " ".join(result.stderr.split())
    assert "run failed: after stage datasets, data check fct_dataset_versions.splits_not_empty failed" in line
    assert "was not registered" in line and gated["wh"].count("fct_dataset_versions") == 0


def test_a_check_failure_survives_pickling():
    import pickle

    from flows.checks import DataCheckFailed
    from warehouse.checks import CheckOutcome, all_checks

    check = all_checks(["raw_reports"])[0]
    err = DataCheckFailed("ingest", [CheckOutcome(check, False, 2, ["a", "b"], None, 0.01)])
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is DataCheckFailed and str(back) == str(err) and back.stage == "ingest"
    assert str(err).startswith(f"after stage ingest, data check {check.name} failed (2 failing rows")


def test_each_run_published_its_checks_artifact(gated):
    """The data-checks markdown artifact of every flow run, the failed ones included, names the failing check."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["data-checks"])))
    by_run = {str(a.flow_run_id): a for a in arts}
    mined, built = (str(gated[k].state_details.flow_run_id) for k in ("mined", "built"))
    assert {str(gated["first"].state_details.flow_run_id), mined, built} <= set(by_run)
    md = by_run[mined].data
    assert "| mine | `audit_stage_counts.mine_acceptance` | error | **failed** | 1 | mine |" in md
    assert "1 errors failed, 1 warnings" in md
    assert "`fct_dataset_versions.splits_not_empty` | error | **failed**" in by_run[built].data
