"""Prefect artifacts an operator sees on every pipeline run (keyed, so the UI keeps history)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.stages.common import BatchResult, RunContext
from warehouse import Warehouse

# Artifact keys: one key per kind, so the UI (Artifacts → key) lists every run's version of it.
STAGE_COUNTS_KEY = "stage-counts"
REJECTIONS_KEY = "rejection-reasons"
LLM_SPEND_KEY = "llm-spend"
DATASET_VERSIONS_KEY = "dataset-versions"


def save_figure(fig: Any, title: str, path: Path) -> Path:
    """Title, lay out and write a matplotlib figure as a PNG at ``path`` (its folder made), then free it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


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


def llm_spend_rows(wh: Warehouse, run_id: str) -> list[dict[str, Any]]:
    """LLM calls of one run by stage, model and prompt version, plus a 'total' row (always present)."""
    calls = wh.scan("int_llm_calls").filter(pl.col("run_id") == run_id)
    aggs = [
        pl.len().alias("calls"),
        pl.col("cache_hit").cast(pl.Int64).sum().alias("cache_hits"),
        (pl.col("status") != "ok").cast(pl.Int64).sum().alias("failed"),
        pl.col("prompt_tokens").sum().alias("prompt_tokens"),
        pl.col("cached_tokens").fill_null(0).sum().alias("cached_tokens"),  # served from the provider's prompt cache
        pl.col("completion_tokens").sum().alias("completion_tokens"),
        pl.col("cost_usd").sum().alias("cost_usd"),
    ]
    calls = calls.with_columns(pl.col("mode").fill_null("sync"))
    keys = ("stage", "model", "prompt_version", "mode")
    groups = calls.group_by(*keys).agg(aggs).sort(*keys)
    rows = groups.collect().to_dicts()
    total = calls.select(aggs).collect().to_dicts()[0]
    rows.append(dict(stage="total", model="", prompt_version="", mode="", **total))
    for r in rows:
        for k in ("calls", "cache_hits", "failed", "prompt_tokens", "cached_tokens", "completion_tokens"):
            r[k] = int(r[k] or 0)
        r["cost_usd"] = round(float(r["cost_usd"] or 0.0), 6)
        r["cache_hit_rate"] = round(r["cache_hits"] / r["calls"], 3) if r["calls"] else 0.0
    return rows


def dataset_version_rows(wh: Warehouse, run_id: str) -> list[dict[str, Any]]:
    """Dataset versions this run wrote (fct_dataset_versions rows whose lineage is the run)."""
    frame = (wh.scan("fct_dataset_versions").filter(pl.col("run_id") == run_id)
             .select("dataset_version", "builder_version", "n_sft", "n_rl", "n_benchmark", "built_at")
             .sort("built_at").collect())
    return [{**r, "built_at": r["built_at"].isoformat(timespec="seconds") if r["built_at"] else None}
            for r in frame.to_dicts()]


def publish_llm_spend(wh: Warehouse, run_id: str) -> list[dict[str, Any]]:
    rows = llm_spend_rows(wh, run_id)
    total = rows[-1]
    create_table_artifact(
        key=LLM_SPEND_KEY,
        table=rows,
        description=f"LLM spend of run {run_id}: {total['calls']} calls, {total['cache_hits']} cache hits, "
                    f"{total['prompt_tokens'] + total['completion_tokens']} tokens, ${total['cost_usd']:.4f} "
                    "(from int_llm_calls)",
    )
    return rows


def publish_dataset_versions(wh: Warehouse, run_id: str) -> list[dict[str, Any]]:
    rows = dataset_version_rows(wh, run_id)
    if rows:
        create_table_artifact(
            key=DATASET_VERSIONS_KEY,
            table=rows,
            description=f"Dataset versions written by run {run_id} (fct_dataset_versions); train with "
                        f"`dataset_version={rows[-1]['dataset_version']}`",
        )
    return rows


def publish_run_artifacts(ctx: RunContext, results: Mapping[str, Sequence[BatchResult]]) -> None:
    create_table_artifact(
        key=STAGE_COUNTS_KEY,
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
        key=REJECTIONS_KEY,
        markdown="## Top rejection reasons\n\n" + ("\n".join(md) if reasons else "No rejections."),
        description=f"Rejections of run {ctx.run_id}",
    )
    publish_llm_spend(ctx.warehouse, ctx.run_id)
    publish_dataset_versions(ctx.warehouse, ctx.run_id)


def image_counts(wh: Warehouse) -> dict[str, int]:
    """stg_images rows per status (ok / missing / corrupt), plus 'listed'."""
    if not wh.table_dir("stg_images").exists():
        return {"listed": 0}
    scan = wh.scan("stg_images")
    if "status" not in scan.collect_schema().names():  # written before images were checked
        frame = scan.select(pl.when(pl.col("exists")).then(pl.lit("ok")).otherwise(pl.lit("missing"))
                            .alias("status")).collect()
    else:
        frame = scan.select("status").collect()
    counts = {k: int(v) for k, v in frame.group_by("status").len().iter_rows()}
    return {"listed": frame.height, **{k: counts.get(k, 0) for k in ("ok", "missing", "corrupt")}}


def run_notes(wh: Warehouse, source: Any, results: Mapping[str, Sequence[BatchResult]]) -> list[str]:
    """Warnings the run summary prints under the stage counts: image files that are not there or do not
    decode, a table source without images, a tasks stage that built nothing (and why)."""
    notes: list[str] = []
    if "ingest" in results:
        counts = image_counts(wh)
        is_table = source is not None and getattr(source, "path", None) is not None and source.path.is_file()
        if is_table and not getattr(source, "image_col", None):
            notes.append("the report table was read without --image-col, so no study has an image and the tasks "
                         "stage builds no samples (NO_IMAGE); pass --image-col COLUMN (paths relative to the table)")
        bad = counts.get("missing", 0) + counts.get("corrupt", 0)
        if bad:
            example = (wh.scan("stg_images").filter(~pl.col("exists")).select("path").sort("path").head(1)
                       .collect()["path"].to_list())
            notes.append(f"{bad} of {counts['listed']} image files are unusable: {counts.get('missing', 0)} do not "
                         f"exist, {counts.get('corrupt', 0)} do not decode (e.g. {example[0] if example else '?'}); "
                         "a study left without a usable image is rejected by tasks (IMAGE_MISSING / IMAGE_CORRUPT; "
                         "a MIMIC tree with no image file at all keeps its samples as text-only data); see "
                         "stg_images.status")
    tasks = results.get("tasks")
    if tasks and sum(b.outputs for b in tasks) == 0 and wh.table_dir("int_vqa_samples").exists() \
            and wh.count("int_vqa_samples") == 0:
        reasons = (wh.scan("int_rejections").filter(pl.col("stage") == "tasks").group_by("reason_code").len()
                   .sort("len", descending=True).head(3).collect())
        why = ", ".join(f"{r} ({n})" for r, n in reasons.iter_rows()) or "no study passed the gates"
        notes.append(f"the tasks stage built no samples from {sum(b.inputs for b in tasks)} studies: {why}")
    return notes
