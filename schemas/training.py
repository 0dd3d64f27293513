"""The run registry of training jobs."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from schemas.base import TableRecord


class TrainingRun(TableRecord):
    __table__ = "fct_training_runs"
    __description__ = "Every SFT/GRPO job: config, dataset version, metrics, checkpoint path, status, wall time."
    __grain__ = "one training job"
    __key__ = ("training_run_id",)

    training_run_id: str
    kind: Literal["sft", "grpo"]
    config_name: str
    config_json: str
    dataset_version: str
    init_checkpoint: str | None = None
    checkpoint: str | None = None
    status: Literal["completed", "diverged", "failed"]
    metrics_json: str
    n_examples: int
    n_skipped: int  # examples dropped before training (e.g. an image file missing)
    wall_s: float
    started_at: datetime
    finished_at: datetime
    error: str | None = None
