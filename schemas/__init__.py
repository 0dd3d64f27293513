"""The contract: one pydantic model per warehouse table, plus the records stages exchange.

Importing this package registers every table in ``TableRecord.registry``.
"""

from schemas.base import Lineage, TableRecord, stable_id
from schemas.ingest import Image, RawReport, Section, Study
from schemas.labels import OBSERVATIONS, TARGET_OBSERVATIONS, Label
from schemas.vqa import TASKS, VqaSample
from schemas.chains import ChainRow, ChainStepRow, Evidence, ReasoningChain, ReasoningStep, StepFinding
from schemas.llm import LlmCall
from schemas.checks import Check, CheckResult
from schemas.audit import Materialization, Rejection, RunRecord, StageCount
from schemas.datasets import BenchmarkItem, DatasetVersion, RlPrompt, SftExample
from schemas.training import TrainingRun
from schemas.eval import EvalResult, ScoredPrediction

__all__ = [
    "OBSERVATIONS", "TARGET_OBSERVATIONS", "TASKS",
    "BenchmarkItem", "ChainRow", "Check", "CheckResult", "ChainStepRow", "DatasetVersion", "EvalResult", "Evidence", "Image", "Label",
    "Lineage", "LlmCall", "Materialization", "RawReport", "ReasoningChain", "ReasoningStep",
    "Rejection", "RlPrompt", "RunRecord", "ScoredPrediction", "Section", "SftExample", "StageCount", "StepFinding", "Study",
    "TableRecord", "TrainingRun", "VqaSample", "stable_id",
]
