"""Warehouse reads and writes of the scoring command: the gold a prediction set is scored
against, and the evaluation tables (fct_eval_results, fct_predictions)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import polars as pl

import schemas.eval  # noqa: F401  (registers the evaluation tables in the catalog)
from schemas.base import Lineage
from schemas.eval import EvalResult, ScoredPrediction
from warehouse.store import Warehouse

_SAMPLE_COLUMNS = ("sample_id", "task", "study_id", "options", "answer_letter", "answer_findings")
_STEP_COLUMNS = ("chain_id", "sample_id", "step_index", "text", "findings")
_LABEL_COLUMNS = ("study_id", "observation", "value")


def read_gold_rows(
    wh: Warehouse, sample_ids: Iterable[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(samples, chain steps, labels) rows for the given sample ids, as dicts.

    Only the rows those samples need are read (filters are pushed into the Parquet scan).
    """
    ids = sorted(set(sample_ids))
    samples = wh.scan("int_vqa_samples").filter(pl.col("sample_id").is_in(ids)).select(_SAMPLE_COLUMNS).collect()
    steps = wh.scan("int_chain_steps").filter(pl.col("sample_id").is_in(ids)).select(_STEP_COLUMNS).collect()
    studies = sorted(set(samples["study_id"].to_list()))
    labels = wh.scan("int_labels").filter(pl.col("study_id").is_in(studies)).select(_LABEL_COLUMNS).collect()
    return samples.to_dicts(), steps.to_dicts(), labels.to_dicts()


def count_samples(wh: Warehouse) -> int:
    return wh.count("int_vqa_samples") if wh.table_dir("int_vqa_samples").exists() else 0


def write_eval(
    wh: Warehouse,
    eval_id: str,
    results: Sequence[dict[str, Any]],
    predictions: Sequence[dict[str, Any]],
    lineage: Lineage,
) -> dict[str, int]:
    """Replace this evaluation's partitions (partition = eval_id: a re-score rewrites, never duplicates)."""
    counts = wh.write_batch("score", eval_id, lineage, {EvalResult: list(results), ScoredPrediction: list(predictions)})
    wh.refresh_views()
    return counts
