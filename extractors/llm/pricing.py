"""Cost of a call from its token usage and the price table in LLMSettings.price_per_mtok.

A table entry is a ``radchain.settings.ModelPrice`` (input, cached input, output, and the Batch
API's prices) or the older ``(input, output)`` pair. Cached input tokens (``cached_tokens`` of
``usage.prompt_tokens_details``) are part of ``prompt_tokens`` and are priced at the cached rate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from radchain.settings import ModelPrice


def _entry(table: Mapping[str, Any], model: str) -> Any | None:
    if model in table:
        return table[model]
    prefixes = [k for k in table if model.startswith(k)]
    if not prefixes:
        return None
    return table[max(prefixes, key=len)]


def model_price(model: str, table: Mapping[str, Any]) -> ModelPrice | None:
    """The model's prices, or None when it is not priced.

    An exact name wins; otherwise the longest table key that prefixes the model name, so a
    dated snapshot such as ``gpt-4o-mini-2024-07-18`` is priced as ``gpt-4o-mini``.
    """
    entry = _entry(table, model)
    if entry is None:
        return None
    return entry if isinstance(entry, ModelPrice) else ModelPrice.model_validate(entry)


def price_for(model: str, table: Mapping[str, Any]) -> tuple[float, float] | None:
    """(input, output) USD per million tokens of a sync call, or None when the model is not priced."""
    price = model_price(model, table)
    return None if price is None else (price.input, price.output)


def cost_usd(model: str, prompt_tokens: int, completion_tokens: int, table: Mapping[str, Any], *,
             cached_tokens: int = 0, mode: str = "sync") -> float:
    """USD for one call; 0.0 for an unpriced model (a local vLLM server costs nothing per token)."""
    price = model_price(model, table)
    if price is None:
        return 0.0
    per_in, per_cached, per_out = price.rates(mode)
    cached = max(0, min(cached_tokens, prompt_tokens))
    return ((prompt_tokens - cached) * per_in + cached * per_cached + completion_tokens * per_out) / 1_000_000
