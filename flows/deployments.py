"""The deployments, schedules, work pools and limits of radchain, declared in the repository.

=============  ===========================  =====  =============  =========================
deployment     flow                         pool   schedule       writes
=============  ===========================  =====  =============  =========================
mine           radchain-pipeline            cpu    02:00 daily    the whole warehouse
train          radchain-train               cpu    04:00 Sunday   via sft → grpo → evaluate
sft            radchain-sft                 gpu    (triggered)    fct_training_runs
grpo           radchain-grpo                gpu    (triggered)    fct_training_runs
evaluate       radchain-evaluate            gpu    (triggered)    fct_eval_results
=============  ===========================  =====  =============  =========================

Cron schedules are in UTC. ``train`` runs its jobs with ``run_deployment`` (its parameter
``use_deployments`` is true), so each job lands on whatever worker polls the ``gpu`` pool; ``train``
itself only waits for them, so it sits on the ``cpu`` pool instead of holding a GPU. A job whose
config says ``launch: {mode: accelerate}`` starts ``accelerate launch`` with one process per GPU
of its worker (training/launch.py) and records what the launched job wrote.

Each deployment has a concurrency limit of one run with a collision strategy (``enqueue``:
a second run waits in *AwaitingConcurrencySlot*; ``cancel``: it is cancelled at once), so
two runs of one deployment never write the warehouse together; across deployments and
outside Prefect the warehouse write lock (flows/locking.py) does the same. Flow runs retry
once after a failure and batch tasks retry as declared in flows/pipeline.py; both are safe
because every write replaces its own partition.

Code reaches the workers through ``flow.from_source(source, entrypoint)``: by default the
source is this checkout (the worker runs the flow in this folder, so it must see the same
path); pass a git URL as ``code_source`` for workers on other machines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

REPO_DIR = Path(__file__).resolve().parents[1]

CPU_POOL = "cpu"
GPU_POOL = "gpu"
POOLS = {
    CPU_POOL: "CPU jobs of radchain: the data pipeline (ingest, label, tasks, mine, datasets) and the train DAG "
              "that waits for the GPU jobs.",
    GPU_POOL: "GPU jobs of radchain: SFT, GRPO (accelerate launch on the worker's GPUs) and evaluation.",
}
TIMEZONE = "UTC"
COLLISIONS = ("enqueue", "cancel")


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment as declared here (see the table in the module docstring)."""

    name: str
    flow_name: str
    entrypoint: str  # file path relative to the code source : flow function
    work_pool: str
    description: str
    cron: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    concurrency: int = 1
    flow_retries: int = 1
    flow_retry_delay_s: int = 60
    task_retries: int = 1  # for tasks that declare none (explicit task retries win)
    task_retry_delay_s: int = 10

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{self.name}"

    def job_env(self) -> dict[str, str]:
        """Environment of the flow-run process: Prefect's default retries for this deployment."""
        return {
            "PREFECT_FLOWS_DEFAULT_RETRIES": str(self.flow_retries),
            "PREFECT_FLOWS_DEFAULT_RETRY_DELAY_SECONDS": str(self.flow_retry_delay_s),
            "PREFECT_TASKS_DEFAULT_RETRIES": str(self.task_retries),
            "PREFECT_TASKS_DEFAULT_RETRY_DELAY_SECONDS": str(self.task_retry_delay_s),
        }


def deployment_specs(
    source: Path | str | None = None,
    train_config: str = "tiny-cpu",
    extractor: str = "auto",
    stages: list[str] | None = None,
) -> list[DeploymentSpec]:
    """The five deployments. ``source`` is the report source the nightly ``mine`` run ingests
    (a MIMIC-CXR tree or a report table); ``train_config`` names a configs/*.yaml recipe."""
    from flows.stages.contract import stage_names
    from radchain.settings import get_settings

    src = Path(source) if source is not None else get_settings().demo_corpus_dir
    pipeline_params = {
        "source": {"path": str(Path(src).resolve()), "kind": "auto"},
        "stages": list(stages or stage_names()),
        # Progress on: a scheduled run has no terminal (no bar), but its progress artifacts are what an
        # operator watches in the UI while a long stage runs.
        "options": {"extractor": extractor, "show_progress": True},
    }
    return [
        DeploymentSpec(
            name="mine", flow_name="radchain-pipeline", entrypoint="flows/pipeline.py:pipeline_flow",
            work_pool=CPU_POOL, cron="0 2 * * *", parameters=pipeline_params,
            tags=("radchain", "pipeline", "nightly", "warehouse-writer"),
            description="Nightly data pipeline: ingest new studies, label, build VQA tasks, mine and verify "
                        "reasoning chains, rebuild the versioned datasets.",
        ),
        DeploymentSpec(
            name="train", flow_name="radchain-train", entrypoint="flows/training_flows.py:train_flow",
            work_pool=CPU_POOL, cron="0 4 * * 0",
            parameters={"config": train_config, "use_deployments": True},
            tags=("radchain", "training", "weekly"),
            description="Weekly training DAG on the latest dataset version: SFT, then GRPO from the SFT "
                        "checkpoint, then evaluation, each as its own deployment run on the gpu pool; the DAG "
                        "itself only waits, on the cpu pool.",
            flow_retries=0,  # its jobs retry themselves; re-running the DAG would train everything again
        ),
        DeploymentSpec(
            name="sft", flow_name="radchain-sft", entrypoint="flows/training_flows.py:sft_flow",
            work_pool=GPU_POOL, parameters={"config": train_config}, tags=("radchain", "training", "sft"),
            description="Supervised fine-tuning on mart_sft_examples of a dataset version (default: latest).",
        ),
        DeploymentSpec(
            name="grpo", flow_name="radchain-grpo", entrypoint="flows/training_flows.py:grpo_flow",
            work_pool=GPU_POOL, parameters={"config": train_config}, tags=("radchain", "training", "grpo"),
            description="GRPO with outcome, format and process rewards on mart_rl_prompts.",
        ),
        DeploymentSpec(
            name="evaluate", flow_name="radchain-evaluate", entrypoint="flows/training_flows.py:evaluate_flow",
            work_pool=GPU_POOL, parameters={}, tags=("radchain", "evaluation"),
            description="Generate on mart_benchmark with a checkpoint; accuracy and RadRScore per task "
                        "into fct_eval_results and an eval-results artifact.",
        ),
    ]


