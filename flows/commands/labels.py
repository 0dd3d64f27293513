"""`radchain eval-labeler`: score the rule labeler against gold CheXpert-style labels."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.markup import escape
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
        gold_zero: str = typer.Option(
            "negative", "--gold-zero",
            help="what a 0 in the gold means: negative (CheXpert) | unannotated (Open-i, ChestX-ray14: score "
                 "positive mentions only)"),
        real: Path = typer.Option(None, "--real", help="shared/data/real: score on IU/Open-i (dev half) and NegEx"),
    ) -> None:
        """Compare the rule labeler with gold labels: per-observation P/R/F1 and exact matches."""
        from extractors import label_eval

        if format not in ("table", "json"):
            raise UsageError(f"unknown format {format!r}: use table or json")
        if gold_zero not in label_eval.GOLD_ZERO_MODES:
            raise UsageError(f"--gold-zero {gold_zero!r}: use negative or unannotated")
        if real is not None:
            _eval_real(real, format)
            return
        unmapped: list[str] = []
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
                    gold_labels = label_eval.gold_from_table(
                        table.drop([c for c in (text_col or label_eval.guess_text_column(table.columns),)
                                    if c in table.columns]),
                        id_col=id_col, aliases=alias_map, path=reports, gold_zero=gold_zero, unmapped=unmapped)
                else:
                    gold_table = label_eval.read_table(gold)
                    gold_labels = label_eval.gold_from_table(
                        gold_table, id_col=gold_id_col or id_col, aliases=alias_map, path=gold, gold_zero=gold_zero,
                        unmapped=unmapped)
                wanted = {sid for sid, _ in pairs}
                gold_labels = {sid: v for sid, v in gold_labels.items() if sid in wanted}
                if not gold_labels:
                    raise UsageError("no study id is in both the reports and the gold table "
                                     "(check --id-col / --gold-id-col)")
                predicted, sentences = label_eval.predict(pairs)
                result = label_eval.evaluate(predicted, gold_labels, sentences=sentences, max_mismatches=mismatches,
                                             positive_only=gold_zero == "unannotated")
                title = f"labeler vs {gold or reports}"
                if gold_zero == "unannotated":
                    title += " (positive mentions only: gold 0 = not annotated)"
        except LabelTableError as e:
            raise UsageError(str(e)) from e
        warnings = label_eval.warnings_for(result, gold_labels if mimic is None else {}, gold_zero=gold_zero,
                                           unmapped=unmapped)
        if format == "json":
            sys.stdout.write(json.dumps({**result.to_dict(), "gold_zero": gold_zero, "warnings": warnings},
                                        default=str) + "\n")
        else:
            _print_table(result, title)
            for w in warnings:
                console.print(f"[yellow]warning:[/] {escape(w)}")


def _eval_real(real: Path, format: str) -> None:
    """The reader on the shared real data (see bench/real_text.py for the timed version with floors)."""
    from extractors import real_text as rt

    iu = real / "iu-xray"
    if not (iu / "openi_gold_dev.csv").is_file():
        raise UsageError(f"--real {real}: no iu-xray/openi_gold_dev.csv there")
    gold = rt.read_openi_gold(iu / "openi_gold_dev.csv")
    res = rt.score_iu(rt.read_iu_reports(iu / "indiana_reports.csv", gold), gold)
    negex_path = real / "negex" / "rsAnnotations-1-120-random.txt"
    negex = rt.score_negex("radchain", rt.read_negex(negex_path), rt.radchain_negated) if negex_path.is_file() else None
    p, r, f = res.micro()
    if format == "json":
        sys.stdout.write(json.dumps({
            "iu": {"studies": res.studies, "macro_agreeing": res.macro_agreeing, "micro": {"p": p, "r": r, "f1": f},
                   "observations": [{"observation": s.observation, "precision": s.precision, "recall": s.recall,
                                     "f1": s.f1, "conventions": s.conventions} for s in res.scores]},
            "negex": None if negex is None else {"accuracy": negex.accuracy, "negated_f1": negex.f1},
        }) + "\n")
        return
    t = Table(title=f"labeler vs Open-i gold, IU development half ({res.studies} reports, positive mentions)")
    for col in ("observation", "gold+", "pred+", "P", "R", "F1", "disagree", "convention"):
        t.add_column(col, overflow="fold")
    for s in res.scores:
        t.add_row(s.observation, str(s.gold_positive), str(s.predicted_positive), _fmt(s.precision), _fmt(s.recall),
                  _fmt(s.f1), str(s.disagreements), str(sum(s.conventions.values())))
    console.print(t)
    console.print("convention: disagreements a documented Open-i/CheXpert difference explains (not subtracted):")
    for s in res.scores:
        for reason, n in s.conventions.items():
            console.print(f"  {s.observation}: {n} {escape(reason)}")
    console.print(f"macro F1 (8 observations whose conventions agree): {res.macro_agreeing:.3f}; "
                  f"micro (all 10): P {p:.3f} R {r:.3f} F1 {f:.3f}; published: MetaMap+NegEx 0.86, Wang et al. 0.90")
    if negex is not None:
        console.print(f"NegEx sentences: accuracy {negex.accuracy:.3f}, Negated P {negex.precision:.3f} "
                      f"R {negex.recall:.3f} F1 {negex.f1:.3f}")
