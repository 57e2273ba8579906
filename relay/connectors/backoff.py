"""How long a follow waits before its next attempt: exponential, capped, with jitter."""

from __future__ import annotations


def backoff_delay(attempt: int, base: float, cap: float, rand: float) -> float:
    """The delay after the `attempt`-th failure in a row (from 1), `rand` in [0, 1):
    between half and all of `base * 2 ** (attempt - 1)`, at most `cap`."""
    ceiling: float = min(cap, base * 2.0 ** min(attempt - 1, 32))
    return ceiling * (0.5 + rand / 2)
