"""Deterministic request hashes: the key of the response cache and of int_llm_calls rows.

Two requests share a hash exactly when they would ask the model the same question the
same way: same model, prompt version, output schema, messages and sampling parameters.
The hash never covers the endpoint URL or the API key, so a key rotation or a second
replica of the same model keeps the cache warm, and the key cannot leak through it.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal values always give equal text."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def request_hash(
    *,
    model: str,
    prompt_version: str,
    schema_version: str | None,
    messages: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
) -> str:
    """SHA-256 (hex) over the parts that determine the model's answer."""
    payload = {
        "model": model,
        "prompt_version": prompt_version,
        "schema_version": schema_version,
        "messages": [dict(m) for m in messages],
        "params": dict(params),
    }
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


@lru_cache(maxsize=64)  # generating a JSON schema costs ~1 ms; it is asked for on every call
def schema_version(schema: type[BaseModel]) -> str:
    """Name plus a digest of the JSON schema: editing the model invalidates cached answers."""
    digest = hashlib.sha256(canonical_json(schema.model_json_schema()).encode("utf-8")).hexdigest()[:12]
    return f"{schema.__name__}-{digest}"
