"""Cost of a call from its token usage and the price table in LLMSettings.price_per_mtok."""

from __future__ import annotations

from collections.abc import Mapping


def price_for(model: str, table: Mapping[str, tuple[float, float]]) -> tuple[float, float] | None:
    """(input, output) USD per million tokens, or None when the model is not priced.

    An exact name wins; otherwise the longest table key that prefixes the model name, so a
    dated snapshot such as ``gpt-4o-mini-2024-07-18`` is priced as ``gpt-4o-mini``.
    """
    if model in table:
        return tuple(table[model])  # type: ignore[return-value]
    prefixes = [k for k in table if model.startswith(k)]
    if not prefixes:
        return None
    return tuple(table[max(prefixes, key=len)])  # type: ignore[return-value]


def cost_usd(model: str, prompt_tokens: int, completion_tokens: int, table: Mapping[str, tuple[float, float]]) -> float:
    """USD for one call; 0.0 for an unpriced model (a local vLLM server costs nothing per token)."""
    price = price_for(model, table)
    if price is None:
        return 0.0
    per_in, per_out = price
    return (prompt_tokens * per_in + completion_tokens * per_out) / 1_000_000
