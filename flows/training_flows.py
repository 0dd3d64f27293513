"""Training and evaluation jobs as Prefect flows: SFT, GRPO, evaluate, and the train DAG.

Each job is its own flow so it can be deployed to a ``gpu`` work pool (see
flows/deployments.py); ``train_flow`` chains them SFT → GRPO (from the SFT checkpoint) →
evaluate. With ``use_deployments=True`` it triggers the deployed jobs with
``run_deployment`` and waits; otherwise it calls them as subflows in this process (the
demo, and tests without a server). Either way each job records itself in
``fct_training_runs`` (or ``fct_eval_results``) under an id chosen up front, which is how
the DAG reads a job's checkpoint back after the job ran somewhere else.
"""

from __future__ import annotations

import json
import time
import traceback
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
from prefect import flow, get_run_logger

from radchain.settings import get_settings
from schemas.training import TrainingRun
from warehouse import Warehouse

VERSION = "train-v1"
# Columns the GRPO reward functions read (everything else in the mart stays out of the batch).
RL_COLUMNS = ("sample_id", "task", "prompt_json", "images", "solution", "gold_steps", "gold_labels", "weight")


def _warehouse() -> Warehouse:
    return Warehouse(get_settings().warehouse_dir).ensure()


def latest_dataset_version(wh: Warehouse) -> str:
    versions = wh.read("fct_dataset_versions")
    if versions.is_empty():
        raise ValueError("no dataset version in the warehouse; run `radchain run` (the datasets stage) first")
    return versions.sort("built_at", descending=True)["dataset_version"][0]


class NoCheckedDataset(ValueError):
    """No dataset version passed the data checks of the run that built it: training refuses to start."""


def checked_dataset_version(wh: Warehouse) -> str:
    """The newest dataset version whose checks passed (every error check of the datasets stage of the run
    that built it, in fct_check_results); logged, so a run says which version it trains on."""
    from warehouse.checks import dataset_versions_passed

    versions = dataset_versions_passed(wh)
    if versions.is_empty():
        raise NoCheckedDataset("no dataset version in the warehouse; run `radchain run` (the datasets stage) first")
    passed = versions.filter(pl.col("passed"))
    if passed.is_empty():
        newest = versions.row(0, named=True)
        why = (f"{newest['failed_errors']} error checks failed" if newest["checks"]
               else "it has no data check results (built outside a pipeline run, or before checks existed)")
        raise NoCheckedDataset(
            f"no dataset version passed its data checks: the newest, {newest['dataset_version']}, is refused "
            f"({why}); run `radchain run --stages datasets` to rebuild and check it, see `radchain check`, or "
            "name a version with --dataset-version")
    row = passed.row(0, named=True)
    skipped = versions.filter(pl.col("built_at") > row["built_at"]).height
    _log(f"training on dataset version {row['dataset_version']}, the newest whose {row['checks']} data checks "
         f"passed (built {row['built_at']:%Y-%m-%d %H:%M} by run {row['run_id']})"
         + (f"; {skipped} newer versions did not pass and were skipped" if skipped else ""))
    return row["dataset_version"]


def _log(message: str) -> None:
    try:
        get_run_logger().info(message)
    except Exception:  # outside a flow run
        import logging

        logging.getLogger("radchain.train").info(message)
    print(message, flush=True)


def _flow_run_id(default: str) -> str:
    """The Prefect flow run writing a row (its lineage run_id); ``default`` outside a flow run."""
    from prefect.runtime import flow_run

    return str(flow_run.get_id() or default)


def has_usable_images(row: dict) -> bool:
    """Every image of the row is on disk and starts like an image (a garbage .jpg would crash a trainer)."""
    from extractors.sources import looks_like_image

    return all(looks_like_image(p) for p in row["images"])


