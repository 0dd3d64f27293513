"""Prefect artifacts an operator sees on every pipeline run (keyed, so the UI keeps history)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.stages.common import BatchResult, RunContext


def stage_count_rows(results: Mapping[str, Sequence[BatchResult]]) -> list[dict]:
    rows = []
    for stage, batches in results.items():
        rows.append(dict(
            stage=stage,
            batches=len(batches),
            inputs=sum(b.inputs for b in batches),
            outputs=sum(b.outputs for b in batches),
            rejected=sum(b.rejected for b in batches),
            skipped=sum(b.skipped for b in batches),
            wall_s=round(sum(b.wall_s for b in batches), 3),
        ))
    return rows


def publish_run_artifacts(ctx: RunContext, results: Mapping[str, Sequence[BatchResult]]) -> None:
    create_table_artifact(
        key="stage-counts",
        table=stage_count_rows(results),
        description=f"Per-stage counts of run {ctx.run_id}: inputs = outputs + rejected + skipped.",
    )
    reasons = ctx.warehouse.sql(
        "SELECT stage, reason_code, count(*) AS n, list(entity_id ORDER BY entity_id)[1:3] AS examples "
        f"FROM int_rejections WHERE run_id = '{ctx.run_id}' GROUP BY ALL ORDER BY n DESC LIMIT 20"
    ).to_pylist()
    md = ["| stage | reason | n | examples |", "|---|---|---|---|"]
    md += [f"| {r['stage']} | {r['reason_code']} | {r['n']} | {', '.join(r['examples'])} |" for r in reasons]
    create_markdown_artifact(
        key="rejection-reasons",
        markdown="## Top rejection reasons\n\n" + ("\n".join(md) if reasons else "No rejections."),
        description=f"Rejections of run {ctx.run_id}",
    )