def to_runner_deployment(spec: DeploymentSpec, code_source: Path | str = REPO_DIR, schedules_active: bool = True,
                         collision: str = "enqueue"):
    """A Prefect RunnerDeployment for one spec (loads the flow from ``code_source``)."""
    from prefect import Flow
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron

    if collision not in COLLISIONS:
        raise ValueError(f"collision strategy must be one of {COLLISIONS}, got {collision!r}")
    strategy = ConcurrencyLimitStrategy.ENQUEUE if collision == "enqueue" else ConcurrencyLimitStrategy.CANCEL_NEW
    flow = Flow.from_source(source=str(code_source), entrypoint=spec.entrypoint)
    if flow.name != spec.flow_name:
        raise ValueError(f"{spec.entrypoint} defines flow {flow.name!r}, expected {spec.flow_name!r}")
    schedules = [Cron(spec.cron, timezone=TIMEZONE, active=schedules_active)] if spec.cron else []
    return flow.to_deployment(
        name=spec.name,
        work_pool_name=spec.work_pool,
        schedules=schedules,
        parameters=spec.parameters,
        tags=list(spec.tags),
        description=spec.description,
        concurrency_limit=ConcurrencyLimitConfig(limit=spec.concurrency, collision_strategy=strategy),
        job_variables={"env": spec.job_env()},
    )


# ---- server-side objects: pools, limits, deployments ---------------------------------------------
def ensure_work_pools(pools: dict[str, str] | None = None) -> list[str]:
    """Create the process work pools (idempotent); returns the names of those created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    created = []
    template = ProcessWorker.get_default_base_job_template()
    with get_client(sync_client=True) as client:
        for name, description in (pools or POOLS).items():
            try:
                client.read_work_pool(name)
                continue
            except ObjectNotFound:
                pass
            client.create_work_pool(WorkPoolCreate(name=name, type="process", description=description,
                                                   base_job_template=template))
            created.append(name)
    return created


def ensure_llm_limit(settings: Any = None) -> tuple[str, int]:
    """Create the global concurrency limit that caps LLM calls across all workers, when absent.

    An existing limit keeps its size (an operator may have resized it in the UI or with
    ``prefect gcl update``); returns its name and size."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    from flows.locking import llm_limit_name, llm_limit_slots

    name = llm_limit_name(settings)
    with get_client(sync_client=True) as client:
        try:
            return name, client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            slots = llm_limit_slots(settings)
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
            return name, slots


def apply_deployments(specs: list[DeploymentSpec] | None = None, code_source: Path | str = REPO_DIR,
                      schedules_active: bool = True, collision: str = "enqueue") -> dict[str, UUID]:
    """Create or update every deployment on the Prefect API; returns full name -> id."""
    ids: dict[str, UUID] = {}
    for spec in specs or deployment_specs():
        ids[spec.full_name] = to_runner_deployment(spec, code_source, schedules_active, collision).apply()
    return ids


def setup_server(specs: list[DeploymentSpec] | None = None, code_source: Path | str = REPO_DIR,
                 schedules_active: bool = True, collision: str = "enqueue", settings: Any = None) -> dict[str, Any]:
    """Everything `radchain serve` and `radchain deploy` create on a Prefect server."""
    created = ensure_work_pools()
    limit = ensure_llm_limit(settings)
    ids = apply_deployments(specs, code_source, schedules_active, collision)
    return dict(pools_created=created, llm_limit=limit, deployments=ids)


def schedule_rows(specs: list[DeploymentSpec] | None = None) -> list[dict[str, Any]]:
    """A table of the deployments for printing (CLI, docs)."""
    return [
        dict(deployment=s.full_name, pool=s.work_pool, schedule=f"{s.cron} ({TIMEZONE})" if s.cron else "on demand",
             concurrency=s.concurrency, retries=s.flow_retries, tags=",".join(s.tags))
        for s in (specs or deployment_specs())
    ]
