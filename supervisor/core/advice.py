"""Save-interval advice: the Young/Daly optimum from measured save time and failure rate."""

from __future__ import annotations

import math


def young_daly_interval(save_seconds: float, mtbf_seconds: float) -> float:
    """Seconds of work between checkpoints that minimise expected lost time.

    Daly's higher-order estimate: for a save time delta < 2M,
    tau = sqrt(2 delta M) (1 + sqrt(delta / 2M) / 3 + delta / 18M) - delta, else M.
    """
    delta, m = save_seconds, mtbf_seconds
    if delta <= 0 or m <= 0:
        raise ValueError("save time and MTBF must be positive")
    if delta >= 2 * m:
        return m
    return (
        math.sqrt(2 * delta * m) * (1 + math.sqrt(delta / (2 * m)) / 3 + delta / (18 * m)) - delta
    )


def advised_save_steps(save_seconds: float, mtbf_seconds: float, step_seconds: float) -> int:
    """The Young/Daly interval expressed in optimizer steps (at least 1)."""
    if step_seconds <= 0:
        raise ValueError("step time must be positive")
    return max(1, round(young_daly_interval(save_seconds, mtbf_seconds) / step_seconds))
