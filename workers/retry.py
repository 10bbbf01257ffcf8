"""All retry policy in one place: backoff with jitter."""

from __future__ import annotations

import random


def backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before retry number `attempt` (1, 2, ...): exponential, capped, jittered.

    Half the delay is fixed and half random ("equal jitter"): retries of many
    parts spread out, yet none comes back at once.
    """
    delay = min(cap, base * 2 ** max(0, attempt - 1))
    return delay / 2 + random.uniform(0, delay / 2)
