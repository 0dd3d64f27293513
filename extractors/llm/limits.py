"""Client-side throttles: concurrent requests, requests per minute, tokens per minute.

Each HTTP attempt (retries included, since the server counts them too) passes three gates:
a semaphore bounding requests in flight, a requests-per-minute leaky bucket and a
tokens-per-minute leaky bucket charged with an estimate of the request's tokens (the true
count is known only afterwards, and aiolimiter cannot refund).

The buckets drain over a short window (``window_s``, default 1 s) instead of a full minute:
a minute-long bucket would let a cold client fire a whole minute's budget in one burst,
which is what trips a provider's own limiter. The sustained rate is the same.

asyncio primitives belong to one event loop; the client builds one ``Throttle`` per loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiolimiter import AsyncLimiter


def _per_window(per_minute: float, window_s: float) -> tuple[float, float]:
    """(max_rate, period) for an AsyncLimiter granting ``per_minute`` per 60 s.

    The period is stretched when the rate is so low that a window would hold less than one
    unit, because aiolimiter refuses an acquire larger than max_rate.
    """
    period = max(window_s, 60.0 / per_minute)
    return per_minute * period / 60.0, period


class Throttle:
    def __init__(
        self,
        *,
        max_concurrency: int,
        requests_per_minute: float | None,
        tokens_per_minute: float | None,
        window_s: float = 1.0,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.max_concurrency = max_concurrency
        self._slots = asyncio.Semaphore(max_concurrency)
        self._rpm = AsyncLimiter(*_per_window(requests_per_minute, window_s)) if requests_per_minute else None
        self._tpm = AsyncLimiter(*_per_window(tokens_per_minute, window_s)) if tokens_per_minute else None
        self.in_flight = 0
        self.max_in_flight = 0

    @asynccontextmanager
    async def slot(self, estimated_tokens: int) -> AsyncIterator[None]:
        """Hold one request slot, then charge the rate buckets, so a request goes out right
        after its rate token is granted (charging first and queueing for a slot afterwards
        would let queued requests go out in a burst)."""
        async with self._slots:
            if self._rpm is not None:
                await self._rpm.acquire(1)
            if self._tpm is not None:
                # A request larger than the bucket would wait forever; charge a full bucket.
                await self._tpm.acquire(min(float(estimated_tokens), self._tpm.max_rate))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                yield
            finally:
                self.in_flight -= 1


def estimate_tokens(messages_chars: int, max_completion_tokens: int) -> int:
    """Rough token estimate for the TPM bucket: about 4 characters per token plus the reply budget."""
    return messages_chars // 4 + max_completion_tokens
