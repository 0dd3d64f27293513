"""`radchain sql` and `radchain tables`: read-only access for data engineers."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from flows.cli_support import UsageError, cell, clear_errors, console, print_arrow, table_console
from radchain.settings import get_settings
from warehouse import Warehouse, catalog

MAX_QUERY_BYTES = 1_000_000


def read_query(query: str | None, file: str | None) -> str:
    """The SQL text: the argument, or the file given with --file; `-` (either way) reads stdin."""
    if query is not None and file is not None:
        raise UsageError("give the SQL either as an argument or with --file, not both")
    source = file if file is not None else query
    if source is None:
        raise UsageError("no SQL given: pass it as an argument, with --file PATH, or `-` to read stdin")
    if file is None and query != "-":
        return query
    if source == "-":
        text = sys.stdin.read(MAX_QUERY_BYTES + 1)
        where = "stdin"
    else:
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"no SQL file at {path}")
        with open(path, encoding="utf-8", errors="strict") as fh:
            try:
                text = fh.read(MAX_QUERY_BYTES + 1)
            except UnicodeDecodeError as e:
                raise UsageError(f"{path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
        where = str(path)
    if len(text) > MAX_QUERY_BYTES:
        raise UsageError(f"the SQL from {where} is longer than {MAX_QUERY_BYTES} characters")
    if not text.strip():
        raise UsageError(f"the SQL from {where} is empty")
    return text


def register(app: typer.Typer) -> None:
    @app.command()
    @clear_errors
    def sql(
        query: str | None = typer.Argument(
            None, help="SQL to run: SELECT statements only (several separated by `;`); `-` reads it from stdin"),
        file: str | None = typer.Option(None, "--file", "-i", help="read the SQL from this file (`-`: stdin)"),
        format: str = typer.Option("table", "--format", "-f", help="table | csv | json"),
        explain: bool = typer.Option(False, "--explain", help="show each SELECT's query plan instead of its rows"),
    ) -> None:
        """Query the warehouse read-only with DuckDB.

        The connection is locked down: it reads only the warehouse's Parquet files, cannot
        change a setting, install or load an extension, attach a database or reach the network,
        and every statement must be a SELECT (FROM-first, VALUES, DESCRIBE, SUMMARIZE and SHOW
        count as SELECT). Several statements run in order and each result is shown (table
        format only; csv and json take one statement).
        """
        if format not in ("table", "csv", "json"):
            raise UsageError(f"unknown format {format!r}: use table, csv or json")
        text = read_query(query, file)
        results = Warehouse(get_settings().warehouse_dir).statements(text, explain=explain)
        if len(results) > 1 and format != "table":
            raise UsageError(f"--format {format} prints one result and the SQL holds {len(results)} statements; "
                             "run them one at a time or use --format table")
        out = table_console()
        for i, r in enumerate(results, start=1):
            if len(results) > 1:
                if i > 1:
                    out.print()
                out.print(cell(f"[{i}/{len(results)}] {r.statement}"), soft_wrap=True)
            if explain and format == "table" and "explain_value" in r.table.column_names:
                # The plan is a drawing: printed as is (its text made printable), not squeezed into a cell.
                for plan in r.table.column("explain_value").to_pylist():
                    out.print(cell(plan), soft_wrap=True)
            else:
                print_arrow(r.table, format)

    @app.command()
    @clear_errors
    def tables(
        format: str = typer.Option("table", "--format", "-f", help="table | csv | json"),
        markdown: bool = typer.Option(False, "--markdown", help="print the catalog as Markdown (the README's)"),
    ) -> None:
        """List every table with its layer, row count and description, then every view."""
        import pyarrow as pa

        if markdown:
            from warehouse.catalog_doc import catalog_markdown

            console.print(catalog_markdown(), markup=False, highlight=False, soft_wrap=True)
            return

        wh = Warehouse(get_settings().warehouse_dir)
        rows = [
            dict(table=s.name, layer=s.layer, rows=wh.count(s.name) if wh.table_dir(s.name).exists() else 0,
                 grain=s.grain, description=s.description)
            for s in catalog()
        ]
        from warehouse.views import DESCRIPTIONS, VIEWS

        # Views have no stored rows (they are queries over the tables): rows is left empty.
        rows += [dict(table=name, layer="view", rows=None, grain="", description=DESCRIPTIONS.get(name, ""))
                 for name in VIEWS]
        print_arrow(pa.Table.from_pylist(rows), format)


