"""Scoring a prediction file into fct_eval_results beside its baselines, and the eval chart + Prefect artifacts.

Every evaluation scores the model's outputs and three baselines on the same samples with the same scorer
(training/baselines.py): the majority training answer per task, a random option, and the gold chain
(oracle). The chart puts them side by side, so a bar means something: above majority and random means
the model read the image; the oracle bar is the ceiling of this scorer.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from warehouse import Warehouse

SCORE_VERSION = "score-v1"  # code_version of the rows a scoring writes
COMPONENTS = ("accuracy", "completeness", "factuality", "effectiveness", "radrscore")
CHART_METRICS = (("accuracy", "accuracy (letter match; open task: set F1)"),
                 ("radrscore", "RadRScore (reasoning vs gold chain, rules judge)"),
                 ("format_compliance", "format compliance (<think>…</think><answer>…</answer>)"))
EXPLANATION = (
    "Bars per task (and 'all'): the model next to three baselines scored by the same scorer on the same "
    "benchmark samples. majority = the most common training answer of the task, no reasoning; random = a "
    "random option letter (open task: 1-3 random findings), no reasoning; oracle = the gold chain and "
    "answer, the ceiling of this scorer. Majority and random have no <think> block, so their RadRScore and "
    "format compliance are 0 by construction. A model above majority and random on accuracy has learned "
    "something the label prior does not give; n and unparseable outputs per task are in the table."
)


def score_file(
    predictions: Path,
    *,
    model: str | None = None,
    checkpoint: str | None = None,
    judge: str = "rules",
    semantic: bool = False,
    write: bool = True,
    settings: Any = None,
    baseline: str | None = None,
    baseline_of: str | None = None,
) -> tuple[str, Any]:
    """Score a predictions JSONL against the warehouse gold; write the eval tables when ``write``.

    Returns (eval_id, training.radrscore.ScoreReport with ``format_compliance``). The scoring is
    training/scoring.py (plain code); here the gold is read, the LLM judge run if asked, and the rows
    written. Used by `radchain score` and the evaluation job, which also scores the baselines
    (``baseline`` names one, ``baseline_of`` the model evaluation it stands beside). Raises
    ValueError on unusable input (training.scoring.PredictionsError for the file itself).
    """
    return score_file_rows(predictions, model=model, checkpoint=checkpoint, judge=judge, semantic=semantic,
                           write=write, settings=settings, baseline=baseline, baseline_of=baseline_of)[:2]


def score_file_rows(predictions: Path, *, model: str | None = None, checkpoint: str | None = None,
                    judge: str = "rules", semantic: bool = False, write: bool = True, settings: Any = None,
                    baseline: str | None = None, baseline_of: str | None = None) -> tuple[str, Any, Any]:
    """``score_file`` that also returns the training.scoring.ScoredFile (per-task rows with score counts)."""
    from radchain.runtime import prepare_environment
    from training.scoring import JUDGES, read_predictions, score_records

    settings = settings or prepare_environment()
    if judge not in JUDGES:
        raise ValueError("--judge must be rules or llm")
    records, file_model = read_predictions(predictions)
    wh, gold = load_gold(settings, records)
    reasoning_scores, judge_failures, llm_calls = None, 0, []
    if judge == "llm":
        reasoning_scores, judge_failures, llm_calls = llm_scores(settings, records, gold)
    scored = score_records(records, gold, predictions, model=model or file_model or predictions.stem,
                           checkpoint=checkpoint, judge=judge, semantic=semantic, reasoning_scores=reasoning_scores,
                           judge_failures=judge_failures)
    if write:
        _write(wh, scored, llm_calls, baseline, baseline_of)
    return scored.eval_id, scored.report, scored


def load_gold(settings: Any, records: list[dict[str, Any]]) -> tuple[Warehouse, dict[str, Any]]:
    """The warehouse and the gold references of the records' samples."""
    from training.radrscore import gold_from_rows
    from warehouse.eval_store import count_samples, read_gold_rows

    wh = Warehouse(settings.warehouse_dir)
    if count_samples(wh) == 0:
        raise ValueError(f"no VQA samples in the warehouse at {wh.root}; run `radchain run` first")
    wh.ensure()
    samples, steps, labels = read_gold_rows(wh, (r["sample_id"] for r in records))
    return wh, gold_from_rows(samples, steps, labels)


