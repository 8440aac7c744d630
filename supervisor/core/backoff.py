"""Restart pacing: exponential backoff with injected jitter, and the sliding budget."""

from __future__ import annotations


def backoff_delay(failures_in_a_row: int, initial: float, maximum: float, jitter: float) -> float:
    """Seconds to wait before restart number ``failures_in_a_row`` (1-based).

    Doubles per consecutive failure, capped at ``maximum``; ``jitter`` in [0, 1)
    spreads it over [0.75, 1.25] x so many jobs on one box do not restart in
    lockstep, but never below ``initial`` nor above ``maximum``.
    """
    exponent = max(failures_in_a_row - 1, 0)
    base = min(maximum, initial * (2.0 ** min(exponent, 62)))
    spread = base * (0.75 + 0.5 * min(max(jitter, 0.0), 1.0))
    return min(maximum, max(initial, spread))


def restarts_in_window(restart_times: tuple[float, ...], now: float, window: float) -> int:
    """Count restarts within the last ``window`` seconds."""
    return sum(1 for t in restart_times if now - t < window)


def prune_window(restart_times: tuple[float, ...], now: float, window: float) -> tuple[float, ...]:
    """Drop restarts that fell out of the window, so the state stays small."""
    return tuple(t for t in restart_times if now - t < window)
