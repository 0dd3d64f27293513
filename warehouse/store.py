"""Parquet partitions with atomic writes, DuckDB views over them, and read-only SQL.

Layout under the warehouse folder::

    parquet/<table>/<partition>.parquet   one file per batch; a re-run replaces it
    parquet/<table>/_schema.parquet       zero rows: keeps the view valid while the table is empty
    warehouse.duckdb                      views only (no data), readable by any DuckDB client

A partition is written to a hidden temporary file in the same folder, fsynced, then renamed
over the old one (``os.replace`` is atomic on POSIX), so a crash leaves either the old file
or the new one, never half of either.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.audit import Materialization
from schemas.base import Lineage, TableRecord
from warehouse.catalog import catalog, table_model

_SAFE_PARTITION = re.compile(r"^[A-Za-z0-9_.=-]{1,200}$")
# Statement types a read-only session may run. COPY/ATTACH/SET are refused even though
# DuckDB's read-only mode would let COPY write a file elsewhere.
_READ_STATEMENTS = {"SELECT", "EXPLAIN"}


class WarehouseError(Exception):
    """A clear, user-facing storage error (the CLI prints it without a traceback)."""


Frame = pl.DataFrame | pa.Table | Sequence[Mapping[str, Any]]


class Warehouse:
    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        self.parquet_dir = self.root / "parquet"
        self.duckdb_path = self.root / "warehouse.duckdb"

    # ---- setup -------------------------------------------------------------------------
    def ensure(self) -> "Warehouse":
        """Create folders, empty schema files and the DuckDB views (idempotent, cheap)."""
        self.parquet_dir.mkdir(parents=True, exist_ok=True)
        for spec in catalog():
            d = self.table_dir(spec.name)
            d.mkdir(exist_ok=True)
            schema_file = d / "_schema.parquet"
            schema = spec.model.arrow_schema()
            if not schema_file.exists() or pq.read_schema(schema_file) != schema:
                self._atomic_write(schema.empty_table(), schema_file)
            for stale in d.glob(".*.tmp-*"):
                # A temporary file is left only by a writer that crashed before its rename.
                if _writer_gone(stale):
                    stale.unlink(missing_ok=True)
        for stale in self.root.glob(f".{self.duckdb_path.name}.tmp-*"):  # a views file (+ .wal) of a killed writer
            if _writer_gone(stale):
                stale.unlink(missing_ok=True)
        self.refresh_views()
        return self

    def refresh_views(self, *, force: bool = False) -> bool:
        """Make warehouse.duckdb hold the current views; returns whether the file was rebuilt.

        The views read their table's folder through a glob, so new or replaced partitions need
        no rebuild: only a change to a view's definition does (a table, its description or
        Arrow schema, a derived view's SQL, the folder). That is what the stamp beside the file
        records, with the file's size and mtime, so a file someone else rewrote (the duckdb CLI
        opened read-write) is rebuilt too. Every stage ends with a refresh; skipping the rebuild
        when nothing changed saves about 80 ms per stage.
        """
        wanted = self._views_fingerprint()
        current = self._stamp_for(wanted)
        if not force and current is not None and self._views_stamp() == current:
            return False
        # The views are built in a private file that is then renamed over the old one, so a reader
        # holding the old file open (the duckdb CLI, a notebook, `radchain sql`) never blocks a run,
        # and a reader opening it meanwhile sees the old views or the new ones, never half of them.
        tmp = self.duckdb_path.with_name(f".{self.duckdb_path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        tmp.unlink(missing_ok=True)
        self._build_views(tmp)
        os.replace(tmp, self.duckdb_path)
        stamp = self._stamp_for(wanted)
        if stamp is not None:  # its temporary file matches the cleanup glob of ensure() too
            _atomic_text(self._stamp_path, stamp, tmp.with_name(tmp.name + ".views"))
        return True

    @property
    def _stamp_path(self) -> Path:
        return self.duckdb_path.with_name(f".{self.duckdb_path.name}.views")

    def _views_fingerprint(self) -> str:
        from warehouse import views

        parts = [str(self.parquet_dir), duckdb.__version__, json.dumps(views.VIEWS, sort_keys=True),
                 json.dumps(views.DESCRIPTIONS, sort_keys=True)]
        for spec in catalog():
            parts += [spec.name, spec.description, spec.model.arrow_schema().to_string(show_schema_metadata=False)]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()

    def _stamp_for(self, fingerprint: str) -> str | None:
        """The stamp the views file would carry now (None when there is no file)."""
        try:
            st = self.duckdb_path.stat()
        except FileNotFoundError:
            return None
        return f"{fingerprint} {st.st_size} {st.st_mtime_ns}"

    def _views_stamp(self) -> str | None:
        try:
            return self._stamp_path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None

    def _build_views(self, path: Path) -> None:
        with duckdb.connect(str(path)) as con:
            for spec in catalog():
                glob = str(self.table_dir(spec.name) / "*.parquet").replace("'", "''")
                con.execute(
                    f'CREATE OR REPLACE VIEW "{spec.name}" AS '
                    f"SELECT * FROM read_parquet('{glob}', union_by_name = true)"
                )
                con.execute(f"COMMENT ON VIEW \"{spec.name}\" IS '{spec.description.replace(chr(39), chr(39) * 2)}'")
            from warehouse import views  # derived views for common joins

            views.create_all(con)

    def table_dir(self, table: str) -> Path:
        return self.parquet_dir / table

    # ---- writes ------------------------------------------------------------------------
    def write(self, model: type[TableRecord], partition: str, rows: Frame, lineage: Lineage) -> int:
        """Replace one partition of a table with ``rows`` (lineage columns are filled here)."""
        if not _SAFE_PARTITION.match(partition):
            raise WarehouseError(f"unsafe partition name {partition!r}")
        table = self._to_arrow(model, rows, lineage)
        path = self.table_dir(model.__table__) / f"{partition}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._atomic_write(table, path)
        return table.num_rows

    def write_batch(
        self, stage: str, partition: str, lineage: Lineage, frames: Mapping[type[TableRecord], Frame]
    ) -> dict[str, int]:
        """Write several tables for one batch, then one materialization record per table."""
        counts: dict[str, int] = {}
        now = datetime.now(UTC)
        mats = []
        for model, rows in frames.items():
            n = self.write(model, partition, rows, lineage)
            counts[model.__table__] = n
            mats.append(
                dict(table_name=model.__table__, partition=partition, rows=n,
                     path=str(self.table_dir(model.__table__) / f"{partition}.parquet"), written_at=now)
            )
        self.write(Materialization, f"{stage}-{partition}", mats, lineage)
        return counts

    def delete_partitions(self, table: str, keep: Iterable[str] | None = None, prefix: str = "") -> int:
        """Remove partitions of a table whose name starts with ``prefix`` and is not in ``keep``."""
        keep_set = set(keep or ())
        n = 0
        for f in self.table_dir(table).glob(f"{prefix}*.parquet"):
            if f.name != "_schema.parquet" and f.stem not in keep_set:
                f.unlink()
                n += 1
        return n

    def _to_arrow(self, model: type[TableRecord], rows: Frame, lineage: Lineage) -> pa.Table:
        schema = model.arrow_schema()
        if isinstance(rows, pl.DataFrame):
            tbl = rows.to_arrow()
        elif isinstance(rows, pa.Table):
            tbl = rows
        else:
            rows = list(rows)
            tbl = pa.Table.from_pylist(rows, schema=_without(schema, Lineage.model_fields)) if rows else None
            if tbl is None:
                return schema.empty_table()
        n = tbl.num_rows
        for col, val in lineage.model_dump().items():
            if col in tbl.column_names:
                tbl = tbl.drop_columns([col])
            tbl = tbl.append_column(col, pa.array([val] * n, pa.string()))
        missing = [f.name for f in schema if f.name not in tbl.column_names]
        extra = [c for c in tbl.column_names if c not in schema.names]
        if missing or extra:
            raise WarehouseError(f"{model.__table__}: columns missing {missing} / unexpected {extra}")
        try:
            return tbl.select(schema.names).cast(schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            raise WarehouseError(f"{model.__table__}: rows do not match the table schema: {e}") from e

    @staticmethod
    def _atomic_write(table: pa.Table, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        pq.write_table(table, tmp, compression="zstd")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    # ---- reads -------------------------------------------------------------------------
    def scan(self, table: str | type[TableRecord]) -> pl.LazyFrame:
        """Lazy polars scan of a whole table (all partitions)."""
        name = table if isinstance(table, str) else table.__table__
        model = table_model(name)
        files = sorted(self.table_dir(name).glob("*.parquet"))
        if not files:
            return pl.LazyFrame(schema=pl.from_arrow(model.arrow_schema().empty_table()).schema)
        # The table's schema, missing columns inserted as nulls: partitions written before a column was
        # added (e.g. int_llm_calls.cached_tokens) still scan.
        schema = pl.from_arrow(model.arrow_schema().empty_table()).schema
        return pl.scan_parquet(files, schema=schema, missing_columns="insert")

    def read(self, table: str | type[TableRecord]) -> pl.DataFrame:
        return self.scan(table).collect()

    def partitions(self, table: str) -> list[str]:
        return sorted(f.stem for f in self.table_dir(table).glob("*.parquet") if f.name != "_schema.parquet")

    def count(self, table: str) -> int:
        total = 0
        for f in self.table_dir(table).glob("*.parquet"):
            total += pq.read_metadata(f).num_rows
        return total

    # ---- SQL ---------------------------------------------------------------------------
    def sql(self, query: str) -> pa.Table:
        """Run a query on a read-only connection; writes are refused with a clear error."""
        if not self.duckdb_path.exists():
            raise WarehouseError(f"no warehouse at {self.root}; run `radchain run` first")
        try:
            con = duckdb.connect(str(self.duckdb_path), read_only=True)
        except duckdb.Error as e:
            raise WarehouseError(f"cannot open the warehouse read-only (is a run writing it?): {e}") from e
        with con:
            try:
                statements = con.extract_statements(query)
            except duckdb.Error as e:
                raise WarehouseError(f"SQL error: {e}") from e
            if not statements:
                raise WarehouseError("empty query")
            for st in statements:
                kind = st.type.name
                if kind not in _READ_STATEMENTS:
                    raise WarehouseError(
                        f"refused: `radchain sql` is read-only and this is a {kind} statement; "
                        "only SELECT-style queries run here"
                    )
            try:
                result = None
                for st in statements:
                    result = con.sql(st.query).to_arrow_table()
                return result
            except duckdb.Error as e:
                raise WarehouseError(f"SQL error: {e}") from e


def _without(schema: pa.Schema, names: Iterable[str]) -> pa.Schema:
    drop = set(names)
    return pa.schema([f for f in schema if f.name not in drop])


def _atomic_text(path: Path, text: str, tmp: Path) -> None:
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _writer_gone(tmp: Path) -> bool:
    """True when the process named in a temporary file's name (``.tmp-<pid>``) no longer runs.

    A live writer's file must survive: ``ensure`` may run in another process (a training job,
    a Dask worker) while a pipeline is still writing.
    """
    m = re.search(r"\.tmp-(\d+)", tmp.name)
    if m is None:
        return True
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False
