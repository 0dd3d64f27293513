"""Running the data checks declared in schemas/ (schemas.checks) as SQL over the warehouse's views.

Each check compiles to one SELECT of the failing rows (an ``id`` and an optional ``detail`` line);
``run_checks`` counts them and keeps a sample of ids, on one locked, read-only DuckDB connection
(the same lock-down as ``radchain sql``). ``write_results`` stores the outcomes in
``fct_check_results``; ``dataset_versions_passed`` tells which dataset versions passed the checks
of the run that built them (what ``train`` picks from).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import duckdb
import polars as pl

from schemas.base import Lineage
from schemas.checks import Check, CheckResult, checks_of
from warehouse.catalog import catalog, table_model
from warehouse.store import Warehouse

SAMPLE_IDS = 5
ON_DEMAND = "on-demand"


def all_checks(tables: Iterable[str] | None = None) -> list[Check]:
    """The checks of these tables (all tables when None), in catalog order."""
    wanted = None if tables is None else set(tables)
    return [c for spec in catalog() if wanted is None or spec.name in wanted for c in checks_of(spec.model)]


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _key_id(table: str, alias: str = "") -> str:
    """The table's key as one VARCHAR id ('|'-joined; null parts shown as 'null')."""
    key = table_model(table).__key__ or ("run_id", "batch_id")
    parts = [f"coalesce(CAST({alias}{_q(k)} AS VARCHAR), 'null')" for k in key]
    return parts[0] if len(parts) == 1 else "concat_ws('|', " + ", ".join(parts) + ")"


def compile_check(check: Check, run_id: str | None = None, params: Mapping[str, Any] | None = None) -> str:
    """One SELECT returning the failing rows as (id VARCHAR, detail VARCHAR)."""
    t = _q(check.table)
    if check.scope == "run" and run_id is not None:
        t = f"(SELECT * FROM {t} WHERE run_id = {_lit(run_id)})"
    cols = [_q(c) for c in check.columns]
    if check.kind == "unique":
        joined = cols[0] if len(cols) == 1 else "concat_ws('|', " + ", ".join(
            f"coalesce(CAST({c} AS VARCHAR), 'null')" for c in cols) + ")"
        return (f"SELECT CAST({joined} AS VARCHAR) AS id, format('{{}} rows share this key', count(*)) AS detail "
                f"FROM {t} GROUP BY {', '.join(cols)} HAVING count(*) > 1")
    if check.kind == "not_null":
        cond = " OR ".join(f"{c} IS NULL" for c in cols)
        return f"SELECT {_key_id(check.table)} AS id, NULL::VARCHAR AS detail FROM {t} WHERE {cond}"
    if check.kind == "accepted_values":
        (c,) = cols
        allowed = ", ".join(_lit(v) for v in check.values)
        return (f"SELECT {_key_id(check.table)} AS id, format('{{}} = {{}}', {_lit(check.columns[0])}, {c}) AS detail "
                f"FROM {t} WHERE {c} IS NOT NULL AND {c} NOT IN ({allowed})")
    if check.kind == "relationship":
        assert check.to_table and len(check.to_columns) == len(cols)
        present = " AND ".join(f"c.{c} IS NOT NULL" for c in cols)
        match = " AND ".join(f"p.{_q(pc)} = c.{c}" for pc, c in zip(check.to_columns, cols))
        shown = ", ".join(f"c.{c}" for c in cols)
        return (f"SELECT {_key_id(check.table, 'c.')} AS id, format('{{}} not in {check.to_table}', "
                f"concat_ws('|', {shown})) AS detail FROM {t} c "
                f"WHERE {present} AND NOT EXISTS (SELECT 1 FROM {_q(check.to_table)} p WHERE {match})")
    if check.kind == "sql":
        assert check.sql
        values = {k: _param(check, k, params) for k in check.params}
        body = check.sql.format(table=t, run_id=_lit(run_id or ""), **values)
        if " AS detail" not in body:
            body = f"SELECT id, NULL::VARCHAR AS detail FROM ({body})"
        return body
    raise ValueError(f"unknown check kind {check.kind!r}")


