"""Table-level lineage: which job reads which tables and writes which (the `radchain docs` graph).

The pipeline stages declare what they read and write (flows/stages/contract.py); the training and
evaluation jobs are listed here. Views depend on the tables their SQL names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The jobs outside the pipeline -> (tables read, tables written); the pipeline stages declare their own
# (flows/stages/contract.py). Bookkeeping tables every stage writes are in BOOKKEEPING.
JOB_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "train (sft, grpo)": (("fct_dataset_versions", "fct_check_results", "mart_sft_examples", "mart_rl_prompts"),
                          ("fct_training_runs",)),
    "evaluate": (("mart_benchmark", "mart_rl_prompts"), ("fct_eval_results", "fct_predictions")),
}
BOOKKEEPING = {
    "int_rejections": "every pipeline stage (dead-letter rows)",
    "audit_stage_counts": "every pipeline stage (per-batch counts)",
    "fct_materializations": "every partition write",
    "fct_check_results": "the data checks after every stage, and `radchain check`",
    "audit_runs": "every pipeline flow run",
}


@dataclass(frozen=True)
class Edge:
    source: str  # a table, a view or a job
    target: str
    kind: str  # reads | writes | view


def job_io() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Every job's (tables read, tables written): the pipeline stages in DAG order, as their classes
    declare them, then the training and evaluation jobs."""
    from flows.stages.contract import dag_order

    out = {cls.name: (tuple(t.__table__ for t in cls.reads), tuple(t.__table__ for t in cls.writes))
           for cls in dag_order()}
    out.update(JOB_IO)
    return out


def view_dependencies() -> dict[str, tuple[str, ...]]:
    """Each view and the tables or views its SQL names."""
    from warehouse.catalog import catalog
    from warehouse.views import VIEWS

    names = [s.name for s in catalog()] + list(VIEWS)
    return {view: tuple(n for n in names if n != view and re.search(rf"\b{re.escape(n)}\b", sql))
            for view, sql in VIEWS.items()}


def lineage_edges() -> list[Edge]:
    edges: list[Edge] = []
    for job, (reads, writes) in job_io().items():
        edges += [Edge(t, job, "reads") for t in reads]
        edges += [Edge(job, t, "writes") for t in writes]
    for view, deps in view_dependencies().items():
        edges += [Edge(d, view, "view") for d in deps]
    return edges
