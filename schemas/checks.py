"""Data checks, declared beside the table models (the way dbt declares schema tests next to a model).

A table model lists its checks in ``__checks__``; some are derived from the model itself and need no
declaration: ``unique`` and ``not_null`` over ``__key__``, and ``accepted_values`` for every column
annotated with a ``Literal``. A check is data, not code: its kind, the columns it looks at and, for
the checks no generic kind expresses, a SELECT that returns the failing rows' ids. warehouse/checks.py
compiles each one to SQL and runs it over the warehouse's DuckDB views; results land in
``fct_check_results`` (the table model is here too).

Severity: an ``error`` check that fails stops the run (the pipeline flow ends Failed with the check's
line); a ``warn`` check is reported in the logs, the run's artifact and ``radchain check``.

Placeholders in a ``sql`` check: ``{table}`` is the checked table (restricted to the run's rows when
the check's scope is ``run`` and a run is given), ``{run_id}`` the run, and ``{name}`` any parameter
of ``params`` (a threshold given by a setting, e.g. the mine acceptance rate).
"""

from __future__ import annotations

import types
import typing
from datetime import datetime
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field

from schemas.base import TableRecord

Severity = Literal["error", "warn"]
CheckKind = Literal["unique", "not_null", "accepted_values", "relationship", "sql"]


class Check(BaseModel):
    """One declared data check of one table."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="unique name, <table>.<what> by convention")
    table: str = Field(description="the table the check belongs to (it runs after a stage writes it)")
    kind: CheckKind
    severity: Severity = "error"
    columns: tuple[str, ...] = ()
    values: tuple[str, ...] = Field(default=(), description="accepted_values: the allowed values")
    to_table: str | None = Field(default=None, description="relationship: the parent table")
    to_columns: tuple[str, ...] = Field(default=(), description="relationship: the parent's columns")
    sql: str | None = Field(default=None, description="kind sql: a SELECT of the failing rows, one `id` column")
    scope: Literal["table", "run"] = Field(
        default="table", description="run: in a pipeline run, only the rows this run wrote are checked")
    params: tuple[str, ...] = Field(default=(), description="names of the thresholds the SQL reads")
    reads: tuple[str, ...] = Field(default=(), description="kind sql: other tables or views the SQL reads")
    description: str = ""

    @property
    def upstream(self) -> tuple[str, ...]:
        """Other tables the check reads (relationships, SQL checks' joins)."""
        return ((self.to_table,) if self.to_table else ()) + self.reads


# ---- declaring checks (used in the table models' __checks__) -------------------------------------
def unique(table: str, *columns: str, severity: Severity = "error", name: str | None = None) -> Check:
    return Check(name=name or f"{table}.unique({','.join(columns)})", table=table, kind="unique", columns=columns,
                 severity=severity, description=f"no two rows share ({', '.join(columns)})")


def not_null(table: str, *columns: str, severity: Severity = "error", name: str | None = None) -> Check:
    return Check(name=name or f"{table}.not_null({','.join(columns)})", table=table, kind="not_null",
                 columns=columns, severity=severity, description=f"{', '.join(columns)} never null")


def accepted_values(table: str, column: str, values: tuple[str, ...] | list[str], severity: Severity = "error",
                    name: str | None = None) -> Check:
    return Check(name=name or f"{table}.accepted_values({column})", table=table, kind="accepted_values",
                 columns=(column,), values=tuple(values), severity=severity,
                 description=f"{column} is one of {', '.join(values)} (or null)")


def relationship(table: str, columns: str | tuple[str, ...], to_table: str, to_columns: str | tuple[str, ...],
                 severity: Severity = "error", name: str | None = None, description: str = "",
                 scope: Literal["table", "run"] = "table") -> Check:
    cols = (columns,) if isinstance(columns, str) else tuple(columns)
    tos = (to_columns,) if isinstance(to_columns, str) else tuple(to_columns)
    return Check(name=name or f"{table}.{'+'.join(cols)}->{to_table}", table=table, kind="relationship",
                 columns=cols, to_table=to_table, to_columns=tos, severity=severity, scope=scope,
                 description=description or f"every {', '.join(cols)} exists in {to_table}")


def sql_check(table: str, name: str, sql: str, description: str, severity: Severity = "error",
              scope: Literal["table", "run"] = "table", params: tuple[str, ...] = (),
              reads: tuple[str, ...] = ()) -> Check:
    return Check(name=f"{table}.{name}", table=table, kind="sql", sql=sql, description=description,
                 severity=severity, scope=scope, params=params, reads=reads)


# ---- checks the model implies -------------------------------------------------------------------
def _literal_values(annotation: Any) -> tuple[str, ...] | None:
    tp = annotation
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) != 1:
            return None
        tp = args[0]
    if get_origin(tp) is Literal:
        values = get_args(tp)
        if all(isinstance(v, str) for v in values):
            return tuple(values)
    return None


def checks_of(model: type[TableRecord]) -> list[Check]:
    """Every check of a table: those implied by its key and Literal columns, then its declared ones."""
    table = model.__table__
    out: list[Check] = []
    if model.__key__:
        out.append(not_null(table, *model.__key__))
        out.append(unique(table, *model.__key__))
    for col, field in model.model_fields.items():
        values = _literal_values(field.annotation)
        if values:
            out.append(accepted_values(table, col, values))
    out.extend(getattr(model, "__checks__", ()))
    return out


# ---- the results table ---------------------------------------------------------------------------
class CheckResult(TableRecord):
    __table__ = "fct_check_results"
    __description__ = ("Every data check run: check, table, severity, whether it passed, failing rows and a "
                       "sample of their ids; the run id is the pipeline run (or `radchain check`) that ran it.")
    __grain__ = "one check in one run (after one stage, or on demand)"
    __key__ = ("run_id", "stage", "check_name")

    check_name: str = Field(description="the check's declared name, <table>.<what>")
    table_name: str = Field(description="the table it checks")
    kind: str = Field(description="unique | not_null | accepted_values | relationship | sql")
    severity: Severity = Field(description="error: a failure fails the run; warn: reported only")
    passed: bool = Field(description="no failing row")
    failing_rows: int = Field(description="rows (or groups) that break the check")
    sample_ids: list[str] = Field(description="up to 5 ids of failing rows (the table's key, '|'-joined)")
    detail: str | None = Field(default=None, description="what the first failing row says (SQL checks), e.g. a rate")
    stage: str = Field(description="the pipeline stage after which it ran, or 'on-demand' (`radchain check`)")
    dataset_version: str | None = Field(
        default=None, description="the dataset version the datasets stage built in this run (train reads it)")
    description: str = Field(description="what the check asserts")
    wall_s: float = Field(description="seconds the check's query took")
    checked_at: datetime
