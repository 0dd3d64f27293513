"""A stage added in one module, as a user would add one: its table's schema model and its class.

Importing this module is all it takes to register both (tests/test_stage_contract.py shows it runs in
DAG order, with the runner's cleanup and lineage). It counts the positive findings of each labeled
study: a study with none is rejected (NO_POSITIVE_FINDING), one with fewer than the option
``toy_min_positives`` is skipped (BELOW_MIN_POSITIVES).
"""

from __future__ import annotations

from collections import Counter

import polars as pl

from flows.stages.common import rejection
from flows.stages.contract import BatchOutput, Stage, StageOptions
from schemas.base import TableRecord
from schemas.labels import Label


class ToyPositives(TableRecord):
    __table__ = "int_toy_positives"
    __description__ = "Toy stage (tests): the number of positive findings of each labeled study."
    __grain__ = "one study"
    __key__ = ("study_id",)

    study_id: str
    positives: int


class ToyOptions(StageOptions):
    toy_min_positives: int = 1


class ToyStage(Stage):
    name = "toy"
    version = "toy-v1"
    reads = (Label,)
    writes = (ToyPositives,)
    Options = ToyOptions
    progress_unit = "batches"  # the runner shows progress (Stage.units: one per batch)

    def plan(self) -> list[str]:
        return self.wh.partitions(Label.__table__)  # one batch per label partition

    def process(self, batch: str) -> BatchOutput:
        labels = pl.read_parquet(self.wh.table_dir(Label.__table__) / f"{batch}.parquet",
                                 columns=["study_id", "value"])
        studies = sorted(set(labels["study_id"].to_list()))
        positives = Counter(sid for sid, value in labels.iter_rows() if value == "positive")
        rows, rejected, skipped = [], [], 0
        for sid in studies:
            n = positives.get(sid, 0)
            if n == 0:
                rejected.append(rejection(self.name, sid, "NO_POSITIVE_FINDING", "no observation is positive"))
            elif n < self.options.toy_min_positives:
                skipped += 1
            else:
                rows.append(dict(study_id=sid, positives=n))
        return BatchOutput(inputs=len(studies), outputs=len(rows), rejections=rejected, skipped=skipped,
                           skip_reason="BELOW_MIN_POSITIVES" if skipped else None, frames={ToyPositives: rows})
