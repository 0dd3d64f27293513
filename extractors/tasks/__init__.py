"""VQA task builders: binary, single, multi, open and temporal samples from labels.

Pure functions over polars frames (no Prefect, no DuckDB). ``build_tasks`` is the entry point
the ``tasks`` stage calls; each builder can also be called alone on a prepared ``Corpus``.
"""

from extractors.tasks.build import StudyRejection, TaskBuildResult, build_tasks, check_patient_splits
from extractors.tasks.common import TaskCaps, TaskConfig, TaskOutput, format_question
from extractors.tasks.prepare import Corpus, prepare
from extractors.tasks.temporal import (
    CSV_NAME, PROGRESSION_LABELS, classify_progression, id_key, label_sources, progression_cues, read_temporal_csv,
)

__all__ = [
    "CSV_NAME", "PROGRESSION_LABELS", "Corpus", "StudyRejection", "TaskBuildResult", "TaskCaps", "TaskConfig",
    "TaskOutput", "build_tasks", "check_patient_splits", "classify_progression", "format_question", "id_key",
    "label_sources", "prepare", "progression_cues", "read_temporal_csv",
]
