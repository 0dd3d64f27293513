"""Shared by tests/test_crash_recovery.py and tests/test_dask_runner.py: a warehouse's content as (rows, hash)
per table, so two warehouses built different ways (killed and resumed, in-process and on Dask) compare."""

from __future__ import annotations

import hashlib
import json

import polars as pl

# Columns that name the run or the clock, never the data.
VOLATILE = ("run_id", "wall_s", "finished_at", "written_at", "built_at", "created_at", "started_at", "scored_at")
# Run history: one row per run (audit_runs) and per run's checks (fct_check_results); runs made differently
# add their own rows by design, so these are not compared.
HISTORY_TABLES = ("audit_runs", "fct_check_results")


def table_hashes(warehouse) -> dict[str, tuple[int, str]]:
    """(rows, order-independent row-set hash) of every catalog table but the run history; the warehouse's
    own folder is written as <WH> so two warehouses compare equal when their rows are."""
    from warehouse.catalog import catalog

    root = str(warehouse.root)
    out = {}
    for spec in catalog():
        if spec.name in HISTORY_TABLES:
            continue
        df = warehouse.read(spec.name)
        if spec.name == "fct_materializations":
            df = df.filter(~pl.col("table_name").is_in(list(HISTORY_TABLES)))
        df = df.drop(*VOLATILE, strict=False)
        rows = sorted(json.dumps(r, sort_keys=True, default=str).replace(root, "<WH>") for r in df.to_dicts())
        out[spec.name] = (len(rows), hashlib.sha256("\n".join(rows).encode()).hexdigest())
    return out
