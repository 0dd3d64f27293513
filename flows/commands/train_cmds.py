"""`radchain train`, `radchain evaluate` and `radchain export`: the ML engineer's commands."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from flows.cli_support import UsageError, clear_errors, console


def register(app: typer.Typer) -> None:
    @app.command()
    @clear_errors
    def train(
        dataset_version: str | None = typer.Option(None, help="default: the newest version in fct_dataset_versions"),
        config: str = typer.Option("tiny-cpu", help="a name in configs/ or a YAML path"),
        use_deployments: bool = typer.Option(False, help="trigger the sft/grpo/evaluate deployments on the gpu "
                                                          "work pool (needs `radchain serve` or a Prefect server)"),
        max_examples: int | None = typer.Option(None, help="cap the training rows (smoke runs)"),
        max_eval_per_task: int | None = typer.Option(None, help="cap benchmark samples per task"),
        max_new_tokens: int | None = typer.Option(None, help="generation budget in evaluation "
                                                             "(default: the config's grpo.max_completion_length)"),
    ) -> None:
        """SFT → GRPO from the SFT checkpoint → evaluate, recorded in fct_training_runs and fct_eval_results."""
        from radchain.runtime import prepare_environment

        prepare_environment()
        from flows.training_flows import train_flow

        out = train_flow(dataset_version=dataset_version, config=config, use_deployments=use_deployments,
                         max_examples=max_examples, max_eval_per_task=max_eval_per_task, max_new_tokens=max_new_tokens)
        print_trained(out)

    @app.command()
    @clear_errors
    def evaluate(
        checkpoint: Path = typer.Option(..., help="a checkpoint folder (e.g. .radchain/runs/grpo/<id>/final)"),
        dataset_version: str | None = typer.Option(None, help="default: the newest dataset version"),
        max_per_task: int | None = typer.Option(None, help="cap benchmark samples per task"),
        max_new_tokens: int | None = typer.Option(None, help="default: the config's grpo.max_completion_length"),
        config: str = typer.Option("tiny-cpu", help="the training config of the checkpoint (generation length)"),
    ) -> None:
        """Generate on mart_benchmark with a checkpoint and score accuracy and RadRScore per task."""
        if not checkpoint.is_dir():
            raise UsageError(f"checkpoint {checkpoint} is not a folder")
        from radchain.runtime import prepare_environment

        prepare_environment()
        from flows.training_flows import evaluate_flow

        out = evaluate_flow(checkpoint=str(checkpoint.resolve()), dataset_version=dataset_version,
                            max_per_task=max_per_task, max_new_tokens=max_new_tokens, config=config)
        print_evaluation(out)

    @app.command()
    @clear_errors
    def export(
        out: Path = typer.Option(..., help="folder; the export lands in OUT/<dataset_version>/<format>/"),
        format: str = typer.Option("jsonl", "--format", "-f", help="jsonl | hf | verl"),
        dataset_version: str | None = typer.Option(None, help="default: the newest dataset version"),
    ) -> None:
        """Export a dataset version for TRL (JSONL, Hugging Face datasets) or verl/EasyR1 (Parquet)."""
        from radchain.settings import get_settings
        from warehouse import Warehouse
        from warehouse.exports import export_dataset

        wh = Warehouse(get_settings().warehouse_dir)
        if not wh.duckdb_path.exists():
            raise UsageError(f"no warehouse at {wh.root}; run `radchain run` first")
        from flows.training_flows import latest_dataset_version

        version = dataset_version or latest_dataset_version(wh)
        counts = export_dataset(wh, version, format, out)
        console.print(f"exported {version} as {format} to {escape(str(out / version / format))}: {counts}")


def print_trained(out: dict) -> None:
    """What the train DAG did: each job's state, which checkpoint was evaluated and why, the evaluation."""
    from flows.training_artifacts import selection_phrase

    console.print(f"dataset {out['dataset_version']}: SFT {out['sft']['status']} → GRPO {out['grpo']['status']} "
                  f"→ checkpoint {escape(str(out['grpo']['checkpoint']))}", soft_wrap=True, highlight=False)
    if out.get("selection"):
        console.print(f"{selection_phrase(out['selection'])} → {escape(str(out['evaluated_checkpoint']))}",
                      soft_wrap=True, highlight=False)
    if out.get("evaluation"):
        print_evaluation(out["evaluation"])


def print_evaluation(out: dict) -> None:
    """The model's per-task scores beside its baselines, the chart's path and what its bars are."""
    from rich.table import Table

    from flows.evaluation import EXPLANATION

    table = Table(title=f"evaluation {out['eval_id']} ({out['n']} samples, {out['max_new_tokens']} new tokens)")
    for col in ("series", "task", "n", "unparsed", "accuracy", "RadRScore", "format"):
        table.add_column(col, justify="left" if col in ("series", "task") else "right")
    fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    for name, rows in out["baselines"].items():
        for r in rows:
            table.add_row(name, r["task"], str(r["n"]), str(r["n_unparseable"]), fmt(r["accuracy"]),
                          fmt(r["radrscore"]), fmt(r.get("format_compliance")))
        table.add_section()
    console.print(table)
    console.print(f"chart: {escape(str(out['chart']))}", soft_wrap=True, highlight=False)  # a path must not wrap
    console.print(EXPLANATION, highlight=False)
