"""`radchain score` and `radchain judge-agreement`: accuracy and RadRScore of a prediction set.

The scoring itself is training/scoring.py (plain code, shared with the evaluation job); reading the
warehouse gold, running the chosen judge and writing fct_eval_results / fct_predictions is
flows.evaluation.score_file; this module is the command line: it calls them and prints the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from flows.cli_support import UsageError, cell, clear_errors, console, err_console, table_console

_MAX_LISTED = 5


def register(app: typer.Typer) -> None:
    @app.command()
    @clear_errors
    def score(
        predictions: Path = typer.Option(..., "--predictions", "-p",
                                         help='JSONL file, one {"sample_id": ..., "output": ...} per line'),
        model: str | None = typer.Option(None, help="model name for the results (default: the file's 'model' "
                                                    "field, else the file name)"),
        checkpoint: str | None = typer.Option(None, help="checkpoint name or path, recorded with the results"),
        judge: str = typer.Option("rules", help="RadRScore judge: rules (deterministic) | llm (needs an endpoint)"),
        semantic: bool = typer.Option(False, "--semantic", help="rules judge: match what wording leaves open "
                                                                 "by MiniLM embeddings (pooled word vectors)"),
        write: bool = typer.Option(True, "--write/--no-write", help="write fct_eval_results and fct_predictions"),
    ) -> None:
        """Score model outputs against the warehouse gold: accuracy and RadRScore per task.

        A ChestX-Reasoner release results file (a JSON list of items with reason_steps, pred and
        original_report), or a folder of them, is scored against the gold inside it (no warehouse)."""
        if predictions.is_dir() or predictions.suffix.lower() == ".json":
            _score_release(predictions, semantic=semantic)
            return
        from flows.evaluation import score_file

        eval_id, report = score_file(predictions, model=model, checkpoint=checkpoint, judge=judge,
                                     semantic=semantic, write=write)
        _print_report(report, title=f"radchain score: {escape(str(report.model))} ({judge} judge)")
        if report.unknown_ids:
            shown = ", ".join(report.unknown_ids[:_MAX_LISTED])
            more = f" and {len(report.unknown_ids) - _MAX_LISTED} more" if len(report.unknown_ids) > _MAX_LISTED else ""
            err_console.print(f"[yellow]warning:[/] {len(report.unknown_ids)} sample ids are not in the warehouse "
                              f"and were not scored: {shown}{more}", highlight=False)
        if report.duplicate_ids:
            err_console.print(f"[yellow]warning:[/] {len(report.duplicate_ids)} repeated sample ids; the first "
                              "output of each was scored", highlight=False)
        if report.judge_failures:
            err_console.print(f"[yellow]warning:[/] the llm judge failed on {report.judge_failures} samples; "
                              "the rules judge scored them", highlight=False)
        if write:
            console.print(f"eval_id: {eval_id}  (fct_eval_results, fct_predictions)")

    @app.command("judge-agreement")
    @clear_errors
    def judge_agreement_cmd(
        predictions: Path | None = typer.Option(None, "--predictions", "-p",
                                                help='JSONL file, one {"sample_id": ..., "output": ...} per line '
                                                     "(rules judge vs the llm judge)"),
        release: Path | None = typer.Option(None, "--release",
                                            help="a ChestX-Reasoner release results folder (<model>/*.json with "
                                                 "reason_steps, pred and GPT-4o verdicts) or one such file: "
                                                 "rules judge vs the paper's stored GPT-4o verdicts"),
        semantic: bool = typer.Option(False, "--semantic", help="--release: match by MiniLM embeddings"),
        bootstrap: int = typer.Option(1000, "--bootstrap", help="--release: bootstrap resamples for the intervals"),
        format: str = typer.Option("table", "--format", "-f", help="table | csv | json"),
    ) -> None:
        """Compare radchain's rules judge with an LLM judge: per-component Pearson/Spearman.

        With --release, against the verdicts stored in the release files (no endpoint, no warehouse):
        per-sample correlations overall and per model with bootstrap intervals, system means and
        whether both judges rank the models the same way."""
        import pyarrow as pa

        from flows.cli_support import print_arrow

        if (predictions is None) == (release is None):
            raise UsageError("give exactly one of --predictions or --release")
        if release is not None:
            from training.judge_agreement import agreement_on_release

            if not release.exists():
                raise UsageError(f"{release} does not exist")
            try:
                report = agreement_on_release(release, semantic=semantic, n_boot=bootstrap)
            except ValueError as e:
                raise UsageError(str(e)) from None
            if not report.n_compared:
                raise UsageError(f"{release} holds no release items with GPT-4o verdicts")
            print_arrow(pa.Table.from_pylist(report.as_rows()), format,
                        title=f"judge agreement with the release's GPT-4o verdicts: {report.n_compared} samples "
                              f"({report.n_no_verdict} without verdicts, {report.n_empty_output} empty outputs "
                              f"left out, {report.n_tagless} tagless outputs scored)")
            print_arrow(pa.Table.from_pylist(report.system_rows()), format, title="system-level means")
            return

        from flows.evaluation import llm_scores as judge_with_llm
        from flows.evaluation import load_gold
        from radchain.runtime import prepare_environment
        from training.answers import completion_text, parse_output
        from training.judge_llm import judge_agreement
        from training.radrscore import score_sample
        from training.scoring import read_predictions

        settings = prepare_environment()
        records, _ = read_predictions(predictions)
        _, gold = load_gold(settings, records)
        llm_scores, failures, _ = judge_with_llm(settings, records, gold)
        rules_scores = {}
        for r in records:
            ref = gold.get(str(r["sample_id"]))
            if ref is not None:
                rules_scores[ref.sample_id] = score_sample(parse_output(completion_text(r.get("output"))), ref)
        rows = judge_agreement(rules_scores, llm_scores)
        print_arrow(pa.Table.from_pylist(rows), format, title=f"judge agreement (llm judge failed on {failures})")


# ---- helpers -------------------------------------------------------------------------------------
def _score_release(path: Path, *, semantic: bool) -> None:
    """`radchain score` on release items: RadRScore per model and file against the gold they carry."""
    from training.judge_agreement import read_release
    from training.radrscore import average_scores, score_release_batch

    if not path.exists():
        raise UsageError(f"predictions file {path} does not exist")
    try:
        items = read_release(path)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not items:
        raise UsageError(f"{path} holds no release items (a JSON list of objects with reason_steps and pred)")
    scores = score_release_batch(items, semantic=semantic)
    matching = "semantic" if semantic else "lexical"
    t = Table(title=f"radchain score: {escape(str(path))} (rules judge, {matching} matching)")
    for col in ("model", "task", "n", "complete", "factual", "effective", "RadRScore", "unparsed", "tagless"):
        t.add_column(col, justify="left" if col in ("model", "task") else "right")
    groups: dict[tuple[str, str], list[Any]] = {}
    for it, sc in zip(items, scores):
        groups.setdefault((it.model, it.task), []).append(sc)
    for it, sc in zip(items, scores):
        groups.setdefault((it.model, "\uffff"), []).append(sc)  # each model's "all" row after its tasks
    for (model, task), scs in sorted(groups.items()):
        task = "all" if task == "\uffff" else task
        avg = average_scores(scs)
        t.add_row(model, task, str(len(scs)), _fmt(avg.completeness), _fmt(avg.factuality), _fmt(avg.effectiveness),
                  _fmt(avg.radrscore), str(sum(s.unparseable for s in scs)), str(sum(s.tagless for s in scs)))
    console.print(t)


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def _print_report(report: Any, title: str) -> None:
    t = Table(title=title)
    t.add_column("task", no_wrap=True)
    for col in ("n", "accuracy", "complete", "factual", "effective", "RadRScore", "format", "unparsed", "tagless",
                "no answer", "no chain"):
        t.add_column(col, justify="right")
    last_task = len(report.per_task) - 2  # the row before "all" closes the per-task section
    for i, r in enumerate(report.per_task):
        t.add_row(cell(r.task), str(r.n), _fmt(r.accuracy), _fmt(r.completeness), _fmt(r.factuality),
                  _fmt(r.effectiveness), _fmt(r.radrscore),
                  _fmt(getattr(report, "format_compliance", {}).get(r.task)), str(r.n_unparseable), str(r.n_tagless),
                  str(r.n_no_answer),
                  str(r.n_no_gold_chain), end_section=(i == last_task))
    table_console().print(t)
