"""Scoring a prediction file into fct_eval_results, and the eval chart + Prefect artifacts."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from warehouse import Warehouse

COMPONENTS = ("accuracy", "completeness", "factuality", "effectiveness", "radrscore")


def score_outputs(wh: Warehouse, predictions: Path, model: str, checkpoint: str | None,
                  judge: str = "rules") -> tuple[str, list[dict[str, Any]]]:
    """What `radchain score` does, for the evaluation job: score, write, return per-task rows."""
    from flows.commands.score import score_file

    eval_id, report = score_file(predictions, model=model, checkpoint=checkpoint, judge=judge, write=True)
    return eval_id, [r.as_dict() for r in report.per_task]


def render_chart(results: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars: accuracy and the RadRScore components per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [r["task"] for r in results]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(tasks)), 3.6), dpi=100)
    width = 0.8 / len(COMPONENTS)
    for i, comp in enumerate(COMPONENTS):
        vals = [r.get(comp) or 0.0 for r in results]
        ax.bar([t + (i - len(COMPONENTS) / 2 + 0.5) * width for t in range(len(tasks))], vals, width, label=comp)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title("Accuracy and RadRScore per task")
    ax.legend(fontsize=7, ncols=len(COMPONENTS), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def publish_eval(results: list[dict[str, Any]], chart_path: Path, key: str = "eval-results") -> Path:
    """Write the chart beside the run and show table + chart as Prefect artifacts (keyed: history in the UI)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    chart = render_chart(results, chart_path)
    table = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k in ("task", "n", *COMPONENTS)}
             for r in results]
    create_table_artifact(key=key, table=table, description="Accuracy and RadRScore per task")
    png = base64.b64encode(chart.read_bytes()).decode()
    create_markdown_artifact(
        key=f"{key}-chart",
        markdown=f"## Evaluation\n\n![accuracy and RadRScore per task](data:image/png;base64,{png})\n\n"
                 f"Chart file: `{chart}`",
        description="Accuracy and RadRScore components per task",
    )
    return chart
