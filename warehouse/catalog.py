"""The table catalog, collected from the pydantic table models in schemas/."""

from __future__ import annotations

from dataclasses import dataclass

import schemas  # noqa: F401  (importing registers every table)
from schemas.base import Lineage, TableRecord

LINEAGE_COLUMNS = tuple(Lineage.model_fields)


@dataclass(frozen=True)
class TableSpec:
    name: str
    layer: str
    description: str
    grain: str
    key: tuple[str, ...]
    model: type[TableRecord]


def catalog() -> list[TableSpec]:
    order = {layer: i for i, layer in enumerate(("raw", "stg", "int", "mart", "fct", "audit"))}
    specs = [
        TableSpec(name, m.layer(), m.__description__, m.__grain__, m.__key__, m)
        for name, m in TableRecord.registry.items()
    ]
    return sorted(specs, key=lambda s: (order[s.layer], s.name))


def table_model(name: str) -> type[TableRecord]:
    try:
        return TableRecord.registry[name]
    except KeyError:
        raise KeyError(f"unknown table {name!r}; known: {', '.join(sorted(TableRecord.registry))}") from None
