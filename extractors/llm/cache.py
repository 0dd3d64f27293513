"""The response-cache contract. Storage lives in warehouse/llm_cache.py; the client gets it by injection.

Only answers that passed validation are stored, under the hash of the request that asked
for them (see hashing.py). A failed request is never cached, so a re-run asks again.
Entries hold the answer text and token counts, never the messages (they carry report
text) and never credentials.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class CachedResponse:
    request_hash: str
    model: str
    prompt_version: str
    schema_version: str | None
    stage: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    created_at: datetime


@runtime_checkable
class ResponseCache(Protocol):
    def get(self, request_hash: str) -> CachedResponse | None: ...

    def put(self, entry: CachedResponse) -> None: ...


class MemoryResponseCache:
    """A dict-backed cache for tests and one-off runs (not durable)."""

    def __init__(self) -> None:
        self._entries: dict[str, CachedResponse] = {}

    def get(self, request_hash: str) -> CachedResponse | None:
        return self._entries.get(request_hash)

    def put(self, entry: CachedResponse) -> None:
        self._entries[entry.request_hash] = entry

    def __len__(self) -> int:
        return len(self._entries)