def mart_rows(wh: Warehouse, table: str, version: str, splits: tuple[str, ...] | None = ("train",),
              columns: tuple[str, ...] | None = None, limit: int | None = None,
              per_task: int | None = None, keep=None) -> tuple[list[dict], int]:
    """Rows of one dataset version whose image files exist; returns (rows, skipped for missing images).

    ``per_task`` keeps the first n rows of each task (by sample id), so a capped evaluation still
    covers every task; ``limit`` caps the total.
    """
    q = wh.scan(table).filter(pl.col("dataset_version") == version)
    if splits is not None:
        q = q.filter(pl.col("split").is_in(list(splits)))
    rows = q.sort("sample_id").collect().to_dicts()
    if keep is not None:  # a row filter applied before the caps (e.g. SFT variants)
        rows = [r for r in rows if keep(r)]
    kept = [r for r in rows if has_usable_images(r)]
    skipped = len(rows) - len(kept)
    if per_task is not None:
        taken: dict[str, int] = {}
        capped = []
        for r in kept:
            taken[r["task"]] = taken.get(r["task"], 0) + 1
            if taken[r["task"]] <= per_task:
                capped.append(r)
        kept = capped
    if limit is not None:
        kept = kept[:limit]
    if columns:
        kept = [{c: r[c] for c in columns} for r in kept]
    return kept, skipped


def _record_run(wh: Warehouse, row: dict[str, Any]) -> None:
    from radchain.build_info import code_version
    from schemas.base import Lineage

    from flows.locking import warehouse_lock

    lineage = Lineage(run_id=_flow_run_id(row["training_run_id"]), batch_id=row["training_run_id"],
                      code_version=f"{code_version()}/{VERSION}")
    with warehouse_lock(wh.root, purpose=f"{row['kind']} job {row['training_run_id']}"):  # held for the write only
        wh.write(TrainingRun, row["training_run_id"], [row], lineage)
        wh.refresh_views()


