"""Observation labels (CheXpert vocabulary)."""

from __future__ import annotations

from typing import Literal

from schemas.base import TableRecord
from schemas.checks import relationship

OBSERVATIONS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Lung Opacity",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)
# The 12 findings used as question targets (No Finding only as an option; Pleural Other dropped).
TARGET_OBSERVATIONS = tuple(o for o in OBSERVATIONS if o not in ("No Finding", "Pleural Other"))
TEMPORAL_OBSERVATIONS = ("Consolidation", "Edema", "Pleural Effusion", "Pneumonia", "Pneumothorax")

LabelValue = Literal["positive", "negative", "uncertain", "not_mentioned"]
CHEXPERT_CODE = {1.0: "positive", 0.0: "negative", -1.0: "uncertain", None: "not_mentioned"}


class Label(TableRecord):
    __table__ = "int_labels"
    __description__ = "One label per (study, observation), with the sentence that decided it."
    __grain__ = "one (study, observation)"
    __key__ = ("study_id", "observation")

    study_id: str
    observation: str
    value: LabelValue
    source: Literal["chexpert_csv", "rules", "table"]
    section: str | None = None
    sentence_start: int | None = None  # offsets into raw_reports.text
    sentence_end: int | None = None
    sentence: str | None = None

    __checks__ = (
        relationship("int_labels", "study_id", "raw_reports", "study_id"),
    )
