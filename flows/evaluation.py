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


def score_outputs(wh: Warehouse, predictions: Path, model: str, checkpoint: str | None,
                  judge: str = "rules", baseline: str | None = None, baseline_of: str | None = None,
                  write: bool = True) -> tuple[str, list[dict[str, Any]]]:
    """What `radchain score` does, for the evaluation job: score, write, return per-task rows
    (with ``format_compliance`` per task)."""
    from flows.commands.score import score_file

    eval_id, report = score_file(predictions, model=model, checkpoint=checkpoint, judge=judge, write=write,
                                 baseline=baseline, baseline_of=baseline_of)
    return eval_id, [dict(r.as_dict(), format_compliance=report.format_compliance.get(r.task))
                     for r in report.per_task]


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
    n_by_task = {r["task"]: r.get("n") for r in scored[series[0]]}
    axes[-1].set_xticks(range(len(tasks)), [f"{t}\n(n={n_by_task.get(t)})" for t in tasks])
    axes[0].legend(fontsize=7, ncols=len(series), loc="upper center")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def results_table(scored: Mapping[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (series, task): the numbers the chart draws, plus n and n_unparseable."""
    keep = ("task", "n", "n_unparseable", "n_no_answer", *COMPONENTS, "format_compliance")
    return [{"series": name, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k in keep}}
            for name, rows in scored.items() for r in rows]


def publish_eval(scored: Mapping[str, list[dict[str, Any]]], chart_path: Path, key: str = "eval-results",
                 title: str = "Evaluation") -> Path:
    """Write the chart beside the run and show table + chart as Prefect artifacts (keyed: history in the UI)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    chart = render_chart(scored, chart_path, title=title)
    create_table_artifact(key=key, table=results_table(scored),
                          description="Accuracy, RadRScore and format compliance per task: model and baselines")
    png = base64.b64encode(chart.read_bytes()).decode()
    create_markdown_artifact(
        key=f"{key}-chart",
        markdown=f"## {title}\n\n![model and baselines per task](data:image/png;base64,{png})\n\n{EXPLANATION}\n\n"
                 f"Chart file: `{chart}`",
        description="Model beside majority, random and oracle baselines per task",
    )
    return chart
