"""Every LLM call, cached or not."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from schemas.base import TableRecord


class LlmCall(TableRecord):
    __table__ = "int_llm_calls"
    __description__ = (
        "Ledger of LLM requests per run: hash, stage, model, prompt version, status, tokens (cached input too), "
        "latency, cost, mode (sync | batch) and Batch API batch id. "
        "A cache hit is a row with cache_hit = true and zero cost; the spend stays on the row that filled the cache."
    )
    __grain__ = "one request (after retries) in one run"
    __key__ = ("run_id", "request_hash")

    request_hash: str
    sample_id: str
    stage: str  # single | plan | steps | polish | refine | repair | judge
    model: str
    prompt_version: str
    status: Literal["ok", "error", "invalid"]
    cache_hit: bool
    attempts: int
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    cost_usd: float
    error_code: str | None = None
    created_at: datetime
    # Input tokens the provider served from its prompt cache (usage.prompt_tokens_details.cached_tokens; part of
    # prompt_tokens, priced at the cached rate); null in partitions written before the column existed.
    cached_tokens: int | None = 0
    mode: str | None = "sync"  # sync (chat completions) | batch (the OpenAI Batch API)
    openai_batch_id: str | None = None  # the Batch API batch that answered (mode = batch)
