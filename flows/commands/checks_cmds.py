"""`radchain check` (the data checks on demand) and `radchain docs` (the static HTML catalog)."""

from __future__ import annotations

import uuid
from pathlib import Path

import typer
from rich.markup import escape

from flows.cli_support import UsageError, clear_errors, console, err_console, print_arrow


def register(app: typer.Typer) -> None:
    @app.command()
    @clear_errors
    def check(
        table: list[str] | None = typer.Option(None, "--table", "-t", help="check only this table (repeatable)"),
        stage: str | None = typer.Option(None, "--stage", help="check the tables this stage writes"),
        format: str = typer.Option("table", "--format", "-f", help="table | csv | json"),
        min_acceptance: float | None = typer.Option(None, "--min-acceptance",
                                                    help="mine gate threshold (default RADCHAIN_CHECKS_MIN_ACCEPTANCE)"),
    ) -> None:
        """Run the data checks declared in schemas/ over the warehouse and record them in fct_check_results.

        Exit code 1 when an error-severity check fails (warnings are listed, exit 0).
        """
        import pyarrow as pa

        from flows.checks import check_params_from, stage_writes
        from flows.locking import warehouse_lock
        from flows.pipeline import ALL_STAGES
        from radchain import __version__
        from radchain.settings import get_settings
        from warehouse import Warehouse, catalog
        from warehouse.checks import ON_DEMAND, all_checks, run_checks, write_results

        if format not in ("table", "csv", "json"):
            raise UsageError(f"unknown format {format!r}: use table, csv or json")
        settings = get_settings()
        wh = Warehouse(settings.warehouse_dir)
        if not wh.duckdb_path.exists():
            raise UsageError(f"no warehouse at {wh.root}; run `radchain run` first")
        tables: list[str] | None = None
        if stage is not None:
            if stage not in ALL_STAGES:
                raise UsageError(f"unknown stage {stage!r}; choose from {', '.join(ALL_STAGES)}")
            tables = list(stage_writes(stage))
        if table:
            known = {s.name for s in catalog()}
            unknown = [t for t in table if t not in known]
            if unknown:
                raise UsageError(f"unknown tables {unknown}; see `radchain tables`")
            tables = [t for t in table if tables is None or t in tables] if stage else list(table)
        if min_acceptance is not None and not 0.0 <= min_acceptance <= 1.0:
            raise UsageError("--min-acceptance must be between 0 and 1")
        checks = all_checks(tables)
        outcomes = run_checks(wh, checks, None, check_params_from(settings, min_acceptance))
        run_id = f"check-{uuid.uuid4().hex[:12]}"
        # Held for the write only; a pipeline run holding it for longer makes this fail in 60 s, naming it.
        with warehouse_lock(wh.root, timeout_s=60, purpose=f"radchain check {run_id}"):
            write_results(wh, outcomes, run_id, ON_DEMAND, f"radchain-{__version__}/checks-v1")
            wh.refresh_views()
        rows = [dict(check=o.check.name, table=o.check.table, severity=o.check.severity,
                     result="passed" if o.passed else "FAILED", failing_rows=o.failing_rows,
                     sample_ids=", ".join(o.sample_ids), detail=o.detail or "")
                for o in sorted(outcomes, key=lambda o: (o.passed, o.check.severity != "error", o.check.name))]
        print_arrow(pa.Table.from_pylist(rows), format, title=f"radchain check ({run_id})")
        errors = [o for o in outcomes if not o.passed and o.check.severity == "error"]
        warns = [o for o in outcomes if not o.passed and o.check.severity == "warn"]
        if format == "table":
            console.print(f"{len(outcomes)} checks: {len(outcomes) - len(errors) - len(warns)} passed, "
                          f"{len(errors)} errors, {len(warns)} warnings (fct_check_results, run_id {run_id})",
                          highlight=False)
        if errors:

            from flows.cli_support import one_line

            err_console.print(f"[bold red]error:[/] {escape(one_line(errors[0].line))}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(1)

    @app.command()
    @clear_errors
    def docs(
        out: Path = typer.Option(Path("radchain-docs"), "--out", "-o", help="folder to write index.html into"),
    ) -> None:
        """Write a static HTML catalog (tables, columns, checks and their last results, lineage graph)."""
        from flows.lineage import lineage_edges
        from radchain.settings import get_settings
        from warehouse import Warehouse
        from warehouse.catalog_doc import write_html

        wh = Warehouse(get_settings().warehouse_dir)
        path = write_html(out, lineage_edges(), wh if wh.duckdb_path.exists() else None)
        console.print(f"catalog: {escape(str(path))} (open it in a browser; it needs no network)", highlight=False,
                      soft_wrap=True)
