"""Multi-finding task: "Which findings are in this chest X-ray?" with 4 same-size sets.

Only studies with 2-5 positive target findings. The true option is the set of positives;
each wrong option is a different set of the same size, drawn uniformly from the sets built
from the study's positives plus its negative findings (so every wrong set names at least one
finding the report rules out). Where negatives are too few for 3 distinct wrong sets, findings
the report does not mention (read as normal) join the pool; uncertain findings never do.
Findings inside a set are in canonical order, so the order never marks the true set.
"""

from __future__ import annotations

import random
from itertools import combinations

import polars as pl

from extractors.tasks.common import (
    TARGET_RANKS, TaskConfig, TaskOutput, make_sample, names, pick_rows, rng_for, shuffled_options, study_ref,
)
from extractors.tasks.prepare import Corpus
from schemas.labels import OBSERVATIONS

TASK = "multi"
STEM = "Which findings are in this chest X-ray?"
MIN_POSITIVES, MAX_POSITIVES = 2, 5
N_WRONG = 3


def _wrong_pool_size() -> pl.Expr:
    """Negatives plus unmentioned targets (targets neither positive, negative nor uncertain)."""
    n_pos, n_unc = pl.col("pos").list.len(), pl.col("unc").list.len()
    return pl.lit(len(TARGET_RANKS)) - n_pos - n_unc


def multi_candidates(corpus: Corpus) -> tuple[pl.DataFrame, int]:
    """Studies that can give a multi sample, and how many with 2-5 positives could not."""
    n_pos = pl.col("pos").list.len()
    sized = corpus.profiles.filter(n_pos.is_between(MIN_POSITIVES, MAX_POSITIVES))
    w = _wrong_pool_size()
    # Distinct same-size wrong sets available = C(k + w, k) - 1; at least 3 needs w >= 2,
    # or w == 1 with k >= 3 (C(k + 1, k) - 1 = k).
    enough = (w >= 2) | ((w == 1) & (n_pos >= 3))
    return sized.filter(enough), sized.filter(~enough).height


def wrong_sets(
    pos: list[int], neg: list[int], unmentioned: list[int], rng: random.Random
) -> list[tuple[int, ...]] | None:
    """3 distinct same-size sets other than the truth: from positives + negatives when they suffice,
    else with unmentioned findings too; None when even that gives fewer than 3."""
    truth = tuple(sorted(pos))
    for pool in (sorted(pos + neg), sorted(pos + neg + unmentioned)):
        candidates = [c for c in combinations(pool, len(truth)) if c != truth]
        if len(candidates) >= N_WRONG:
            return rng.sample(candidates, N_WRONG)
    return None


def build_multi(corpus: Corpus, config: TaskConfig) -> TaskOutput:
    out = TaskOutput(TASK)
    cand, too_few = multi_candidates(corpus)
    out.skip("TOO_FEW_WRONG_SETS", too_few)
    out.eligible = set(cand["study_id"].to_list())
    for (split,), group in sorted(cand.partition_by(["split"], as_dict=True).items()):
        for row in pick_rows(group, config.caps.multi, rng_for(config.seed, TASK, split)):
            pos, neg = list(row["pos"]), list(row["neg"])
            known = set(pos) | set(neg) | set(row["unc"])
            unmentioned = [r for r in TARGET_RANKS if r not in known]
            rng = rng_for(config.seed, TASK, row["study_id"])
            wrong = wrong_sets(pos, neg, unmentioned, rng)
            if wrong is None:  # cannot happen after the filter above; kept as a guard
                out.skip("TOO_FEW_WRONG_SETS")
                continue
            sets = [tuple(sorted(pos)), *wrong]
            shuffled, answer = shuffled_options(sets, 0, rng)
            options = [", ".join(names(s)) for s in shuffled]
            asked = sorted({r for s in sets for r in s})
            out.samples.append(make_sample(
                TASK, study_ref(row), STEM, options, answer_index=answer, answer_text=options[answer],
                findings=[OBSERVATIONS[r] for r in asked], answer_findings=names(pos),
            ))
    return out
