"""`radchain sql` and `radchain tables`: read-only access for data engineers."""

from __future__ import annotations

import typer

from flows.cli_support import clear_errors, print_arrow
from radchain.settings import get_settings
from warehouse import Warehouse, catalog


def register(app: typer.Typer) -> None:
    @app.command()
    @clear_errors
    def sql(
        query: str = typer.Argument(..., help="SQL to run (read-only; SELECT-style statements only)"),
        format: str = typer.Option("table", "--format", "-f", help="table | csv | json"),
    ) -> None:
        """Query the warehouse read-only with DuckDB."""
        print_arrow(Warehouse(get_settings().warehouse_dir).sql(query), format)

    @app.command()
    @clear_errors
    def tables(
        format: str = typer.Option("table", "--format", "-f", help="table | csv | json"),
        markdown: bool = typer.Option(False, "--markdown", help="print the catalog as Markdown (the README's)"),
    ) -> None:
        """List every table with its layer, row count and description."""
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
        print_arrow(pa.Table.from_pylist(rows), format)
