"""The only code that touches storage: Parquet partitions, DuckDB views, read-only SQL."""

from warehouse.store import Warehouse, WarehouseError
from warehouse.catalog import catalog, table_model

__all__ = ["Warehouse", "WarehouseError", "catalog", "table_model"]