def _param(check: Check, name: str, params: Mapping[str, Any] | None) -> str:
    if not params or name not in params:
        raise ValueError(f"check {check.name} needs the parameter {name!r}")
    value = params[name]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"check {check.name}: parameter {name} must be a number, got {value!r}")
    return repr(float(value))


@dataclass
class CheckOutcome:
    check: Check
    passed: bool
    failing_rows: int
    sample_ids: list[str]
    detail: str | None
    wall_s: float

    @property
    def line(self) -> str:
        """One line saying what failed (for logs, the run's state message, the CLI)."""
        if self.detail:
            return f"{self.check.name} failed: {self.detail}"
        ids = f"; e.g. {', '.join(self.sample_ids)}" if self.sample_ids else ""
        return f"{self.check.name} failed ({self.failing_rows} failing rows: {self.check.description}){ids}"

    def row(self, stage: str, dataset_version: str | None = None) -> dict[str, Any]:
        c = self.check
        return dict(check_name=c.name, table_name=c.table, kind=c.kind, severity=c.severity, passed=self.passed,
                    failing_rows=self.failing_rows, sample_ids=self.sample_ids, detail=self.detail, stage=stage,
                    dataset_version=dataset_version, description=c.description, wall_s=round(self.wall_s, 6),
                    checked_at=datetime.now(UTC))


def run_checks(wh: Warehouse, checks: Sequence[Check], run_id: str | None = None,
               params: Mapping[str, Any] | None = None, con: Any = None) -> list[CheckOutcome]:
    """Run each check on one read-only connection (``con``, e.g. one a pipeline run keeps open for all its
    stages, or a new one); a check whose SQL fails counts as failed (its error in ``detail``), so a broken
    check is never silently green."""
    if not checks:
        return []
    out = []
    with ExitStack() as stack:
        if con is None:
            con = stack.enter_context(wh.read_connection())
        for check in checks:
            t0 = time.perf_counter()
            try:
                sql = compile_check(check, run_id, params)
                n, sample, detail = con.sql(
                    f"SELECT count(*), (list(id ORDER BY id))[1:{SAMPLE_IDS}], arg_min(detail, id) FROM ({sql})"
                ).fetchall()[0]
            except (duckdb.Error, ValueError, KeyError) as e:
                n, sample, detail = 1, [], f"the check could not run: {' '.join(str(e).split())[:500]}"
            out.append(CheckOutcome(check, n == 0, int(n), [str(s) for s in sample or []], detail,
                                    time.perf_counter() - t0))
    return out


def write_results(wh: Warehouse, outcomes: Sequence[CheckOutcome], run_id: str, stage: str, code_version: str,
                  dataset_version: str | None = None) -> int:
    """Store outcomes in fct_check_results: one partition per (run, stage), so a re-check replaces its rows."""
    if not outcomes:
        return 0
    lineage = Lineage(run_id=run_id, batch_id=stage, code_version=code_version)
    rows = [o.row(stage, dataset_version) for o in outcomes]
    return wh.write_batch("checks", f"{stage}--{run_id}", lineage, {CheckResult: rows})[CheckResult.__table__]


def dataset_versions_passed(wh: Warehouse) -> pl.DataFrame:
    """Dataset versions, newest first, with whether the run that built them checked them and every error
    check passed: columns dataset_version, built_at, run_id, checks, failed_errors, passed."""
    versions = wh.read("fct_dataset_versions").select("dataset_version", "built_at", "run_id")
    results = (wh.scan("fct_check_results").filter(pl.col("stage") == "datasets")
               .select("run_id", "dataset_version", "severity", "passed").collect())
    per = results.group_by("run_id", "dataset_version").agg(
        pl.len().alias("checks"),
        ((pl.col("severity") == "error") & ~pl.col("passed")).sum().alias("failed_errors"))
    joined = versions.join(per, on=["run_id", "dataset_version"], how="left").with_columns(
        pl.col("checks").fill_null(0), pl.col("failed_errors").fill_null(0))
    return joined.with_columns(((pl.col("checks") > 0) & (pl.col("failed_errors") == 0)).alias("passed")).sort(
        "built_at", descending=True)
