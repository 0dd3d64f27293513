"""The whole data DAG through the real Prefect flow on a synthetic MIMIC corpus, then training.

One warehouse is built per module (the flow runs once; the re-run and training reuse it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import polars as pl
import pytest

from flows.stages.common import SourceSpec

DATA_TABLES = ("raw_reports", "stg_sections", "stg_studies", "stg_images", "int_labels", "int_vqa_samples",
               "int_chains", "int_chain_steps", "mart_sft_examples", "mart_rl_prompts", "mart_benchmark",
               "fct_dataset_versions", "audit_stage_counts", "fct_materializations")


def _row_hash(wh, table: str) -> str:
    """Order-independent hash of a table's rows; lineage and wall-clock columns excluded (they name the run)."""
    df = wh.read(table).drop("run_id", "batch_id", "code_version", "built_at", strict=False)
    rows = sorted(json.dumps(r, sort_keys=True, default=str) for r in df.to_dicts())
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import os

    from extractors.synthetic import generate_corpus
    from radchain.settings import get_settings, reset_settings_cache

    home = tmp_path_factory.mktemp("e2e-home")
    old = os.environ.get("RADCHAIN_HOME")
    os.environ["RADCHAIN_HOME"] = str(home)
    reset_settings_cache()
    corpus = tmp_path_factory.mktemp("corpus")
    generate_corpus(corpus, studies=160, seed=5)

    from flows.pipeline import pipeline_flow
    from warehouse import Warehouse

    results = pipeline_flow(source=SourceSpec(path=corpus), options={"show_progress": False})
    wh = Warehouse(get_settings().warehouse_dir)
    yield dict(wh=wh, results=results, corpus=corpus, home=home)
    if old is None:
        os.environ.pop("RADCHAIN_HOME", None)
    else:
        os.environ["RADCHAIN_HOME"] = old
    reset_settings_cache()


def test_every_stage_fills_its_tables_and_balances(built):
    wh = built["wh"]
    for table in DATA_TABLES:
        assert wh.count(table) > 0, f"{table} is empty"
    counts = wh.sql("select stage, sum(inputs) i, sum(outputs) o, sum(rejected) r, sum(skipped) s "
                    "from audit_stage_counts group by stage").to_pylist()
    assert {c["stage"] for c in counts} == {"ingest", "label", "tasks", "mine", "datasets"}
    for c in counts:
        assert c["i"] == c["o"] + c["r"] + c["s"], c
    rejected = wh.sql("select count(*) n from int_rejections").to_pylist()[0]["n"]
    assert rejected == sum(c["r"] for c in counts)


def test_rule_backend_accepts_at_least_90_percent_of_samples(built):
    wh = built["wh"]
    n_samples = wh.count("int_vqa_samples")
    n_chains = wh.count("int_chains")
    assert n_chains >= 0.9 * n_samples
    # every accepted chain's evidence points at the report text exactly
    rows = wh.sql("""
        select r.text, e.quote, e."start", e."end"
        from (select sample_id, unnest(evidence) as e from int_chain_steps) s
        join int_vqa_samples v using (sample_id) join raw_reports r on r.study_id = v.study_id
        where v.task <> 'temporal'
    """).to_pylist()
    assert rows
    for r in rows:
        assert r["text"][r["start"]:r["end"]] == r["quote"]


def test_all_five_tasks_and_no_test_sample_in_training_marts(built):
    wh = built["wh"]
    tasks = {r["task"] for r in wh.sql("select distinct task from int_vqa_samples").to_pylist()}
    assert tasks == {"binary", "single", "multi", "open", "temporal"}
    leaked = wh.sql("""
        select count(*) n from (select sample_id from mart_sft_examples union all select sample_id from mart_rl_prompts) t
        join int_vqa_samples s using (sample_id) where s.split = 'test'
    """).to_pylist()[0]["n"]
    assert leaked == 0
    bench_splits = wh.sql("select distinct s.split from mart_benchmark b join int_vqa_samples s using (sample_id)")
    assert bench_splits.to_pylist() == [{"split": "test"}]


def test_rerun_is_idempotent(built):
    from flows.pipeline import pipeline_flow

    wh = built["wh"]
    before = {t: _row_hash(wh, t) for t in DATA_TABLES if t not in ("audit_stage_counts", "fct_materializations")}
    version = wh.read("fct_dataset_versions")["dataset_version"].to_list()
    pipeline_flow(source=SourceSpec(path=built["corpus"]), options={"show_progress": False})
    after = {t: _row_hash(wh, t) for t in before}
    assert after == before
    assert wh.read("fct_dataset_versions")["dataset_version"].to_list() == version


