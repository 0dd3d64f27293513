"""What every stage shares: the run context, batch results and dead-letter rows.

A stage is a class (flows/stages/contract.py) and the runner (flows/stages/runner.py) runs it;
this module holds the plain data both hand around.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radchain.build_info import code_version
from radchain.settings import Settings
from schemas.base import Lineage, stable_id
from warehouse import Warehouse


@dataclass
class SourceSpec:
    """Where reports come from: a MIMIC-CXR tree, or a generic table with a column mapping."""

    path: Path
    kind: str = "auto"  # auto | mimic | table
    id_col: str = "study_id"
    text_col: str | None = "text"
    findings_col: str | None = None
    impression_col: str | None = None
    patient_col: str | None = None
    split_col: str | None = None
    date_col: str | None = None
    image_col: str | None = None
    trim_ids: bool = False  # table ids are kept as written unless this asks to strip blanks around them


@dataclass
class RunContext:
    settings: Settings
    warehouse: Warehouse
    run_id: str
    source: SourceSpec | None = None
    # The options the run was given (the flow's ``options`` parameter), as given; never written to. Each stage
    # reads its own typed view of them (Stage.Options), the runner its own (RunOptions).
    options: dict[str, Any] = field(default_factory=dict)
    # radchain-<version>[+g<commit>]: read once where the context is made, so remote workers write the same.
    code_version: str = field(default_factory=code_version)

    def lineage(self, batch_id: str, stage_version: str) -> Lineage:
        return Lineage(run_id=self.run_id, batch_id=batch_id, code_version=f"{self.code_version}/{stage_version}")


@dataclass
class BatchResult:
    stage: str
    batch_id: str
    inputs: int
    outputs: int
    rejected: int
    skipped: int
    wall_s: float
    skip_reason: str | None = None
    # table -> partitions this batch wrote (or kept, when reused): what the stage's stale-partition cleanup keeps.
    partitions: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.inputs != self.outputs + self.rejected + self.skipped:
            raise AssertionError(
                f"{self.stage}/{self.batch_id}: inputs {self.inputs} != outputs {self.outputs} "
                f"+ rejected {self.rejected} + skipped {self.skipped}"
            )


def rejection(stage: str, entity_id: str, reason_code: str, detail: str, raw_output: str | None = None) -> dict:
    """A dead-letter row. The id is deterministic so a re-run replaces rather than duplicates."""
    return dict(
        rejection_id=stable_id(stage, entity_id, reason_code),
        stage=stage,
        entity_id=entity_id,
        reason_code=reason_code,
        detail=detail[:2000],
        raw_output=None if raw_output is None else raw_output[:20000],
    )
