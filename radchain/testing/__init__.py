"""Test and benchmark infrastructure (never used by the pipeline): a fake OpenAI-compatible server."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from radchain.settings import LLMSettings
from radchain.testing.fake_openai import FAULT_KINDS, FakeOpenAIServer, default_responder


def llm_settings_for(
    server: FakeOpenAIServer, *, api_key: str = "sk-fake-test-key", base: LLMSettings | None = None, **overrides: Any
) -> LLMSettings:
    """LLMSettings pointing at a running fake server, with test-friendly overrides.

    Uses ``model_copy`` because ``base_url``/``api_key`` are read through their environment
    aliases (OPENAI_BASE_URL/OPENAI_API_KEY) and cannot be passed by field name.
    """
    base = base or LLMSettings()
    update: dict[str, Any] = {"base_url": server.base_url, "api_key": SecretStr(api_key), **overrides}
    return base.model_copy(update=update)




def radchain_command() -> list[str]:
    """The argv prefix that runs the `radchain` CLI of this interpreter (tests start it as a subprocess)."""
    script = Path(sys.executable).with_name("radchain")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from flows.cli import app; app()"]


__all__ = ["FAULT_KINDS", "FakeOpenAIServer", "default_responder", "llm_settings_for", "radchain_command"]
