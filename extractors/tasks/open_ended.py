"""Open task (anomaly detection): "Which findings are in this chest X-ray?" without options.

The answer is the list of positive target findings in canonical order, or "No Finding" for
a study labelled No Finding with no positive target; it is scored as a set. Uncertain
findings are left out of the answer. ``findings`` equals ``answer_findings`` (there are no
options to name other findings). Up to ``caps.open`` studies per split.
"""

from __future__ import annotations

import polars as pl

from extractors.tasks.common import (
    NO_FINDING, POSITIVE, TaskConfig, TaskOutput, make_sample, names, pick_rows, rng_for, study_ref,
)
from extractors.tasks.prepare import Corpus

TASK = "open"
STEM = "Which findings are in this chest X-ray?"


def open_candidates(corpus: Corpus) -> pl.DataFrame:
    return corpus.profiles.filter((pl.col("pos").list.len() > 0) | (pl.col("no_finding") == POSITIVE))


def build_open(corpus: Corpus, config: TaskConfig) -> TaskOutput:
    out = TaskOutput(TASK)
    cand = open_candidates(corpus)
    out.eligible = set(cand["study_id"].to_list())
    for (split,), group in sorted(cand.partition_by(["split"], as_dict=True).items()):
        for row in pick_rows(group, config.caps.open, rng_for(config.seed, TASK, split)):
            answer = names(row["pos"]) or [NO_FINDING]
            out.samples.append(make_sample(
                TASK, study_ref(row), STEM, options=[], answer_index=None, answer_text=", ".join(answer),
                findings=answer, answer_findings=answer,
            ))
    return out