def test_exports_are_readable_by_their_consumers(built, tmp_path):
    from datasets import load_from_disk

    from flows.training_flows import latest_dataset_version
    from warehouse.exports import export_dataset

    wh = built["wh"]
    v = latest_dataset_version(wh)
    counts = export_dataset(wh, v, "hf", tmp_path)
    sft = load_from_disk(str(tmp_path / v / "hf" / "sft"))
    assert len(sft) == counts["sft"] and sft[0]["messages"][0]["role"] == "user"
    export_dataset(wh, v, "verl", tmp_path)
    train = pl.read_parquet(tmp_path / v / "verl" / "train.parquet")
    assert train.height == counts["rl"]
    assert {"prompt", "images", "reward_model", "extra_info", "problem", "answer"} <= set(train.columns)
    export_dataset(wh, v, "jsonl", tmp_path)
    first = json.loads((tmp_path / v / "jsonl" / "rl.jsonl").read_text().splitlines()[0])
    assert first["prompt"][0]["content"][-1]["type"] == "text" and first["solution"]


def test_train_dag_sft_grpo_evaluate_records_runs_and_results(built):
    """SFT → GRPO (from the SFT checkpoint) → evaluate on the tiny config, from the marts."""
    from flows.training_flows import train_flow

    wh = built["wh"]
    out = train_flow(max_examples=8, max_eval_per_task=2)
    runs = wh.read("fct_training_runs").sort("kind", descending=True)
    assert runs["kind"].to_list() == ["sft", "grpo"]
    assert runs["status"].to_list() == ["completed", "completed"]
    grpo = runs.filter(pl.col("kind") == "grpo").to_dicts()[0]
    sft = runs.filter(pl.col("kind") == "sft").to_dicts()[0]
    assert grpo["init_checkpoint"] == sft["checkpoint"] and Path(grpo["checkpoint"]).is_dir()
    # Lineage: run_id is the Prefect flow run of each job (a UUID), not the job's own id.
    import uuid

    for r in (sft, grpo):
        assert uuid.UUID(r["run_id"]) and r["run_id"] != r["training_run_id"]
    assert sft["run_id"] != grpo["run_id"]
    # It trained on the newest version whose checks passed in the run that built it.
    passed = wh.sql("SELECT v.dataset_version FROM fct_dataset_versions v JOIN fct_check_results c "
                    "ON c.run_id = v.run_id AND c.dataset_version = v.dataset_version "
                    "GROUP BY ALL HAVING bool_and(c.passed OR c.severity = 'warn')").to_pylist()
    assert [p["dataset_version"] for p in passed] == [out["dataset_version"]] == [grpo["dataset_version"]]
    assert json.loads(grpo["metrics_json"])["reward_names"] == ["outcome_reward", "format_reward", "process_reward"]
    # GRPO's job compared its checkpoint with its SFT start on the validate split (tiny-cpu: up to 4
    # prompts per task) and evaluation got the one with the higher greedy reward, as SQL reads it.
    version = out["dataset_version"]
    (expected_n,) = wh.sql(f"SELECT sum(least(n, 4))::INT AS n FROM (SELECT task, count(*) AS n FROM mart_rl_prompts "
                           f"WHERE split = 'validate' AND dataset_version = '{version}' GROUP BY task)").to_pylist()
    (chosen,) = wh.sql("SELECT metrics_json->>'$.selection.chosen' AS chosen, "
                       "(metrics_json->>'$.selection.n')::INT AS n FROM fct_training_runs "
                       "WHERE kind = 'grpo'").to_pylist()
    assert chosen["n"] == expected_n["n"] > 0
    selection = out["selection"]
    assert chosen["chosen"] == selection["chosen"] == (
        "sft" if selection["reward_grpo"] < selection["reward_sft"] else "grpo")
    assert out["evaluated_checkpoint"] == {"sft": sft["checkpoint"], "grpo": grpo["checkpoint"]}[selection["chosen"]]
    evaluation = out["evaluation"]
    assert evaluation["max_new_tokens"] == 12  # tiny-cpu's grpo.max_completion_length, not a constant
    results = wh.read("fct_eval_results").filter(pl.col("eval_id") == evaluation["eval_id"])
    (eval_run,) = set(results["run_id"])
    assert uuid.UUID(eval_run) and eval_run not in (sft["run_id"], grpo["run_id"])  # the evaluate flow run
    assert set(wh.read("fct_predictions").filter(pl.col("eval_id") == evaluation["eval_id"])["run_id"]) == {eval_run}
    assert set(results["task"]) == {"binary", "single", "multi", "open", "temporal", "all"}
    assert results["baseline"].is_null().all() and results["format_compliance"].is_not_null().all()
    assert set(results["checkpoint"]) == {out["evaluated_checkpoint"]}
    assert Path(evaluation["chart"]).stat().st_size > 1000
    # The baselines sit beside the model in the same table, scored on the same samples.
    baselines = wh.read("fct_eval_results").filter(pl.col("baseline_of") == evaluation["eval_id"])
    assert sorted(set(baselines["baseline"])) == ["majority", "oracle", "random"]
    by = {(r["baseline"], r["task"]): r for r in baselines.to_dicts()}
    model_all = results.filter(pl.col("task") == "all").to_dicts()[0]
    for kind in ("majority", "random", "oracle"):
        assert by[(kind, "all")]["n"] == model_all["n"]
    assert by[("oracle", "all")]["accuracy"] == 1.0 and by[("oracle", "all")]["format_compliance"] == 1.0
    assert by[("majority", "all")]["n_unparseable"] == model_all["n"]  # no reasoning, by construction
    # The majority answer of a binary question is the training set's most common letter.
    train = wh.read("mart_rl_prompts").filter((pl.col("task") == "binary") & (pl.col("split") == "train"))
    counts = train["solution"].value_counts().sort(["count", "solution"], descending=[True, False])
    preds = Path(evaluation["predictions"]).with_name("baseline-majority.jsonl").read_text().splitlines()
    assert f"<answer>{counts['solution'][0]}</answer>" in {json.loads(line)["output"] for line in preds}
    _assert_training_artifacts(out)


