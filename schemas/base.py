"""The base of every table model: lineage columns, catalog metadata, Arrow schema.

A table is declared once, as a pydantic model; its Arrow schema (and so its Parquet
schema and DuckDB view) is derived from the annotations here, so the two never drift.
"""

from __future__ import annotations

import hashlib
import types
import typing
from datetime import date, datetime
from enum import Enum
from typing import Any, ClassVar, Literal, get_args, get_origin

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

LAYERS = ("raw", "stg", "int", "mart", "fct", "audit")


class Lineage(BaseModel):
    """Columns every warehouse row carries, so any row can be traced to the run that wrote it."""

    run_id: str
    batch_id: str
    code_version: str


class TableRecord(Lineage):
    """One row of a warehouse table. Subclasses set the ClassVars; the catalog collects them."""

    model_config = ConfigDict(extra="forbid")

    __table__: ClassVar[str] = ""
    __description__: ClassVar[str] = ""
    __grain__: ClassVar[str] = ""  # what one row is
    __key__: ClassVar[tuple[str, ...]] = ()  # columns that identify a row
    # Declared data checks (schemas.checks.Check); key, not-null and Literal checks are implied.
    __checks__: ClassVar[tuple[Any, ...]] = ()

    registry: ClassVar[dict[str, type["TableRecord"]]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        name = cls.__dict__.get("__table__")
        if name:
            layer = name.split("_", 1)[0]
            if layer not in LAYERS:
                raise ValueError(f"table {name!r}: layer prefix must be one of {LAYERS}")
            TableRecord.registry[name] = cls

    @classmethod
    def layer(cls) -> str:
        return cls.__table__.split("_", 1)[0]

    @classmethod
    def arrow_schema(cls) -> pa.Schema:
        return arrow_schema_of(cls)

    @classmethod
    def column_names(cls) -> list[str]:
        return list(cls.model_fields)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        nullable = len(args) < len(get_args(tp))
        if len(args) == 1:
            return args[0], nullable
        raise TypeError(f"unions other than Optional are not storable: {tp}")
    return tp, False


def arrow_type(tp: Any) -> pa.DataType:
    tp, _ = _strip_optional(tp)
    origin = get_origin(tp)
    if tp is str:
        return pa.string()
    if tp is bool:
        return pa.bool_()
    if tp is int:
        return pa.int64()
    if tp is float:
        return pa.float64()
    if tp is datetime:
        return pa.timestamp("us", tz="UTC")
    if tp is date:
        return pa.date32()
    if origin is Literal or (isinstance(tp, type) and issubclass(tp, Enum)):
        return pa.string()
    if origin in (list, tuple):
        (inner, *_) = get_args(tp) or (str,)
        return pa.list_(arrow_type(inner))
    if origin is dict:
        k, v = get_args(tp)
        return pa.map_(arrow_type(k), arrow_type(v))
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return pa.struct([pa.field(n, arrow_type(f.annotation), nullable=True) for n, f in tp.model_fields.items()])
    raise TypeError(f"no Arrow type for {tp!r}")


def arrow_schema_of(model: type[BaseModel]) -> pa.Schema:
    fields = []
    for name, f in model.model_fields.items():
        _, nullable = _strip_optional(f.annotation)
        fields.append(pa.field(name, arrow_type(f.annotation), nullable=nullable or not f.is_required()))
    return pa.schema(fields)


def stable_id(*parts: Any, length: int = 16) -> str:
    """Deterministic id from content, so a re-run rewrites the same rows instead of adding new ones."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(str(p).encode("utf-8", "surrogatepass"))
        h.update(b"\x1f")
    return h.hexdigest()[:length]
