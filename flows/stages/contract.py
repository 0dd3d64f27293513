"""The stage contract: a stage is one class that declares what it is and does one batch of work.

A stage declares (as class attributes) its ``name`` and ``version``, the tables it ``reads`` and
``writes`` (their schema models from schemas/), its typed ``Options`` (a pydantic model read from
the run's options), and implements

    plan()              the units of work (batches), cheap to compute
    process(batch)      the work of one batch: returns a BatchOutput (rows per table, rejections, counts)
                        and writes nothing itself
    finalize()          optional step after all batches; returns rows of ``final_tables`` (or None)

Everything else is the runner's (flows/stages/runner.py): writing partitions with lineage, the
batch's rejections and audit row, a materialization record for every table written, removing
partitions that the current plan no longer produces, reusing batches whose inputs did not change
(``input_hash`` + ``reuse``), timing, progress and Prefect task runs.

Declaring a subclass with a ``name`` registers it; the pipeline's stage order is a topological sort
of the registered stages by the tables they read and write (``dag_order``). Adding a stage is one
module in flows/stages/ (found by ``discover``) plus its table's schema model.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from flows.stages.common import RunContext
from schemas.base import TableRecord

Frame = Any  # what Warehouse.write takes: a polars DataFrame, an Arrow table or a list of row dicts


class StageOptions(BaseModel):
    """A stage's options: the fields it declares, read from the run's options (other stages' keys ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True, arbitrary_types_allowed=True)

    @classmethod
    def of(cls, ctx: RunContext) -> "StageOptions":
        return cls.model_validate(dict(ctx.options))


class NoOptions(StageOptions):
    pass


@dataclass
class BatchOutput:
    """What one batch produced. The runner writes it; a stage never writes its own rows."""

    inputs: int
    outputs: int
    rejections: Sequence[dict] = ()
    # Rows per table, written to the partition named by the batch id.
    frames: Mapping[type[TableRecord], Frame] = field(default_factory=dict)
    # Rows per table and partition, for tables a batch splits differently (tasks: one per task type;
    # mine's call ledger: one per batch and run).
    partitions: Mapping[type[TableRecord], Mapping[str, Frame]] = field(default_factory=dict)
    skipped: int = 0
    skip_reason: str | None = None
    batch_id: str | None = None  # when the id is known only after the work (datasets: the version hash)
    input_hash: str | None = None  # lineage gets "<version>+in.<hash>"; what ``reuse`` compares
    reused: bool = False  # the stored rows stand; only a new audit row is written
    committed: Callable[[], None] | None = None  # called once every row is written (mine: clear its journal)


class Stage:
    """Base class of a stage. Subclasses set the ClassVars and implement ``process`` (see module doc)."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = ""
    reads: ClassVar[tuple[type[TableRecord], ...]] = ()
    writes: ClassVar[tuple[type[TableRecord], ...]] = ()
    # Written tables that keep every partition ever written (ledgers, snapshots): never cleaned up.
    history: ClassVar[tuple[type[TableRecord], ...]] = ()
    # Written tables that ``finalize`` writes (to ``final_partition``), after the batches.
    final_tables: ClassVar[tuple[type[TableRecord], ...]] = ()
    final_partition: ClassVar[str] = "all"
    # False for a stage whose batches are snapshots kept side by side (datasets: one per version):
    # nothing of earlier runs is removed. True: partitions the current plan did not produce are stale.
    replaces: ClassVar[bool] = True
    Options: ClassVar[type[StageOptions]] = NoOptions
    # A unit name ("samples") makes the runner show progress (terminal bar + Prefect progress artifact).
    progress_unit: ClassVar[str | None] = None
    # Retry a failed batch once (as a Prefect task retry) unless this says the error is final.
    final_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    registry: ClassVar[dict[str, type["Stage"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and cls.name:
            if not cls.version:
                raise TypeError(f"stage {cls.name!r} declares no version")
            Stage.registry[cls.name] = cls

    def __init__(self, ctx: RunContext, options: StageOptions | None = None):
        self.ctx = ctx
        self.options = options if options is not None else self.Options.of(ctx)
        self.progress: Callable[[int], None] | None = None  # set by the runner in the flow's process

    # ---- what a stage implements ------------------------------------------------------------
    def plan(self) -> list[Any]:
        return ["all"]

    def process(self, batch: Any) -> BatchOutput:
        raise NotImplementedError

    def finalize(self) -> Mapping[type[TableRecord], Frame] | None:
        return None

    def batch_id(self, batch: Any) -> str:
        if isinstance(batch, Mapping):
            return str(batch["batch_id"])
        return str(getattr(batch, "batch_id", batch))

    def units(self, batch: Any) -> int:
        """How far a finished batch moves the progress bar (``progress_unit`` items)."""
        return 1

    def input_hash(self, batch: Any) -> str | None:
        """A digest of everything a batch's rows depend on, when the stage can reuse unchanged batches."""
        return None

    def reuse(self, batch: Any, stored: Mapping[str, Any]) -> bool:
        """Whether the stored rows of a batch with the same input hash may stand (the runner checked the
        counts and lineage); ``stored`` holds the audit row and the stored rows' reason codes."""
        return True

    # ---- helpers for stages -----------------------------------------------------------------
    @property
    def wh(self) -> Any:
        return self.ctx.warehouse

    def tick(self, n: int = 1) -> None:
        """Move the progress bar (a no-op outside the flow's process or when progress is off)."""
        if self.progress is not None and n:
            self.progress(n)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["progress"] = None  # a terminal bar and artifact handle stay in the flow's process
        return state

    def __repr__(self) -> str:  # Prefect shows task parameters; keep it short
        return f"<stage {self.name}>"


# ---- the stage list -----------------------------------------------------------------------------
def discover() -> dict[str, type[Stage]]:
    """Import every module of flows/stages/ (declaring a Stage subclass registers it); the registry."""
    import flows.stages as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    return dict(Stage.registry)


class StageOrderError(ValueError):
    """Stages whose reads and writes form a cycle, or name an unknown stage."""


def dag_order(stages: Iterable[type[Stage]] | None = None) -> list[type[Stage]]:
    """Stages in dependency order: a stage comes after every stage that writes a table it reads.

    Among stages ready at the same point (independent of each other) the first by name goes first, so the
    order does not depend on the order modules were imported in."""
    pool = list(stages) if stages is not None else list(discover().values())
    writers: dict[str, list[type[Stage]]] = {}
    for s in pool:
        for t in s.writes:
            writers.setdefault(t.__table__, []).append(s)
    deps = {s: {w for t in s.reads for w in writers.get(t.__table__, ()) if w is not s} for s in pool}
    order: list[type[Stage]] = []
    done: set[type[Stage]] = set()
    while len(order) < len(pool):
        ready = sorted((s for s in pool if s not in done and deps[s] <= done), key=lambda s: s.name)
        if not ready:
            cycle = sorted(s.name for s in pool if s not in done)
            raise StageOrderError(f"the stages {cycle} read each other's tables in a cycle")
        order.append(ready[0])
        done.add(ready[0])
    return order


def stage_names() -> list[str]:
    """Names of every stage, in DAG order: the pipeline's one list of stages."""
    return [s.name for s in dag_order()]


def stage_class(name: str) -> type[Stage]:
    registry = discover()
    try:
        return registry[name]
    except KeyError:
        raise StageOrderError(f"unknown stage {name!r}; known: {', '.join(stage_names())}") from None


def upstream(stage: type[Stage], pool: Sequence[type[Stage]]) -> list[type[Stage]]:
    """The stages of ``pool`` that write a table ``stage`` reads."""
    wanted = {t.__table__ for t in stage.reads}
    return [s for s in pool if s is not stage and wanted & {t.__table__ for t in s.writes}]


def direct_upstream(stage: type[Stage], pool: Sequence[type[Stage]]) -> list[type[Stage]]:
    """``upstream`` less the stages another upstream stage already depends on (the DAG's transitive
    reduction): mine reads what ingest, label and tasks write, but follows only tasks in the graph."""
    ups = upstream(stage, pool)

    def ancestors(s: type[Stage], seen: set) -> set:
        for u in upstream(s, pool):
            if u not in seen:
                seen.add(u)
                ancestors(u, seen)
        return seen

    implied = set().union(*(ancestors(u, set()) for u in ups)) if ups else set()
    return [u for u in ups if u not in implied]
