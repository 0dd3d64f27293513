"""Single-finding task: "Which finding is in this chest X-ray?" with 4 options.

One option is true: a positive target finding, or "No Finding" for a study labelled No
Finding with no positive target (the only task where No Finding appears). The 3 distractors
are drawn only from observations labelled negative for that study, so a distractor is never
merely unmentioned or uncertain; a study with fewer than 3 negatives is skipped for that
class (TOO_FEW_NEGATIVES). Up to ``caps.single`` positives per class and split; options are
shuffled with the seed.
"""

from __future__ import annotations

import polars as pl

from extractors.tasks.common import (
    NEGATIVE, NO_FINDING_RANK, POSITIVE, TaskConfig, TaskOutput, make_sample, names, pick_rows, rng_for,
    shuffled_options, study_ref,
)
from extractors.tasks.prepare import Corpus
from schemas.labels import OBSERVATIONS

TASK = "single"
STEM = "Which finding is in this chest X-ray?"
N_DISTRACTORS = 3


def single_candidates(corpus: Corpus) -> pl.DataFrame:
    """(study, true class, distractor pool) pairs; ``pool`` = the study's negative observations."""
    p = corpus.profiles.with_columns(
        # No Finding is a valid distractor only where the study is explicitly labelled without it.
        pool=pl.when(pl.col("no_finding") == NEGATIVE)
        .then(pl.concat_list("neg", pl.lit([NO_FINDING_RANK], dtype=pl.List(pl.Int8))))
        .otherwise(pl.col("neg")),
    )
    findings = p.explode("pos").filter(pl.col("pos").is_not_null()).rename({"pos": "true_obs"})
    normal = (
        p.filter((pl.col("no_finding") == POSITIVE) & (pl.col("pos").list.len() == 0))
        .with_columns(true_obs=pl.lit(NO_FINDING_RANK, dtype=pl.Int8))
        .drop("pos")
    )
    cols = ["study_id", "patient_id", "split", "image_path", "true_obs", "pool"]
    return pl.concat([findings.select(cols), normal.select(cols)])


def build_single(corpus: Corpus, config: TaskConfig) -> TaskOutput:
    out = TaskOutput(TASK)
    cand = single_candidates(corpus)
    enough = pl.col("pool").list.len() >= N_DISTRACTORS
    out.skip("TOO_FEW_NEGATIVES", cand.filter(~enough).height)
    cand = cand.filter(enough)
    out.eligible = set(cand["study_id"].to_list())
    for (split, true_obs), group in sorted(cand.partition_by(["split", "true_obs"], as_dict=True).items()):
        truth = OBSERVATIONS[true_obs]
        group_rng = rng_for(config.seed, TASK, split, truth)
        for row in pick_rows(group, config.caps.single, group_rng):
            rng = rng_for(config.seed, TASK, row["study_id"], truth)
            distractors = rng.sample(names(row["pool"]), N_DISTRACTORS)
            options, answer = shuffled_options([truth, *distractors], 0, rng)
            out.samples.append(make_sample(
                TASK, study_ref(row), STEM, options, answer_index=answer, answer_text=truth,
                findings=options, answer_findings=[truth],
            ))
    return out
