"""`radchain eval-labeler`: score the rule labeler against gold CheXpert-style labels."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.table import Table

from flows.cli_support import UsageError, cell, clear_errors, console, table_console
from extractors.chexpert_csv import LabelTableError, load_aliases
from extractors.resources import REPORTS

DEFAULT_REPORTS = REPORTS / "labeled_reports.csv"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _print_table(result, title: str) -> None:
    t = Table(title=title)
    # Numbers never wrap; the observation name folds first on a narrow terminal.
    t.add_column("observation", overflow="fold", min_width=10)
    for col in ("gold+", "pred+", "P(+)", "R(+)", "F1(+)", "F1(-)", "F1(u)", "agree"):
        t.add_column(col, justify="right", no_wrap=True, min_width=5)
    for s in result.scores:
        t.add_row(cell(s.observation), str(s.gold_positive), str(s.predicted_positive), _fmt(s.precision),
                  _fmt(s.recall),
                  _fmt(s.f1), _fmt(s.negative_f1), _fmt(s.uncertain_f1), _fmt(s.agreement))
    table_console().print(t)
    console.print("P/R/F1(+): positive labels; F1(-), F1(u): negative and uncertain labels; "
                  "agree: share of studies with the same value (4 values)")
    rate = result.exact_match_rate
    console.print(f"exact match: {result.exact_matches}/{result.studies} studies"
                  f" ({'-' if rate is None else f'{rate:.1%}'}) on {len(result.observations)} shared observations")
    if result.missing_predictions:
        console.print(f"[yellow]{result.missing_predictions} gold studies had no report to label[/]")
    if result.mismatches:
        m = Table(title="first mismatches")
        for col in ("study", "observation", "gold", "labeler", "deciding sentence"):
            m.add_column(col, overflow="fold")
        for x in result.mismatches:
            # Ids and sentences come from the user's files: data, not markup or terminal escapes.
            m.add_row(cell(x.study_id), cell(x.observation), cell(x.gold), cell(x.predicted),
                      cell((x.sentence or "").replace("\n", " ")))
        table_console().print(m)


def register(app: typer.Typer) -> None:
    @app.command("eval-labeler")
    @clear_errors
    def eval_labeler(
        reports: Path = typer.Option(DEFAULT_REPORTS, "--reports", help="report table (CSV / Parquet / JSONL)"),
        text_col: str = typer.Option(None, "--text-col", help="report text column (guessed: text, report ...)"),
        id_col: str = typer.Option(None, "--id-col", help="study id column (default study_id, else row number)"),
        gold: Path = typer.Option(None, "--gold", help="gold label table (default: the reports table itself)"),
        gold_id_col: str = typer.Option(None, "--gold-id-col", help="id column of the gold table (default --id-col)"),
        aliases: Path = typer.Option(None, "--aliases", help="YAML/CSV mapping gold label names to CheXpert names"),
        mimic: Path = typer.Option(None, "--mimic", help="a MIMIC-CXR-style tree: reports vs its chexpert CSV"),
        limit: int = typer.Option(None, "--limit", min=1, help="label at most this many reports"),
        mismatches: int = typer.Option(10, "--mismatches", min=0, help="how many disagreements to list"),
        format: str = typer.Option("table", "--format", "-f", help="table | json"),
    ) -> None:
        """Compare the rule labeler with gold labels: per-observation P/R/F1 and exact matches."""
        from extractors import label_eval

        if format not in ("table", "json"):
            raise UsageError(f"unknown format {format!r}: use table or json")
        try:
            if mimic is not None:
                if gold is not None or reports != DEFAULT_REPORTS:
                    raise UsageError("--mimic reads its own reports and chexpert CSV; drop --reports/--gold")
                if not mimic.is_dir():
                    raise UsageError(f"--mimic {mimic}: not a folder")
                result = label_eval.evaluate_mimic(mimic, limit=limit, max_mismatches=mismatches)
                title = f"labeler vs {mimic}/mimic-cxr-2.0.0-chexpert.csv"
            else:
                alias_map = load_aliases(aliases)
                pairs, table = label_eval.read_reports(reports, text_col=text_col, id_col=id_col)
                pairs = pairs[:limit] if limit else pairs
                if gold is None:
                    gold_labels = label_eval.gold_from_table(table, id_col=id_col, aliases=alias_map, path=reports)
                else:
                    gold_table = label_eval.read_table(gold)
                    gold_labels = label_eval.gold_from_table(
                        gold_table, id_col=gold_id_col or id_col, aliases=alias_map, path=gold)
                wanted = {sid for sid, _ in pairs}
                gold_labels = {sid: v for sid, v in gold_labels.items() if sid in wanted}
                if not gold_labels:
                    raise UsageError("no study id is in both the reports and the gold table "
                                     "(check --id-col / --gold-id-col)")
                predicted, sentences = label_eval.predict(pairs)
                result = label_eval.evaluate(predicted, gold_labels, sentences=sentences, max_mismatches=mismatches)
                title = f"labeler vs {gold or reports}"
        except LabelTableError as e:
            raise UsageError(str(e)) from e
        if format == "json":
            sys.stdout.write(json.dumps(result.to_dict(), default=str) + "\n")
        else:
            _print_table(result, title)
