"""A spend cap for one run of LLM mining (``RADCHAIN_LLM_BUDGET_USD``, ``radchain run --budget``).

Mining asks ``admit(estimate)`` before it starts a sample: the sample is taken only while
``spent + in_flight + estimate <= cap``, where ``in_flight`` is the sum of the estimates of
the samples started but not finished. When a sample finishes, ``settle`` swaps its estimate
for what its calls actually cost (their ledger rows' ``cost_usd``). The first refusal closes
the budget: no later sample is started, even a cheaper one, so a run stops at one clear point
and what was not mined is skipped with reason ``BUDGET``.

What the cap bounds: every sample admitted fitted under it at its estimate, so the spend can
pass the cap only by what the samples in flight at that moment cost beyond their estimates
(refinement rounds, retries): at most one wave of in-flight samples. (The mine stage calibrates
the estimates on the actual cost of the samples already finished: flows/stages/mine.py.)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

REASON = "BUDGET"


@dataclass
class Budget:
    cap_usd: float
    spent_usd: float = 0.0  # spent before this budget object existed (earlier batches of the run) plus settled
    in_flight_usd: float = 0.0
    refused: int = 0
    closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.cap_usd < 0:
            raise ValueError("a budget cannot be negative")

    def admit(self, estimate_usd: float) -> bool:
        """Reserve ``estimate_usd`` for a sample about to start; False (and closed from now on) if it does not fit."""
        with self._lock:
            if not self.closed and self.spent_usd + self.in_flight_usd + estimate_usd <= self.cap_usd:
                self.in_flight_usd += estimate_usd
                return True
            self.closed = True
            self.refused += 1
            return False

    def settle(self, estimate_usd: float, actual_usd: float) -> None:
        """A started sample finished: its reservation becomes its actual cost."""
        with self._lock:
            self.in_flight_usd = max(0.0, self.in_flight_usd - estimate_usd)
            self.spent_usd += actual_usd

    @property
    def remaining_usd(self) -> float:
        return self.cap_usd - self.spent_usd - self.in_flight_usd

    def summary(self) -> str:
        return (f"LLM spend ${self.spent_usd:.4f} of the ${self.cap_usd:.4f} budget"
                + (f"; {self.refused} samples skipped ({REASON})" if self.refused else ""))
