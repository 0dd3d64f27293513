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
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.audit import Materialization
from schemas.base import Lineage, TableRecord
from warehouse.catalog import catalog, table_model

_SAFE_PARTITION = re.compile(r"^[A-Za-z0-9_.=-]{1,200}$")
# Statement types `radchain sql` runs: only what DuckDB's parser types as SELECT. COPY, SET,
# ATTACH, PRAGMA, EXPLAIN (ANALYZE runs what it wraps) ... are refused before anything runs.
_READ_STATEMENTS = {"SELECT"}


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
        """Remove partitions of a table whose name starts with ``prefix`` and is not in ``keep``;
        fct_materializations forgets them too (it must not list files that no longer exist)."""
        keep_set = set(keep or ())
        gone: dict[str, int | None] = {}
        for f in self.table_dir(table).glob(f"{prefix}*.parquet"):
            if f.name != "_schema.parquet" and f.stem not in keep_set:
                f.unlink()
                gone[f"{table}\x00{f.stem}"] = None
        if gone and table != Materialization.__table__:
            self._update_materializations(gone)
        return len(gone)

    # ---- baselines: what a stage saw before it started, kept until it finishes ----------------
    def _baseline_path(self, name: str) -> Path:
        if not _SAFE_PARTITION.match(name):
            raise WarehouseError(f"unsafe baseline name {name!r}")
        return self.root / f".baseline-{name}.parquet"

    def keep_baseline(self, name: str, frame: pl.DataFrame) -> bool:
        """Store ``frame`` as a stage's baseline unless one is already there; returns whether stored.

        A run killed before it finished leaves its baseline, so the next run compares against
        the state before the killed one (not against the half-written state it left)."""
        path = self._baseline_path(name)
        if path.exists():
            return False
        self._atomic_write(frame.to_arrow(), path)
        return True

    def baseline(self, name: str) -> pl.DataFrame | None:
        path = self._baseline_path(name)
        return pl.read_parquet(path) if path.exists() else None

    def drop_baseline(self, name: str) -> None:
        self._baseline_path(name).unlink(missing_ok=True)

    def drop_rows(self, table: str, drop: pl.Expr) -> int:
        """Remove the rows matching ``drop`` from every partition of a table; returns how many.

        A partition that changes is rewritten atomically with its rows' lineage as it was (the
        rows stay those their run wrote); its fct_materializations row gets the new row count.
        """
        schema = table_model(table).arrow_schema()
        removed = 0
        changed: dict[str, int | None] = {}
        drop = drop.fill_null(False)
        for f in sorted(self.table_dir(table).glob("*.parquet")):
            if f.name == "_schema.parquet":
                continue
            # Only the columns the predicate names are read to find out whether the partition changes.
            if pl.scan_parquet(f).filter(drop).select(pl.len()).collect().item() == 0:
                continue
            df = pl.read_parquet(f)
            kept = df.filter(~drop)
            if kept.height == df.height:
                continue
            self._atomic_write(kept.to_arrow().select(schema.names).cast(schema), f)
            removed += df.height - kept.height
            changed[f"{table}\x00{f.stem}"] = kept.height
        if changed and table != Materialization.__table__:
            self._update_materializations(changed)
        return removed

    def _update_materializations(self, parts: Mapping[str, int | None]) -> None:
        """fct_materializations rows of these partitions ("<table>\\x00<partition>"): removed (None) or
        given a new row count. Matched by table and partition, not by path, so a moved home works too."""
        mat_dir = self.table_dir(Materialization.__table__)
        schema = Materialization.arrow_schema()
        gone = [k for k, n in parts.items() if n is None]
        counts = {k: n for k, n in parts.items() if n is not None}
        key = pl.col("table_name") + "\x00" + pl.col("partition")
        for f in sorted(mat_dir.glob("*.parquet")):
            if f.name == "_schema.parquet":
                continue
            df = pl.read_parquet(f)
            if not df.select(key.is_in(list(parts)).any()).item():
                continue
            df = df.filter(~key.is_in(gone))
            if counts:
                df = df.with_columns(key.replace_strict(counts, default=pl.col("rows"), return_dtype=pl.Int64)
                                     .alias("rows"))
            self._atomic_write(df.to_arrow().select(schema.names).cast(schema), f)

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
        """Run one read-only query (see ``statements``) and return its result."""
        results = self.statements(query)
        if len(results) != 1:
            raise WarehouseError(f"{len(results)} statements given where one is expected")
        return results[0].table

    def statements(self, query: str, *, explain: bool = False) -> list["SqlResult"]:
        """Run every statement of ``query`` on a locked-down connection; one result per statement.

        Read-only is a property of the connection, not of a text filter:

        * the views file is opened read-only, and before any statement runs the connection is
          limited to this warehouse's Parquet folder (``allowed_directories``), then loses all
          other file and network access (``enable_external_access=false``), extension installs
          and loads, and any later change of these settings (``lock_configuration=true``);
        * every statement must be one that DuckDB's own parser types as SELECT (that includes
          FROM-first queries, VALUES, DESCRIBE, SUMMARIZE, SHOW). ``allowed_directories`` does not
          tell reading from writing (a COPY into the Parquet folder would pass it), and EXPLAIN
          ANALYZE executes the statement it wraps, so COPY, EXPLAIN, SET, PRAGMA, CALL, ATTACH,
          PREPARE/EXECUTE, CREATE ... are refused before anything runs. ``explain=True`` shows the
          plan of each (checked) SELECT instead of its rows.

        All statements are checked before the first one runs, so a refused statement anywhere
        means none runs.
        """
        if not self.duckdb_path.exists():
            raise WarehouseError(f"no warehouse at {self.root}; run `radchain run` first")
        self._views_here()
        with tempfile.TemporaryDirectory(prefix="radchain-sql-") as spill, self._locked_connection(spill) as con:
            try:
                parsed = con.extract_statements(query)
            except duckdb.Error as e:
                raise WarehouseError(f"SQL error: {e}") from e
            if not parsed:
                raise WarehouseError("empty query: give at least one SELECT statement")
            for i, st in enumerate(parsed, start=1):
                kind = st.type.name
                if kind not in _READ_STATEMENTS:
                    where = f"statement {i} of {len(parsed)} " if len(parsed) > 1 else ""
                    hint = (" (EXPLAIN ANALYZE runs the statement it wraps: use `radchain sql --explain` "
                            "to see the plan of a SELECT)" if kind == "EXPLAIN" else "")
                    raise WarehouseError(
                        f"refused: `radchain sql` is read-only and runs only SELECT statements; {where}is of type "
                        f"{kind}, so nothing was run{hint}: {_clip(st.query)}")
            out = []
            for st in parsed:
                text = st.query.strip().rstrip(";").strip()
                runnable = st
                if explain:
                    runnable = con.extract_statements(f"EXPLAIN {text}")
                    if len(runnable) != 1 or runnable[0].type.name != "EXPLAIN":  # pragma: no cover - defensive
                        raise WarehouseError(f"cannot explain: {_clip(text)}")
                    runnable = runnable[0]
                try:
                    rel = con.sql(runnable)
                    table = rel.to_arrow_table() if rel is not None else pa.table({})
                except duckdb.PermissionException as e:
                    raise WarehouseError(
                        f"refused: `radchain sql` reads only the warehouse's tables (files under "
                        f"{self.parquet_dir}); {e}") from e
                except duckdb.Error as e:
                    raise WarehouseError(f"SQL error: {e}") from e
                out.append(SqlResult(text, table))
            return out

    @contextmanager
    def read_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection locked down like `radchain sql`'s (data checks run their SELECTs on it)."""
        self._views_here()
        with tempfile.TemporaryDirectory(prefix="radchain-sql-") as spill, self._locked_connection(spill) as con:
            yield con

    def _locked_connection(self, spill_dir: str) -> duckdb.DuckDBPyConnection:
        """A private in-memory DuckDB with the views file attached read-only, then locked down.

        Private: settings such as ``enable_external_access`` are per database instance, and a
        connection to the file itself would share its instance (and so these settings) with any
        other connection this process holds on it, a notebook's say, or be refused for having
        another configuration.
        """
        con = duckdb.connect(":memory:", config={
            "autoinstall_known_extensions": False, "autoload_known_extensions": False,
            # Spill files go to a private folder that is removed afterwards, never the warehouse.
            "temp_directory": spill_dir,
        })
        try:
            try:
                con.execute("ATTACH $1 AS warehouse (READ_ONLY)", [str(self.duckdb_path)])
                con.execute("USE warehouse")
            except duckdb.Error as e:
                raise WarehouseError(f"cannot open the warehouse read-only (is a run writing it?): {e}") from e
            # Order matters: allowed_directories can be set only while external access is still on,
            # and nothing can be set once the configuration is locked.
            con.execute("SET allowed_directories = $1", [[str(self.parquet_dir) + os.sep]])
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
        except BaseException:
            con.close()
            raise
        return con

    def _views_here(self) -> None:
        """Views hold absolute paths: a copied or moved warehouse has views that read the original.

        Its stamp then names another folder (or the file changed), so the views are rebuilt for
        this folder first. So are the views of a warehouse an older radchain wrote: a table added
        since has no folder there yet, which :meth:`ensure` creates (with its empty schema file)
        before the views that read it. Should that fail (a read-only copy), the locked connection
        still refuses to read outside this warehouse: such a query fails, it never reads the original.
        """
        if self._views_stamp() == self._stamp_for(self._views_fingerprint()):
            return
        try:
            self.ensure()
        except (OSError, duckdb.Error) as e:
            raise WarehouseError(
                f"the views in {self.duckdb_path} are out of date (the warehouse was copied or moved, or "
                f"written by another radchain version) and cannot be rebuilt here ({e}); make the folder "
                f"writable and run the query again") from e


class SqlResult(NamedTuple):
    """One statement of a ``Warehouse.statements`` call and its result."""

    statement: str
    table: pa.Table


def _clip(text: str, limit: int = 200) -> str:
    text = " ".join(text.split()).rstrip(";")
    return text if len(text) <= limit else text[:limit] + " ..."


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