def _assert_training_artifacts(out):
    """What the operator sees: each job's run holds its curves, metrics and progress; the evaluation's its
    progress and per-score counts; the parent run a summary that links them (artifacts read back from the API)."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    runs = {k: str(v) for k, v in out["runs"].items()}  # job -> its flow run id
    assert set(runs) == {"sft", "grpo", "evaluate"} and runs["evaluate"] == out["evaluation"]["flow_run_id"]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[*runs.values(), str(out["flow_run_id"])])))
    by_run: dict = {}
    for a in arts:
        by_run.setdefault(str(a.flow_run_id), {})[a.key] = a
    for kind in ("sft", "grpo"):
        mine = by_run[runs[kind]]
        assert {f"{kind}-curves", f"{kind}-metrics", f"{kind}-progress"} <= set(mine), sorted(mine)
        assert "data:image/png;base64," in mine[f"{kind}-curves"].data
        metrics = {r["metric"]: r["value"] for r in json.loads(mine[f"{kind}-metrics"].data)}
        assert metrics["status"] == "completed" and metrics["steps"] == {"sft": "2", "grpo": "1"}[kind]
        assert mine[f"{kind}-progress"].data == 100.0
    evaluation = by_run[runs["evaluate"]]
    assert evaluation["evaluate-progress"].data == 100.0
    table = json.loads(evaluation["eval-results"].data)
    model_all = next(r for r in table if r["series"] == "model" and r["task"] == "all")
    assert model_all["n"] == out["evaluation"]["n"] and "n_unparseable" in model_all
    assert model_all["accuracy_n"] == model_all["n"]
    assert f"n={model_all['n']}, {model_all['n_unparseable']} unparseable" in evaluation["eval-results-chart"].data
    summary = by_run[str(out["flow_run_id"])]["train-summary"].data
    for kind, run_id in runs.items():
        assert f"/runs/flow-run/{run_id})" in summary
    eval_line = next(line for line in summary.splitlines() if line.startswith("| evaluate |"))
    assert f"over {model_all['n']}, {model_all['n_unparseable']} unparseable |" in eval_line
    assert eval_line.endswith(f"`{out['evaluated_checkpoint']}` |")
    grpo_line = next(line for line in summary.splitlines() if line.startswith("| grpo |"))
    assert f"evaluating the {out['selection']['chosen'].upper()} checkpoint: greedy reward on " in grpo_line
    for key in ("sft-curves", "sft-metrics", "grpo-curves", "eval-results"):
        art = next(a for a in arts if a.key == key)
        assert f"[{key}](" in summary and f"/artifacts/artifact/{art.id})" in summary


def _tiny_config_with(path: Path, **sections) -> str:
    """configs/tiny-cpu.yaml with some top-level sections replaced, written to ``path`` (the key order,
    and so the reward order, stays the config's)."""
    import yaml

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/tiny-cpu.yaml").read_text())
    path.write_text(yaml.safe_dump({**data, **sections}, sort_keys=False))
    return str(path)


def test_sft_and_grpo_jobs_launched_with_accelerate_are_recorded(built, tmp_path):
    """The GPU path on a CPU: the jobs run `accelerate launch -m training.sft|grpo` (one process, --cpu)
    on a JSONL export of their rows, and the flow records what the launched job wrote."""
    from flows.training_flows import grpo_flow, sft_flow

    wh = built["wh"]
    config = _tiny_config_with(tmp_path / "tiny-launched.yaml", name="tiny-cpu-launched",
                               launch={"mode": "accelerate", "num_processes": 1, "cpu": True})

    sft = sft_flow(config=config, max_examples=4)
    assert sft["status"] == "completed", sft["error"]
    metrics = json.loads(sft["metrics_json"])
    command = metrics["launch"]["command"]
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and "--cpu" in command
    assert command[command.index("-m", 3) + 1] == "training.sft"
    assert metrics["steps"] == 2 and [e["step"] for e in metrics["curve"]] == [1, 2]
    assert (Path(sft["checkpoint"]) / "model.safetensors").exists()

    grpo = grpo_flow(config=config, init_checkpoint=sft["checkpoint"], max_prompts=2)
    assert grpo["status"] == "completed", grpo["error"]
    gm = json.loads(grpo["metrics_json"])
    assert gm["reward_names"] == ["outcome_reward", "format_reward", "process_reward"]
    assert gm["model_source"] == f"checkpoint:{sft['checkpoint']}"
    runs = wh.read("fct_training_runs").filter(pl.col("config_name") == "tiny-cpu-launched")
    assert sorted(runs["kind"].to_list()) == ["grpo", "sft"] and set(runs["status"]) == {"completed"}
    # The launched checkpoint is compared with its SFT start here, after the launch, like one trained in process.
    assert gm["selection"]["n"] > 0 and gm["selection"]["checkpoint"] in (grpo["checkpoint"], sft["checkpoint"])


def test_a_failed_comparison_keeps_the_grpo_checkpoint_and_says_why(built, monkeypatch):
    import training.selection
    from flows.training_flows import grpo_flow

    def out_of_memory(*args, **kwargs):  # what a GPU worker's generate() can raise mid-comparison
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(training.selection, "compare_on_validate", out_of_memory)
    sft = built["wh"].read("fct_training_runs").filter(pl.col("kind") == "sft")
    if sft.is_empty():  # run alone (-k): the comparison needs an SFT start
        from flows.training_flows import sft_flow

        sft = pl.DataFrame([sft_flow(max_examples=4)])
    grpo = grpo_flow(init_checkpoint=sft["checkpoint"][0], max_prompts=2)
    assert grpo["status"] == "completed"  # the trained checkpoint stands
    selection = json.loads(grpo["metrics_json"])["selection"]
    assert (selection["chosen"], selection["checkpoint"]) == ("grpo", grpo["checkpoint"])
    assert selection["reason"] == "the comparison failed: RuntimeError: CUDA out of memory"


def test_selection_turned_off_hands_evaluation_the_grpo_checkpoint(built, tmp_path):
    from flows.training_flows import grpo_flow

    config = _tiny_config_with(tmp_path / "tiny-no-selection.yaml", selection={"enabled": False})
    sft = built["wh"].read("fct_training_runs").filter(pl.col("kind") == "sft")
    start = sft["checkpoint"][0] if not sft.is_empty() else None
    grpo = grpo_flow(config=config, init_checkpoint=start, max_prompts=2)
    selection = json.loads(grpo["metrics_json"])["selection"]
    assert selection == {"chosen": "grpo", "checkpoint": grpo["checkpoint"], "reason": "selection is off in the config",
                         "n": 0, "reward_sft": None, "reward_grpo": None, "rise": None, "se": None, "t": None}


def test_evaluate_command_prints_the_model_beside_its_baselines_and_what_the_bars_are(built):
    """`radchain evaluate` on the checkpoint the train DAG left: the table holds the model and the three
    baselines per task, and the output says what the chart's bars are."""
    from typer.testing import CliRunner

    from flows.cli import app

    runs = built["wh"].read("fct_training_runs").filter((pl.col("kind") == "grpo") & (pl.col("status") == "completed"))
    if runs.is_empty():  # run alone (-k): train one first
        from flows.training_flows import train_flow

        checkpoint = train_flow(max_examples=4, max_eval_per_task=1)["grpo"]["checkpoint"]
    else:
        checkpoint = runs.sort("finished_at")["checkpoint"][-1]
    result = CliRunner().invoke(app, ["evaluate", "--checkpoint", checkpoint, "--max-per-task", "2",
                                      "--config", "tiny-cpu"])
    assert result.exit_code == 0, result.output
    text = result.output
    for series in ("model", "majority", "random", "oracle"):
        assert series in text
    assert "12 new tokens" in text  # tiny-cpu's grpo.max_completion_length
    assert "ceiling of this scorer" in " ".join(text.split())  # rich wraps the explanation
    assert any(line.startswith("chart: ") and line.endswith("eval.png") for line in text.splitlines())
