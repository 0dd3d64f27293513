"""Process-wide environment set before Prefect or Hugging Face libraries are imported."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager

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


_FREEZE_DEPTH = 0


@contextmanager
def gc_frozen() -> Iterator[None]:
    """Leave the objects that exist now out of cyclic garbage collection until the block ends.

    A full collection walks every tracked object: with Prefect, polars, pydantic and openai
    loaded that is about a million objects and 0.2 s, during which an event loop answers
    nothing. In the mine stage such a pause stalls all 32 requests in flight, two or three
    times a run (measured: 0.45-0.6 s of an 8 s stage). Frozen objects are still freed by
    reference counting; objects made inside the block are collected as usual; the frozen ones
    go back to the oldest generation afterwards (``gc.unfreeze``). Nested blocks are allowed
    (only the outermost one unfreezes, since ``gc.unfreeze`` thaws everything).
    """
    global _FREEZE_DEPTH
    # No gc.collect() first: it would itself be the 0.2 s pause. Cyclic garbage frozen with the
    # rest is freed after the block.
    if _FREEZE_DEPTH == 0:
        gc.freeze()
    _FREEZE_DEPTH += 1
    try:
        yield
    finally:
        _FREEZE_DEPTH -= 1
        if _FREEZE_DEPTH == 0:
            gc.unfreeze()