def _run_job(kind: str, training_run_id: str, config: str, version: str, rows: list[dict], skipped: int,
             init_checkpoint: str | None, job) -> dict[str, Any]:
    """Run a training job, record it (also when it fails), and return its registry row."""
    from training.config import load_config

    wh = _warehouse()
    cfg = load_config(config)
    started_at, t0 = datetime.now(UTC), time.perf_counter()
    row: dict[str, Any] = dict(
        training_run_id=training_run_id, kind=kind, config_name=cfg.name, config_json=cfg.model_dump_json(),
        dataset_version=version, init_checkpoint=init_checkpoint, n_examples=len(rows), n_skipped=skipped,
        started_at=started_at, checkpoint=None, metrics_json="{}", error=None,
    )
    out_dir = get_settings().runs_dir / kind / training_run_id
    try:
        if not rows:
            raise ValueError(f"{kind}: dataset {version} has no usable training rows (missing images?)")
        result = job(cfg, rows, out_dir)
        row.update(status=result.status, checkpoint=result.checkpoint, metrics_json=json.dumps(result.metrics, default=str))
    except Exception as e:
        row.update(status="failed", error=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"[:4000])
        raise
    finally:
        row.update(wall_s=time.perf_counter() - t0, finished_at=datetime.now(UTC))
        _record_run(wh, row)
        _publish_job(row, out_dir)
    return row


def _publish_job(row: dict[str, Any], out_dir: Path) -> None:
    """Curves and final metrics of a job as artifacts of its flow run (flows/training_artifacts.py); a
    failure to draw them is logged, never raised over the job's own outcome."""
    from flows.training_artifacts import publish_training

    try:
        published = publish_training(row, out_dir)
        get_run_logger().info("%s %s: curves %s", row["kind"], row["training_run_id"], published["chart"])
    except Exception as e:  # noqa: BLE001
        get_run_logger().warning("%s %s: could not publish its artifacts: %s: %s", row["kind"],
                                 row["training_run_id"], type(e).__name__, e)


def _this_run() -> dict[str, Any]:
    """The id and name of the flow run this code runs in (the parent `train` run links them)."""
    from prefect.runtime import flow_run

    return dict(flow_run_id=flow_run.id, flow_run_name=flow_run.name)


def _launched(kind: str, cfg, config: str, rows: list[dict], out: Path, init_checkpoint: str | None = None,
              rewards: list[tuple[str, float]] | None = None):
    """Run a job as ``accelerate launch -m training.<kind>`` (one process per GPU of this worker) on a
    JSONL export of its rows; the TrainResult the launched main process wrote (training/launch.py)."""
    from training.launch import launch_command, run_launched, write_rows

    data = write_rows(rows, out / f"{kind}_rows.jsonl")
    config_ref = str(Path(config).resolve()) if Path(config).exists() else config
    cmd = launch_command(kind, cfg.launch, config_ref, data, out, init_checkpoint, rewards or ())
    get_run_logger().info("%s: %s", kind, " ".join(cmd))
    return run_launched(cmd, out)


@flow(name="radchain-sft", log_prints=False, persist_result=False)
def sft_flow(dataset_version: str | None = None, config: str = "tiny-cpu", max_examples: int | None = None,
             training_run_id: str | None = None) -> dict[str, Any]:
    from flows.training_artifacts import TrainingProgress
    from training.config import load_config
    from training.sft import run_sft

    wh = _warehouse()
    version = dataset_version or checked_dataset_version(wh)
    variants = set(load_config(config).sft.variants)
    rows, skipped = mart_rows(wh, "mart_sft_examples", version, limit=max_examples,
                              keep=lambda r: r["variant"] in variants)

    def job(cfg, rows, out):
        if cfg.launch.mode == "accelerate":
            return _launched("sft", cfg, config, rows, out)
        return run_sft(cfg, rows, out_dir=out, callbacks=[TrainingProgress("sft")])

    row = _run_job("sft", training_run_id or f"sft-{uuid.uuid4().hex[:12]}", config, version, rows, skipped, None,
                   job)
    get_run_logger().info("SFT %s: %s, checkpoint %s", row["training_run_id"], row["status"], row["checkpoint"])
    return {**row, **_this_run()}


def reward_functions(cfg) -> tuple[list, list[float]]:
    import training.rewards as rewards

    funcs, weights = [], []
    for name, weight in cfg.rewards.items():
        fn = getattr(rewards, f"{name}_reward", None)
        if fn is None:
            raise ValueError(f"config {cfg.name}: unknown reward {name!r} (training.rewards.{name}_reward)")
        funcs.append(fn)
        weights.append(float(weight))
    return funcs, weights


@flow(name="radchain-grpo", log_prints=False, persist_result=False)
def grpo_flow(dataset_version: str | None = None, config: str = "tiny-cpu", init_checkpoint: str | None = None,
              max_prompts: int | None = None, training_run_id: str | None = None) -> dict[str, Any]:
    from flows.training_artifacts import TrainingProgress
    from training.grpo import run_grpo

    wh = _warehouse()
    version = dataset_version or checked_dataset_version(wh)
    rows, skipped = mart_rows(wh, "mart_rl_prompts", version, columns=RL_COLUMNS, limit=max_prompts)

    def job(cfg, rows, out):
        funcs, weights = reward_functions(cfg)
        if cfg.launch.mode == "accelerate":
            # The launched processes resolve the same names: training.rewards.<name>_reward.
            specs = [(f"training.rewards:{name}_reward", w) for name, w in zip(cfg.rewards, weights, strict=True)]
            return _launched("grpo", cfg, config, rows, out, init_checkpoint, specs)
        return run_grpo(cfg, rows, funcs, weights, out_dir=out, init_checkpoint=init_checkpoint,
                        callbacks=[TrainingProgress("grpo")])

    def trained_then_compared(cfg, rows, out):
        result = job(cfg, rows, out)
        if result.status == "completed":
            result.metrics["selection"] = _select_checkpoint(wh, version, cfg, init_checkpoint, result.checkpoint)
        return result

    row = _run_job("grpo", training_run_id or f"grpo-{uuid.uuid4().hex[:12]}", config, version, rows, skipped,
                   init_checkpoint, trained_then_compared)
    get_run_logger().info("GRPO %s: %s, checkpoint %s", row["training_run_id"], row["status"], row["checkpoint"])
    return {**row, **_this_run()}


def _select_checkpoint(wh: Warehouse, version: str, cfg, start: str | None, trained: str) -> dict[str, Any]:
    """The checkpoint evaluation should get, GRPO's or its SFT start's (training/selection.py), as the
    ``selection`` entry of the GRPO run's metrics_json; train_flow reads it back from fct_training_runs."""
    from training.selection import compare_on_validate, keep_trained

    log = get_run_logger()
    if not cfg.selection.enabled:
        choice = keep_trained("selection is off in the config", trained)
    elif start is None:
        choice = keep_trained("GRPO started from the base model, not an SFT checkpoint", trained)
    else:
        rows, skipped = mart_rows(wh, "mart_rl_prompts", version, splits=("validate",), columns=RL_COLUMNS,
                                  per_task=cfg.selection.max_per_task)
        log.info("comparing GRPO with its SFT start: greedy answers to %d validate prompts each (%d skipped: "
                 "an image missing)", len(rows), skipped)
        funcs, weights = reward_functions(cfg)
        try:
            choice = compare_on_validate(start, trained, rows, funcs, weights, cfg.grpo.max_completion_length)
        except Exception as e:  # noqa: BLE001 - the trained checkpoint stands; the reason says why
            log.warning("could not compare GRPO with its SFT start: %s: %s", type(e).__name__, e)
            choice = keep_trained(f"the comparison failed: {type(e).__name__}: {e}"[:300], trained)
    log.info("%s", choice.describe())
    return choice.to_dict()


@flow(name="radchain-evaluate", log_prints=False, persist_result=False)
def evaluate_flow(checkpoint: str, dataset_version: str | None = None, max_per_task: int | None = None,
                  max_new_tokens: int | None = None, model_name: str | None = None,
                  config: str = "tiny-cpu") -> dict[str, Any]:
    """Generate on mart_benchmark with a checkpoint; score accuracy, RadRScore and format compliance per
    task beside the majority, random and oracle baselines (all in fct_eval_results).

    ``max_new_tokens``: None takes the config's ``grpo.max_completion_length``, the length the policy
    was trained to answer in (a shorter budget cuts chains before their <answer>).
    """
    from flows.evaluation import EXPLANATION, publish_eval, score_line, score_with_baselines
    from training.baselines import majority_answers
    from training.config import load_config
    from training.generate import generate

    from flows.progress import StageProgress

    wh = _warehouse()
    log = get_run_logger()
    cfg = load_config(config)
    budget = max_new_tokens or cfg.grpo.max_completion_length
    version = dataset_version or latest_dataset_version(wh)
    rows, skipped = mart_rows(wh, "mart_benchmark", version, splits=None, per_task=max_per_task)
    if not rows:
        raise ValueError(f"dataset {version} has no benchmark rows with images to evaluate")
    tasks = {r["task"] for r in rows}
    log.info("evaluation of %s on %s: generating for %d benchmark samples of %d tasks (%d skipped: no image), "
             "%d new tokens", checkpoint, version, len(rows), len(tasks), skipped, budget)
    progress = StageProgress("evaluate", len(rows), unit="benchmark samples")
    t0 = time.perf_counter()
    try:
        outputs = generate(checkpoint, rows, max_new_tokens=budget, progress=progress)
    finally:
        progress.close()
    log.info("generated %d outputs in %.1f s; scoring the model and the majority, random and oracle baselines",
             len(outputs), time.perf_counter() - t0)
    out_dir = get_settings().runs_dir / "eval" / f"{Path(checkpoint).parent.name}-{version}"
    train_answers = (wh.scan("mart_rl_prompts").filter((pl.col("dataset_version") == version)
                                                       & (pl.col("split") == "train"))
                     .select("task", "solution").collect().to_dicts())
    from flows.locking import warehouse_lock

    with warehouse_lock(wh.root, purpose="evaluation: writing fct_eval_results"):
        eval_id, scored = score_with_baselines(
            wh, rows, outputs, out_dir, model=model_name or Path(checkpoint).parent.name, checkpoint=checkpoint,
            majority=majority_answers(train_answers), seed=get_settings().seed)
    for r in scored["model"]:
        log.info("%s", score_line(r))
    chart = publish_eval(scored, out_dir / "eval.png", key="eval-results",
                         title=f"{model_name or Path(checkpoint).parent.name} on {version}")
    log.info("evaluation %s: chart %s. %s", eval_id, chart, EXPLANATION)
    return dict(eval_id=eval_id, predictions=str(out_dir / "predictions.jsonl"), chart=str(chart), n=len(rows),
                skipped=skipped, max_new_tokens=budget, results=scored["model"], baselines=scored, **_this_run())


def _run_job_deployment(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """Run a job's deployment and wait; its flow run's id and name (the summary links them)."""
    from prefect.deployments import run_deployment

    fr = run_deployment(name=name, parameters=parameters, timeout=None)
    if not fr.state or not fr.state.is_completed():
        raise RuntimeError(f"deployment {name} ended {fr.state.type if fr.state else 'without a state'}")
    return dict(flow_run_id=fr.id, flow_run_name=fr.name)


def _registry_row(training_run_id: str) -> dict[str, Any]:
    runs = _warehouse().read("fct_training_runs").filter(pl.col("training_run_id") == training_run_id)
    if runs.is_empty():
        raise RuntimeError(f"training run {training_run_id} left no row in fct_training_runs")
    return runs.to_dicts()[0]


@flow(name="radchain-train", log_prints=False, persist_result=False)
def train_flow(dataset_version: str | None = None, config: str = "tiny-cpu", use_deployments: bool = False,
               max_examples: int | None = None, max_eval_per_task: int | None = None,
               max_new_tokens: int | None = None) -> dict[str, Any]:
    """SFT → GRPO from the SFT checkpoint → evaluate, as separate jobs. Evaluation gets the checkpoint
    GRPO's job chose on the validate split: its own, or its SFT start where that answers better
    (config ``selection``, training/selection.py)."""
    version = dataset_version or checked_dataset_version(_warehouse())
    sft_id, grpo_id = f"sft-{uuid.uuid4().hex[:12]}", f"grpo-{uuid.uuid4().hex[:12]}"

    # What the operator sees: a ``train-summary`` artifact on this run links each job's flow run and its
    # artifacts (curves, metrics, evaluation), written also when a job fails.
    from flows.training_artifacts import headline_figure, publish_train_summary

    jobs: list[dict[str, Any]] = []

    def record(kind: str, run: dict[str, Any], row: dict[str, Any] | None) -> None:
        job = dict(kind=kind, flow_run_id=run.get("flow_run_id"), flow_run_name=run.get("flow_run_name"))
        if row is not None:
            job.update(status=row["status"], checkpoint=row["checkpoint"], headline=headline_figure(row))
        jobs.append(job)

    try:
        sft_params = dict(dataset_version=version, config=config, max_examples=max_examples, training_run_id=sft_id)
        run = _run_job_deployment("radchain-sft/sft", sft_params) if use_deployments else sft_flow(**sft_params)
        sft = _registry_row(sft_id)
        record("sft", run, sft)
        grpo_params = dict(dataset_version=version, config=config, init_checkpoint=sft["checkpoint"],
                           max_prompts=max_examples, training_run_id=grpo_id)
        run = _run_job_deployment("radchain-grpo/grpo", grpo_params) if use_deployments else grpo_flow(**grpo_params)
        grpo = _registry_row(grpo_id)
        record("grpo", run, grpo)
        # GRPO's job compared its checkpoint with its SFT start on the validate split (training/selection.py)
        selection = json.loads(grpo["metrics_json"] or "{}").get("selection") or {}
        chosen = selection.get("checkpoint") or grpo["checkpoint"]
        eval_params = dict(checkpoint=chosen, dataset_version=version, max_per_task=max_eval_per_task,
                           max_new_tokens=max_new_tokens, config=config)
        if use_deployments:
            run, evaluation = _run_job_deployment("radchain-evaluate/evaluate", eval_params), None
        else:
            run = evaluation = evaluate_flow(**eval_params)
        # its headline is read from its eval-results artifact (the same whether it ran here or on a worker)
        jobs.append(dict(kind="evaluate", flow_run_id=run.get("flow_run_id"), flow_run_name=run.get("flow_run_name"),
                         status="completed", checkpoint=chosen))
    finally:
        if jobs:
            try:
                publish_train_summary(version, jobs)
            except Exception as e:  # noqa: BLE001 - the summary never hides the jobs' own outcome
                get_run_logger().warning("could not publish the train summary: %s: %s", type(e).__name__, e)
    return dict(dataset_version=version, sft=sft, grpo=grpo, evaluated_checkpoint=chosen, selection=selection,
                evaluation=evaluation, runs={j["kind"]: j["flow_run_id"] for j in jobs}, **_this_run())
