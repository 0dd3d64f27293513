"""Views for the joins data engineers ask for most. Later stages add theirs here."""

from __future__ import annotations

import duckdb

VIEWS: dict[str, str] = {
    "v_stage_counts": """
        SELECT run_id, stage, sum(inputs) AS inputs, sum(outputs) AS outputs,
               sum(rejected) AS rejected, sum(skipped) AS skipped, round(sum(wall_s), 3) AS wall_s,
               sum(inputs) = sum(outputs) + sum(rejected) + sum(skipped) AS balanced
        FROM audit_stage_counts GROUP BY run_id, stage
    """,
    "v_rejection_reasons": """
        SELECT stage, reason_code, count(*) AS n, min(entity_id) AS example_entity
        FROM int_rejections GROUP BY stage, reason_code
    """,
}


def create_all(con: duckdb.DuckDBPyConnection) -> None:
    for name, body in VIEWS.items():
        con.execute(f'CREATE OR REPLACE VIEW "{name}" AS {body}')
