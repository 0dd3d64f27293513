"""Process-wide environment set before Prefect or Hugging Face libraries are imported."""

from __future__ import annotations

import os

from radchain.settings import Settings, get_settings


def prepare_environment(settings: Settings | None = None) -> Settings:
    """Point Prefect at a project-local home, keep everything offline and quiet.

    Must run before ``import prefect``: Prefect reads its settings at import time.
    """
    settings = settings or get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(settings.prefect_home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The temporary API server Prefect starts per run may take longer than its 20 s default on a
    # loaded 2-core machine (two runs starting at once share one SQLite database).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    return settings
