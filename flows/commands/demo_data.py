"""`radchain demo-data`: write the synthetic MIMIC-CXR-style corpus (reports, CSVs, JPGs)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from flows.cli_support import UsageError, clear_errors, console


def register(app: typer.Typer) -> None:
    @app.command("demo-data")
    @clear_errors
    def demo_data(
        out: Path | None = typer.Option(None, "--out", help="folder to write (default: <home>/demo-corpus)"),
        studies: int = typer.Option(400, "--studies", help="number of studies (MIMIC-CXR has 227,835)"),
        seed: int | None = typer.Option(None, "--seed", help="random seed (default from settings); "
                                                             "same seed, same bytes"),
        images: bool = typer.Option(True, "--images/--no-images", help="write small JPGs beside the reports"),
        image_size: int = typer.Option(64, "--image-size", help="JPG side length in pixels (8-2048)"),
    ) -> None:
        """Generate a synthetic MIMIC-CXR-JPG-style corpus with consistent CheXpert and MS-CXR-T labels."""
        from extractors.synthetic import MAX_STUDIES

        # Checked here as well as in the generator so the message names the CLI option.
        if studies < 1 or studies > MAX_STUDIES:
            raise UsageError(f"--studies must be between 1 and {MAX_STUDIES:,}, got {studies}")
        if not 8 <= image_size <= 2048:
            raise UsageError(f"--image-size must be between 8 and 2048, got {image_size}")
        if out is None or seed is None:
            from radchain.settings import get_settings

            settings = get_settings()
            out = settings.demo_corpus_dir if out is None else out
            seed = settings.seed if seed is None else seed
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a directory")

        try:
            summary = _generate(out, studies, seed, images, image_size)
        except OSError as e:  # unwritable folder, disk full: one line, not a traceback
            raise UsageError(f"cannot write the corpus to {out}: {e.strerror or e}") from e
        _print_summary(summary)


def _generate(out: Path, studies: int, seed: int, images: bool, image_size: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from extractors.synthetic import generate_corpus

    with Progress(TextColumn("writing studies"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("studies", total=studies)
        return generate_corpus(out, studies=studies, seed=seed, images=images, image_size=image_size,
                               progress=lambda done: bar.update(task, completed=done))


def _print_summary(summary) -> None:
    from rich.table import Table

    overview = Table(title=f"synthetic corpus in {escape(str(summary.out))}", show_header=False)
    overview.add_column("what")
    overview.add_column("value", justify="right")
    for name, value in (
        ("patients", f"{summary.patients:,}"),
        ("studies", f"{summary.studies:,}"),
        ("images (metadata rows)", f"{summary.images:,}"),
        ("JPGs written", f"{summary.images_written:,}"),
        ("temporal pairs (MS-CXR-T)", f"{summary.temporal_pairs:,}"),
        ("split (patients)", " / ".join(f"{k} {v:,}" for k, v in summary.splits.items())),
        ("seed", str(summary.seed)),
        ("wall time", f"{summary.wall_s:.1f} s ({summary.studies_per_s:,.0f} studies/s)"),
    ):
        overview.add_row(name, value)
    console.print(overview)

    labels = Table(title="CheXpert labels (studies)")
    for column in ("observation", "1.0", "-1.0", "0.0"):
        labels.add_column(column, justify="left" if column == "observation" else "right")
    for column, counts in summary.label_counts.items():
        labels.add_row(column, *(f"{counts[k]:,}" for k in ("1.0", "-1.0", "0.0")))
    console.print(labels)
    for path in (summary.metadata_csv, summary.split_csv, summary.chexpert_csv, summary.temporal_csv):
        console.print(f"wrote {escape(str(path))}", highlight=False, soft_wrap=True)