def llm_scores(settings: Any, records: list[dict[str, Any]], gold: dict[str, Any]) -> tuple[dict, int, list]:
    """LLM-judge scores of the known samples: (scores by sample id, failures, int_llm_calls rows)."""
    if not settings.llm.base_url and settings.llm.api_key is None:
        raise ValueError("the llm judge needs an endpoint: set OPENAI_BASE_URL (and OPENAI_API_KEY for a hosted API)")
    import asyncio

    from extractors.llm.client import LLMClient
    from extractors.phi import PhiGuard
    from radchain.secrets import with_api_key
    from training.answers import completion_text, parse_output
    from training.judge_llm import JudgeItem, LLMJudge
    from warehouse.llm_cache import SQLiteResponseCache

    llm = with_api_key(settings.llm)  # from the environment or a Prefect Secret block, as for mining
    # Judge prompts quote the reference chain (report sentences) and the model's reasoning: a request
    # the PHI guard flags is not sent, and that sample counts as a judge failure (the rules judge scores it).
    guard = PhiGuard.from_settings(llm)

    items, seen = [], set()
    for r in records:
        ref = gold.get(r["sample_id"])
        if ref is None or ref.sample_id in seen:
            continue
        seen.add(ref.sample_id)
        items.append(JudgeItem(ref.sample_id, parse_output(completion_text(r.get("output"))).think, ref.chain,
                               ref.labels))

    async def run() -> list:
        with SQLiteResponseCache.from_settings(settings) as cache:
            async with LLMClient(llm, cache=cache, request_guard=guard) as client:
                return await LLMJudge(client).judge_many(items)

    outcomes = asyncio.run(run())
    scores = {o.sample_id: o.score for o in outcomes if o.score is not None}
    calls = [c for o in outcomes for c in o.llm_calls]
    return scores, sum(o.score is None for o in outcomes), calls


def _write(wh: Warehouse, scored: Any, llm_calls: list[dict[str, Any]], baseline: str | None,
           baseline_of: str | None) -> None:
    from datetime import UTC, datetime

    from radchain.build_info import code_version
    from schemas.base import Lineage
    from schemas.llm import LlmCall
    from warehouse.eval_store import write_eval

    from prefect.runtime import flow_run

    # The Prefect flow run that scored (evaluate_flow); `radchain score` outside a flow keeps score-<eval_id>.
    lineage = Lineage(run_id=str(flow_run.get_id() or f"score-{scored.eval_id}"), batch_id=scored.eval_id,
                      code_version=f"{code_version()}/{SCORE_VERSION}")
    write_eval(wh, scored.eval_id, scored.result_rows(datetime.now(UTC), baseline, baseline_of),
               scored.prediction_rows(), lineage)
    if llm_calls:
        wh.write(LlmCall, f"judge-{scored.eval_id}", llm_calls, lineage)


def score_outputs(wh: Warehouse, predictions: Path, model: str, checkpoint: str | None,
                  judge: str = "rules", baseline: str | None = None, baseline_of: str | None = None,
                  write: bool = True) -> tuple[str, list[dict[str, Any]]]:
    """Score one predictions file for the evaluation job and write it; per-task rows with
    ``format_compliance`` and ``<score>_n`` (the samples behind each score)."""
    eval_id, _, scored = score_file_rows(predictions, model=model, checkpoint=checkpoint, judge=judge, write=write,
                                         baseline=baseline, baseline_of=baseline_of)
    return eval_id, scored.task_rows()


