"""Table-level lineage: which job reads which tables and writes which (the `radchain docs` graph).

Until the stage contract declares reads and writes on each stage (a stage module's ``READS`` /
``WRITES``, when present, win over this table), the pipeline stages' inputs and outputs are listed
here, with the training and evaluation jobs. Views depend on the tables their SQL names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# job -> (tables read, tables written). Bookkeeping tables every stage writes are in BOOKKEEPING.
JOB_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ingest": ((), ("raw_reports", "stg_sections", "stg_studies", "stg_images")),
    "label": (("raw_reports", "stg_sections"), ("int_labels",)),
    "tasks": (("stg_studies", "stg_images", "int_labels"), ("int_vqa_samples",)),
    "mine": (("int_vqa_samples", "raw_reports", "int_labels"), ("int_chains", "int_chain_steps", "int_llm_calls")),
    "datasets": (("int_vqa_samples", "int_labels", "int_chains", "int_chain_steps"),
                 ("mart_sft_examples", "mart_rl_prompts", "mart_benchmark", "fct_dataset_versions")),
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
    """JOB_IO, with the pipeline stages' own declarations where a stage module has them."""
    from flows.pipeline import ALL_STAGES, stage_module

    out = dict(JOB_IO)
    for stage in ALL_STAGES:
        mod = stage_module(stage)
        reads, writes = getattr(mod, "READS", None), getattr(mod, "WRITES", None)
        if reads is not None and writes is not None:
            out[stage] = (tuple(getattr(t, "__table__", t) for t in reads),
                          tuple(getattr(t, "__table__", t) for t in writes))
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
