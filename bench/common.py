"""Small helpers the benchmarks share."""

from __future__ import annotations

import os


def pin_to_core(core: int) -> None:
    """Run this process on one core (the floors say "one core"); a no-op where the OS cannot."""
    if hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {core})
        except OSError:
            pass