def write_predictions(path: Path, rows: Sequence[Mapping[str, Any]], outputs: Sequence[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for r, o in zip(rows, outputs, strict=True):
            fh.write(json.dumps({"sample_id": r["sample_id"], "output": o}) + "\n")
    return path


def score_with_baselines(wh: Warehouse, rows: Sequence[Mapping[str, Any]], outputs: Sequence[str], out_dir: Path,
                         model: str, checkpoint: str | None, majority: Mapping[str, str], seed: int = 13,
                         write: bool = True) -> tuple[str, dict[str, list[dict[str, Any]]]]:
    """Score the model's outputs and the three baselines on ``rows``; returns (model eval_id,
    {"model": per-task rows, "majority": ..., "random": ..., "oracle": ...})."""
    from training.baselines import BASELINES, baseline_outputs

    preds = write_predictions(out_dir / "predictions.jsonl", rows, outputs)
    eval_id, results = score_outputs(wh, preds, model=model, checkpoint=checkpoint, write=write)
    scored = {"model": results}
    for kind in BASELINES:
        path = write_predictions(out_dir / f"baseline-{kind}.jsonl", rows,
                                 baseline_outputs(kind, rows, majority, seed=seed))
        _, scored[kind] = score_outputs(wh, path, model=f"baseline:{kind}", checkpoint=None, baseline=kind,
                                        baseline_of=eval_id, write=write)
    return eval_id, scored


def render_chart(scored: Mapping[str, list[dict[str, Any]]], path: Path, title: str = "Evaluation") -> Path:
    """One panel per metric (accuracy, RadRScore, format compliance): per task, a bar for the model and
    each baseline, with its value printed on it; a zero is drawn as an outlined stub so it stays visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flows.artifacts import save_figure

    series = list(scored)
    tasks = [r["task"] for r in scored[series[0]]]
    colors = {"model": "#1f77b4", "majority": "#ff7f0e", "random": "#7f7f7f", "oracle": "#2ca02c"}
    fig, axes = plt.subplots(len(CHART_METRICS), 1, figsize=(max(7, 1.6 * len(tasks)), 3.0 * len(CHART_METRICS)),
                             dpi=100, sharex=True)
    width = 0.8 / len(series)
    stub = 0.015
    for ax, (metric, label) in zip(axes, CHART_METRICS):
        for i, name in enumerate(series):
            by_task = {r["task"]: r for r in scored[name]}
            vals = [by_task.get(t, {}).get(metric) for t in tasks]
            xs = [t + (i - len(series) / 2 + 0.5) * width for t in range(len(tasks))]
            heights = [max(v or 0.0, stub) for v in vals]
            bars = ax.bar(xs, heights, width, label=name, color=colors.get(name),
                          edgecolor="black", linewidth=0.4)
            for bar, v in zip(bars, vals):
                if not v:
                    bar.set_facecolor("white")
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.02,
                        "n/a" if v is None else f"{v:.2f}", ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_ylim(0, 1.25)
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(label, fontsize=9)
    by_task = {r["task"]: r for r in scored[series[0]]}
    axes[-1].set_xticks(range(len(tasks)), [f"{t}\n(n={by_task[t].get('n')}, "
                                            f"unparsed {by_task[t].get('n_unparseable')})" for t in tasks])
    if unparseable_warning(scored):
        title += f"\nall {by_task.get('all', {}).get('n')} model outputs unparseable (nothing to score)"
    axes[0].legend(fontsize=7, ncols=len(series), loc="upper center")
    return save_figure(fig, title, path)


def results_table(scored: Mapping[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (series, task): n, n_unparseable, n_no_answer, then each score followed by its count
    (``<score>_n``: the samples it averages over), so a zero says whether anything was scored."""
    keep = ["task", "n", "n_unparseable", "n_no_answer"]
    for score in (*COMPONENTS, "format_compliance"):
        keep += [score, f"{score}_n"]
    return [{"series": name, **{k: (round(r[k], 4) if isinstance(r[k], float) else r[k]) for k in keep if k in r}}
            for name, rows in scored.items() for r in rows]


def score_line(row: Mapping[str, Any]) -> str:
    """One task's scores in words, each with its count: "binary: n=40, 40 unparseable (100%), accuracy 0.000
    (n=40), RadRScore 0.000 (n=40) ..." (a log line and the artifact's summary)."""
    n, bad = row.get("n") or 0, row.get("n_unparseable") or 0
    parts = [f"{row['task']}: n={n}, {bad} unparseable ({100 * bad / n:.0f}%)" if n else f"{row['task']}: n=0"]
    for score, label in (("accuracy", "accuracy"), ("radrscore", "RadRScore"), ("completeness", "completeness"),
                         ("factuality", "factuality"), ("effectiveness", "effectiveness"),
                         ("format_compliance", "format compliance")):
        value, count = row.get(score), row.get(f"{score}_n")
        text = "n/a" if value is None else f"{value:.3f}"
        parts.append(f"{label} {text}" + (f" (n={count})" if count is not None else ""))
    return ", ".join(parts)


def unparseable_warning(scored: Mapping[str, list[dict[str, Any]]]) -> str | None:
    """A sentence when every model output was unparseable: its zeros are "nothing could be read", not scores."""
    every = next((r for r in scored.get("model", []) if r["task"] == "all"), None)
    if every and every.get("n") and every.get("n_unparseable") == every["n"]:
        return (f"All {every['n']} model outputs were unparseable (no reasoning could be read): the model's zeros "
                "below mean nothing was scored, not that the reasoning was wrong. Look at predictions.jsonl.")
    return None


def publish_eval(scored: Mapping[str, list[dict[str, Any]]], chart_path: Path, key: str = "eval-results",
                 title: str = "Evaluation") -> Path:
    """Write the chart beside the run and show table + chart as Prefect artifacts (keyed: history in the UI)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    chart = render_chart(scored, chart_path, title=title)
    create_table_artifact(key=key, table=results_table(scored),
                          description="Accuracy, RadRScore and format compliance per task, each with the number of "
                                      "samples behind it (<score>_n), n and n_unparseable: model and baselines")
    png = base64.b64encode(chart.read_bytes()).decode()
    warning = unparseable_warning(scored)
    summary = "\n".join(f"- {score_line(r)}" for r in scored.get("model", []))
    create_markdown_artifact(
        key=f"{key}-chart",
        markdown=f"## {title}\n\n" + (f"**{warning}**\n\n" if warning else "")
                 + f"Model, per task:\n\n{summary}\n\n"
                 f"![model and baselines per task](data:image/png;base64,{png})\n\n{EXPLANATION}\n\n"
                 f"Chart file: `{chart}`",
        description="Model beside majority, random and oracle baselines per task",
    )
    return chart
