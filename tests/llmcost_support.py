"""Shared setup of tests/test_llm_cost.py and tests/test_llm_batch.py: a small warehouse ready for mining
(ingest, label and tasks by the rule path), copied fresh for each run, and a mine-stage runner that
reads its LLM settings from the environment, as a deployment does."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

CORPUS_STUDIES = 30
CORPUS_SEED = 7
BATCH_SIZE = 40  # reports per ingest partition: several mine batches
FAST_LLM_ENV = {
    "RADCHAIN_BATCH_SIZE": str(BATCH_SIZE),
    "RADCHAIN_LLM_MAX_CONCURRENCY": "8",
    "RADCHAIN_LLM_REQUESTS_PER_MINUTE": "0",
    "RADCHAIN_LLM_TOKENS_PER_MINUTE": "0",
    "RADCHAIN_LLM_BACKOFF_INITIAL_S": "0.01",
    "RADCHAIN_LLM_BACKOFF_MAX_S": "0.05",
    "RADCHAIN_LLM_TIMEOUT_S": "5",
    "RADCHAIN_LLM_BATCH_POLL_S": "0.05",
    "OPENAI_API_KEY": "sk-test-llm-cost",
}


def build_pristine(root: Path) -> Path:
    """A warehouse with samples and no chains; returns its folder (copy it into a home's warehouse/)."""
    from extractors.synthetic import generate_corpus
    from flows.pipeline import make_context, run_stages
    from flows.stages.common import SourceSpec
    from radchain.settings import Settings

    corpus = root / "corpus"
    generate_corpus(corpus, studies=CORPUS_STUDIES, seed=CORPUS_SEED, images=False)
    settings = Settings(home=root / "build-home", batch_size=BATCH_SIZE)
    ctx = make_context(settings, SourceSpec(path=corpus), extractor="rules", show_progress=False)
    run_stages(ctx, ["ingest", "label", "tasks"])
    return settings.warehouse_dir


def fresh_home(pristine: Path, home: Path) -> Path:
    if home.exists():
        shutil.rmtree(home)
    shutil.copytree(pristine, home / "warehouse")
    return home


def llm_env(home: Path, base_url: str, **extra: str) -> dict[str, str]:
    return {**FAST_LLM_ENV, "RADCHAIN_HOME": str(home), "OPENAI_BASE_URL": base_url, **extra}


def mine(monkeypatch: Any, home: Path, base_url: str, env: dict[str, str] | None = None, progress: Any = None,
         **options: Any):
    """Run the mine stage (LLM extractor) with settings from the environment; returns (ctx, results).
    ``progress`` (a StageProgress) is the stage's progress, handed to the runner (never through the options)."""
    from flows.pipeline import make_context, run_stages
    from radchain.settings import reset_settings_cache

    for k, v in llm_env(home, base_url, **(env or {})).items():
        monkeypatch.setenv(k, v)
    reset_settings_cache()
    ctx = make_context(extractor="llm", show_progress=False, **options)
    factory = None if progress is None else (lambda stage, total, unit: progress)
    results = run_stages(ctx, ["mine"], progress=factory)["mine"]
    return ctx, results


__all__ = ["build_pristine", "fresh_home", "llm_env", "mine"]
