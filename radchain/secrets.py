"""Where the LLM API key may come from: the environment or a Prefect Secret block, nothing else.

* ``OPENAI_API_KEY`` in the environment wins (``LLMSettings.api_key`` reads it).
* Otherwise, when ``LLMSettings.api_key_block`` names a Prefect Secret block (set it with
  ``RADCHAIN_LLM_API_KEY_BLOCK=openai-api-key``, or ``api_key_block`` under ``[llm]`` in
  radchain.toml: a block *name* is not a secret), the key is ``Secret.load(name).get()``.
  Create the block once with ``prefect block create secret`` or, in Python,
  ``Secret(value="sk-...").save("openai-api-key")``.
* A key written into radchain.toml is refused with ``SecretInConfigError`` (a ValueError: the
  CLI prints it as one line and exits with 2). The message names the setting, never its value.

The resolved key lives only in the ``LLMSettings`` copy handed to the LLM client (a
``SecretStr``, masked in reprs); callers must not put it back into shared settings, task
parameters, rows, cache entries or log lines.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import SecretStr

ENV_VAR = "OPENAI_API_KEY"
# Keys that would hold a credential if they appeared in the TOML file (compared case-insensitively,
# with "-" read as "_"), at any depth.
SECRET_KEYS = frozenset({"api_key", "openai_api_key", "apikey", "api_token", "token", "secret", "password",
                         "access_token", "bearer_token"})


class SecretInConfigError(ValueError):
    """A credential was found in the config file."""


class SecretNotFoundError(ValueError):
    """The configured Secret block does not exist or cannot be read."""


def secret_paths(data: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every credential-like key in a parsed TOML document."""
    found: list[str] = []
    if isinstance(data, Mapping):
        for key, value in data.items():
            path = f"{prefix}{key}"
            if str(key).strip().lower().replace("-", "_") in SECRET_KEYS and value not in (None, ""):
                found.append(path)
            found += secret_paths(value, path + ".")
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found += secret_paths(value, f"{prefix}{i}.")
    return found


def reject_secrets_in_config(data: Any, source: Path | str) -> None:
    """Raise SecretInConfigError when the parsed config file holds a credential."""
    paths = secret_paths(data)
    if paths:
        raise SecretInConfigError(
            f"{source}: {', '.join(paths)} must not be in the config file -- API keys are read only from the "
            f"{ENV_VAR} environment variable or a Prefect Secret block named by llm.api_key_block "
            f"(RADCHAIN_LLM_API_KEY_BLOCK); remove the key from the file"
        )


def load_secret_block(name: str) -> SecretStr:
    """The value of the Prefect Secret block ``name`` (SecretNotFoundError when it cannot be read)."""
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except ValueError:  # Prefect says "Unable to find block document named ..."
        raise SecretNotFoundError(
            f"Prefect Secret block {name!r} (llm.api_key_block) was not found: create it with "
            f"`prefect block create secret` or Secret(value=...).save({name!r}), or set {ENV_VAR}"
        ) from None
    except Exception as e:  # the API is unreachable, ... -- never echo the block's content
        raise SecretNotFoundError(
            f"cannot read the Prefect Secret block {name!r} (llm.api_key_block): {type(e).__name__}"
        ) from None
    if isinstance(value, Mapping):  # a JSON secret: {"api_key": "..."}
        value = value.get("api_key") or value.get("value")
    if not isinstance(value, str) or not value.strip():
        raise SecretNotFoundError(f"the Prefect Secret block {name!r} holds no usable key (a non-empty string)")
    return SecretStr(value.strip())


def resolve_api_key(llm: Any) -> SecretStr | None:
    """The API key for an ``LLMSettings``: its own (from OPENAI_API_KEY), else the environment,
    else its Secret block, else None (fine for a local server that ignores keys)."""
    own = getattr(llm, "api_key", None)
    if own is not None and own.get_secret_value():
        return own
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return SecretStr(env)
    block = (getattr(llm, "api_key_block", None) or "").strip()
    if block:
        return load_secret_block(block)
    return None


def with_api_key(llm: Any) -> Any:
    """A copy of ``llm`` whose ``api_key`` is resolved (the original is left untouched)."""
    key = resolve_api_key(llm)
    if key is getattr(llm, "api_key", None):
        return llm
    return llm.model_copy(update={"api_key": key})
