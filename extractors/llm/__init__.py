"""The LLM layer: an OpenAI-compatible client with throttling, retries, structured output,
a pluggable response cache (storage in warehouse/llm_cache.py) and per-call accounting."""

from extractors.llm.cache import CachedResponse, MemoryResponseCache, ResponseCache
from extractors.llm.client import (
    TRANSIENT_ERROR_CODES,
    LLMClient,
    RequestBlocked,
    StructuredResult,
    classify,
    retry_after_seconds,
)
from extractors.llm.hashing import request_hash, schema_version
from extractors.llm.pricing import cost_usd, price_for
from extractors.llm.structured import strict_json_schema

__all__ = [
    "CachedResponse",
    "LLMClient",
    "MemoryResponseCache",
    "RequestBlocked",
    "ResponseCache",
    "StructuredResult",
    "TRANSIENT_ERROR_CODES",
    "classify",
    "cost_usd",
    "price_for",
    "request_hash",
    "retry_after_seconds",
    "schema_version",
    "strict_json_schema",
]
