"""Test isolation: a temporary RADCHAIN_HOME and PREFECT_HOME per session, offline, no analytics."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="radchain-test-"))
os.environ["RADCHAIN_HOME"] = str(_SESSION_HOME / "home")
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ["HF_HUB_OFFLINE"] = "1"
# Prefect's temporary API may take longer than its 20 s default to start on a loaded 2-core machine.
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.pop("OPENAI_API_KEY", None)
os.environ.pop("OPENAI_BASE_URL", None)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def radchain_home(tmp_path, monkeypatch) -> Path:
    """A fresh RADCHAIN_HOME for one test; settings are re-read."""
    from radchain.settings import reset_settings_cache

    home = tmp_path / "radchain-home"
    monkeypatch.setenv("RADCHAIN_HOME", str(home))
    reset_settings_cache()
    yield home
    reset_settings_cache()
