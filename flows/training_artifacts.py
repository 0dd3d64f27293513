"""What an operator sees of a training job in the Prefect UI: progress while it trains, then its
loss/reward curves (a PNG inside a markdown artifact) and its final metrics (a table artifact); the
parent ``train`` run gets one summary artifact that links each job's run and artifacts.

Artifact keys (one per kind, so Artifacts → key keeps every run's version):

===============  ==========================================================================
``sft-progress``   optimizer steps done (progress artifact, while SFT trains in this process)
``sft-curves``     loss, token accuracy and learning rate per logged step (PNG)
``sft-metrics``    final loss, steps, throughput, examples, checkpoint, status
``grpo-*``         the same for GRPO: reward (and each reward function), loss and KL, length, and
                   which checkpoint evaluation gets (GRPO's or its SFT start's, on the validate split)
``train-summary``  on the parent ``train`` run: each job's state, checkpoint, headline figure
                   and links to its flow run and artifacts
===============  ==========================================================================

The curves come from ``TrainResult.metrics["curve"]`` (training/sft.py keeps one entry per logging
step), so a job launched with ``accelerate launch`` in another process gets them too.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

# Panels per job kind: (title, curve keys drawn in it). GRPO's per-function rewards are found by name.
PANELS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "sft": (("loss", ("loss",)), ("token accuracy", ("mean_token_accuracy",)), ("learning rate", ("learning_rate",))),
    "grpo": (("reward", ("reward",)), ("loss and KL", ("loss", "kl")),
             ("completion length", ("completions/mean_length",))),
}
METRIC_KEYS = ("train_loss", "last_logged_loss", "eval_loss", "mean_reward", "steps", "wall_time_s",
               "train_runtime_s", "tokens", "tokens_per_s", "mean_step_time_s", "peak_gpu_memory_gb", "train_rows",
               "prompts", "prompts_dropped_too_long", "gradient_accumulation_steps")
SUMMARY_KEY = "train-summary"


def curve_key(kind: str) -> str:
    return f"{kind}-curves"


def metrics_key(kind: str) -> str:
    return f"{kind}-metrics"


def curve_series(kind: str, curve: Sequence[Mapping[str, Any]]) -> list[tuple[str, dict[str, list[tuple[int, float]]]]]:
    """(panel title, {key: [(step, value), ...]}) for every panel with at least one logged value."""
    panels = [(title, list(keys)) for title, keys in PANELS.get(kind, ())]
    if kind == "grpo":  # each reward function's mean beside the weighted total
        names = sorted({k for entry in curve for k in entry if k.startswith("rewards/") and k.endswith("/mean")})
        panels[0][1].extend(names)
    out = []
    for title, keys in panels:
        series = {}
        for key in keys:
            points = [(int(e["step"]), float(e[key])) for e in curve if e.get(key) is not None and "step" in e]
            if points:
                series[key] = points
        if series:
            out.append((title, series))
    return out


def render_curves(kind: str, curve: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """One panel per curve group, value against optimizer step (markers: tiny runs log a few points).
    A run that logged no step still gets a figure that says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flows.artifacts import save_figure
    from matplotlib.ticker import MaxNLocator

    panels = curve_series(kind, curve)
    fig, axes = plt.subplots(max(1, len(panels)), 1, figsize=(7, 2.6 * max(1, len(panels))), dpi=100,
                             squeeze=False)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no logged step (fewer steps than logging_steps?)", ha="center", va="center")
        axes[0][0].set_axis_off()
    for ax, (panel, series) in zip((a[0] for a in axes), panels):
        for key, points in series.items():
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", markersize=3, label=key.removeprefix("rewards/").removesuffix("/mean"))
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    return save_figure(fig, title, path)


