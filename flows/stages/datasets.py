"""Stage `datasets`: versioned SFT, RL and benchmark marts from accepted chains.

A dataset version is a hash of its inputs, so a re-run over unchanged chains rewrites the
same partition; a changed input produces a new version beside the old one (the stage replaces
nothing of earlier runs: every version, its audit row and its records stay).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import polars as pl

from flows.stages.common import RunContext
from flows.stages.contract import BatchOutput, Stage, StageOptions
from schemas.chains import ChainRow, ChainStepRow
from schemas.datasets import BenchmarkItem, DatasetVersion, RlPrompt, SftExample
from schemas.labels import Label
from schemas.vqa import VqaSample
from training.datasets import BUILDER_VERSION, DEFAULT_MIXTURE, build_marts

NAME = "datasets"
VERSION = BUILDER_VERSION


class DatasetsOptions(StageOptions):
    mixture: dict[str, float] | None = None  # task -> weight (default training.datasets.DEFAULT_MIXTURE)


class DatasetsStage(Stage):
    name = NAME
    version = VERSION
    reads = (VqaSample, Label, ChainRow, ChainStepRow)
    writes = (SftExample, RlPrompt, BenchmarkItem, DatasetVersion)
    history = (SftExample, RlPrompt, BenchmarkItem, DatasetVersion)
    replaces = False
    Options = DatasetsOptions

    def process(self, batch: str) -> BatchOutput:
        return build_version(self.ctx, self.options)


def _chains(ctx: RunContext) -> dict[str, dict[str, Any]]:
    chains = ctx.warehouse.read("int_chains").select("chain_id", "sample_id", "text")
    steps = ctx.warehouse.read("int_chain_steps")
    by_chain: dict[str, list[dict]] = {}
    for r in steps.iter_rows(named=True):
        by_chain.setdefault(r["chain_id"], []).append(r)
    return {r["sample_id"]: dict(chain_id=r["chain_id"], sample_id=r["sample_id"], text=r["text"],
                                 steps=by_chain.get(r["chain_id"], []))
            for r in chains.iter_rows(named=True)}


def build_version(ctx: RunContext, options: DatasetsOptions) -> BatchOutput:
    samples = ctx.warehouse.read("int_vqa_samples").to_dicts()
    studies = list({s["study_id"] for s in samples})
    labels: dict[str, dict[str, str]] = {}
    for r in (ctx.warehouse.scan("int_labels").filter(pl.col("study_id").is_in(studies))
              .select("study_id", "observation", "value").collect().iter_rows()):
        labels.setdefault(r[0], {})[r[1]] = r[2]
    mixture = options.mixture or DEFAULT_MIXTURE
    chains = _chains(ctx)
    marts = build_marts(samples, chains, labels, mixture)
    v = marts.dataset_version
    version_row = dict(
        dataset_version=v, builder_version=BUILDER_VERSION, n_sft=len(marts.sft), n_rl=len(marts.rl),
        n_benchmark=len(marts.benchmark), mixture_json=json.dumps(mixture, sort_keys=True),
        built_at=datetime.now(UTC),
    )
    # Samples that feed no mart (no accepted chain on the test split, zero-weight tasks) are skipped, not lost.
    # The batch is named by the version: each version is its own partition of every mart.
    return BatchOutput(
        inputs=len(samples), outputs=len(marts.used_samples), skipped=len(samples) - len(marts.used_samples),
        batch_id=v, frames={SftExample: marts.sft, RlPrompt: marts.rl, BenchmarkItem: marts.benchmark,
                            DatasetVersion: [version_row]},
    )
