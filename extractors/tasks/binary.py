"""Binary task: "Does this chest X-ray show {finding}?" A) Yes B) No.

Balanced like the release: for each target finding and split, equally many studies labelled
positive and negative (uncertain excluded), at most ``caps.binary // 2`` of each. Options keep
the fixed Yes/No order of the release; balance, not shuffling, keeps the letter uninformative.
"""

from __future__ import annotations

import polars as pl

from extractors.tasks.common import (
    NEGATIVE, POSITIVE, TARGET_RANKS, TaskConfig, TaskOutput, make_sample, pick_rows, rng_for, study_ref,
)
from extractors.tasks.prepare import Corpus
from schemas.labels import OBSERVATIONS

TASK = "binary"
STEM = "Does this chest X-ray show {finding}?"
OPTIONS = ("Yes", "No")


def binary_candidates(corpus: Corpus) -> pl.DataFrame:
    """(study, finding, value) for every positive or negative target label of a gate-passing study."""
    return (
        corpus.labels.filter(pl.col("obs").is_in(list(TARGET_RANKS)) & pl.col("value").is_in([POSITIVE, NEGATIVE]))
        .join(corpus.profiles.select("study_id", "patient_id", "split", "image_path"), on="study_id", how="inner")
    )


def build_binary(corpus: Corpus, config: TaskConfig) -> TaskOutput:
    out = TaskOutput(TASK)
    cand = binary_candidates(corpus)
    out.eligible = set(cand["study_id"].to_list())
    per_class = config.caps.binary // 2
    for (split, obs), group in sorted(cand.partition_by(["split", "obs"], as_dict=True).items()):
        positives = group.filter(pl.col("value") == POSITIVE)
        negatives = group.filter(pl.col("value") == NEGATIVE)
        k = min(positives.height, negatives.height, per_class)
        if positives.height == 0 or negatives.height == 0:
            out.skip("NO_BALANCING_PARTNER", group.height)  # one class is empty in this split
        finding = OBSERVATIONS[obs]
        rng = rng_for(config.seed, TASK, split, finding)
        for value, frame in ((POSITIVE, positives), (NEGATIVE, negatives)):
            for row in pick_rows(frame, k, rng):
                is_yes = value == POSITIVE
                out.samples.append(make_sample(
                    TASK, study_ref(row), STEM.format(finding=finding.lower()), OPTIONS,
                    answer_index=0 if is_yes else 1, answer_text=OPTIONS[0] if is_yes else OPTIONS[1],
                    findings=[finding], answer_findings=[finding] if is_yes else [],
                ))
    return out