def metric_rows(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The job's final figures as (metric, value) rows: its registry fields, then the trainer's summary."""
    metrics = json.loads(row.get("metrics_json") or "{}")
    rows = [dict(metric=k, value=_cell(row.get(k))) for k in
            ("training_run_id", "status", "config_name", "dataset_version", "n_examples", "n_skipped",
             "init_checkpoint", "checkpoint", "wall_s")]
    rows += [dict(metric=k, value=_cell(metrics[k])) for k in METRIC_KEYS if metrics.get(k) is not None]
    if metrics.get("selection"):
        rows.append(dict(metric="selection", value=selection_phrase(metrics["selection"])))
    if row.get("error"):
        rows.append(dict(metric="error", value=str(row["error"]).splitlines()[0][:300]))
    return rows


def selection_phrase(selection: Mapping[str, Any]) -> str:
    """GRPO's checkpoint against its SFT start on the validate split, in words (training/selection.py)."""
    from training.selection import CheckpointChoice

    return CheckpointChoice(**selection).describe()


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def publish_training(row: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """The curves PNG (beside the checkpoint) and the curve + metrics artifacts of one job; returns
    {"chart": path, "<key>": artifact id}."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    kind = row["kind"]
    metrics = json.loads(row.get("metrics_json") or "{}")
    curve = metrics.get("curve") or []
    title = f"{kind.upper()} {row['training_run_id']} on {row.get('dataset_version')} ({row.get('status')})"
    chart = render_curves(kind, curve, out_dir / f"{kind}-curves.png", title)
    png = base64.b64encode(chart.read_bytes()).decode()
    headline = headline_figure(row)
    out: dict[str, Any] = {"chart": str(chart)}
    out[curve_key(kind)] = create_markdown_artifact(
        key=curve_key(kind),
        markdown=f"## {title}\n\n![{kind} curves](data:image/png;base64,{png})\n\n"
                 f"{len(curve)} logged steps; {headline}. Chart file: `{chart}`",
        description=f"{kind.upper()} training curves of {row['training_run_id']}",
    )
    out[metrics_key(kind)] = create_table_artifact(
        key=metrics_key(kind), table=metric_rows(row),
        description=f"{kind.upper()} {row['training_run_id']}: final metrics ({headline})",
    )
    return out


def headline_figure(row: Mapping[str, Any]) -> str:
    """One phrase: the figure an operator looks at first (SFT: loss; GRPO: mean reward)."""
    metrics = json.loads(row.get("metrics_json") or "{}")
    if row.get("status") == "failed":
        return "failed: " + (str(row.get("error") or "").splitlines() or ["?"])[0][:200]
    parts = [f"{metrics.get('steps', '?')} steps"]
    if metrics.get("train_loss") is not None:
        parts.append(f"train loss {metrics['train_loss']:.4g}")
    if metrics.get("mean_reward") is not None:
        parts.append(f"mean reward {metrics['mean_reward']:.4g}")
    if metrics.get("selection"):
        parts.append(selection_phrase(metrics["selection"]))
    return ", ".join(parts)


class TrainingProgress(TrainerCallback):
    """A ``<kind>-progress`` artifact (and a terminal bar on a tty) that follows the optimizer steps."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.progress = None

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ARG002
        from flows.progress import StageProgress

        if state.is_world_process_zero:
            self.progress = StageProgress(self.kind, int(state.max_steps or 0), unit="optimizer steps")

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ARG002
        if self.progress is not None:
            self.progress(1)

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ARG002
        if self.progress is not None:
            self.progress.close()
            self.progress = None


# ---- the parent `train` run ---------------------------------------------------------------------
def ui_base() -> str:
    """The UI's address for links ('' = relative to the page, which is the UI itself)."""
    from prefect.settings import PREFECT_UI_URL

    return (PREFECT_UI_URL.value() or "").rstrip("/")


def run_artifacts(flow_run_ids: Sequence[Any]) -> dict[str, list[Any]]:
    """Artifacts (with a key) of the given flow runs, by flow run id."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    ids = [i for i in flow_run_ids if i is not None]
    if not ids:
        return {}
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
    out: dict[str, list[Any]] = {}
    for a in artifacts:
        if a.key:
            out.setdefault(str(a.flow_run_id), []).append(a)
    return out


def summary_markdown(version: str, jobs: Sequence[Mapping[str, Any]], artifacts: Mapping[str, list[Any]],
                     base: str = "") -> str:
    """The parent run's summary: one table row per job with links to its run and its artifacts."""
    lines = [f"## Training on dataset `{version}`", "",
             "| job | flow run | state | headline | artifacts | checkpoint |", "|---|---|---|---|---|---|"]
    for job in jobs:
        run_id = job.get("flow_run_id")
        mine = sorted(artifacts.get(str(run_id), []), key=lambda a: a.key)
        run = f"[{job.get('flow_run_name') or run_id}]({base}/runs/flow-run/{run_id})" if run_id else ""
        links = ", ".join(f"[{a.key}]({base}/artifacts/artifact/{a.id})" for a in mine)
        headline = job.get("headline") or eval_headline(next((a.data for a in mine if a.key == "eval-results"), None))
        lines.append(f"| {job['kind']} | {run} | {job.get('status', '')} | {headline} | {links} | "
                     f"`{job.get('checkpoint') or ''}` |")
    return "\n".join(lines)


def eval_headline(table: Any) -> str:
    """The model's "all" row of an ``eval-results`` table (artifact data: JSON text or rows), in words."""
    if isinstance(table, str):
        try:
            table = json.loads(table)
        except ValueError:
            return ""
    every = next((r for r in table or [] if r.get("series") == "model" and r.get("task") == "all"), None)
    if every is None:
        return ""
    acc = "n/a" if every.get("accuracy") is None else f"{every['accuracy']:.3f}"
    return f"accuracy {acc} over {every.get('n')}, {every.get('n_unparseable')} unparseable"


def publish_train_summary(version: str, jobs: Sequence[Mapping[str, Any]]) -> Any:
    """The ``train-summary`` markdown artifact of the parent run; returns its id."""
    from prefect.artifacts import create_markdown_artifact

    artifacts = run_artifacts([j.get("flow_run_id") for j in jobs])
    return create_markdown_artifact(key=SUMMARY_KEY, markdown=summary_markdown(version, jobs, artifacts, ui_base()),
                                    description=f"SFT → GRPO → evaluate on {version}: each job's run and artifacts")
