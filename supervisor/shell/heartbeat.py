"""Read the child's heartbeat and age it on the supervisor's monotonic clock.

The heartbeat carries the child's wall time, but a wall clock jumps (NTP step,
a VM resumed after a pause, a wrong RTC at boot), and the child's clock need not
agree with ours. So staleness is measured from when *we* last saw the file's
content change, on an injected monotonic clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from pydantic import ValidationError

from supervisor.core.model import HeartbeatView
from trainer_child.protocol import Heartbeat, Layout, Phase

__all__ = ["HeartbeatMonitor", "HeartbeatSource"]


class HeartbeatSource(Protocol):
    """The current child's heartbeat, aged on the supervisor's clock."""

    def reset(self, attempt: int, pid: int) -> None:
        """Start tracking a new child."""
        ...

    def poll(self, child_started_at: float) -> HeartbeatView | None:
        """Return the heartbeat and its age; None when no child is tracked."""
        ...


class HeartbeatMonitor:
    """Track the current attempt's heartbeat and how long it has been unchanged."""

    def __init__(self, layout: Layout, clock: Callable[[], float] = time.monotonic) -> None:
        self._path = layout.heartbeat
        self._clock = clock
        self._attempt: int | None = None
        self._pid: int | None = None
        self._stale: Heartbeat | None = None
        self._beat: Heartbeat | None = None
        self._changed_at = 0.0

    def reset(self, attempt: int, pid: int) -> None:
        """Start tracking a new child; call at each spawn (or on adopting an orphan).

        Whatever heartbeat.json holds now was written before this call (by an
        earlier, dead attempt, or by an adopted orphan) and is ignored until it
        changes, so the age counts from spawn.
        """
        self._attempt, self._pid = attempt, pid
        self._stale = self._read()
        self._beat = None

    def poll(self, child_started_at: float) -> HeartbeatView | None:
        """Return the heartbeat and its age; None when no child is being tracked.

        Until the new child writes its first heartbeat, report phase ``load``, step
        0, aged from ``child_started_at`` (monotonic), so the startup timeout runs.
        A missing, partial or invalid file keeps the last good reading, whose age
        keeps growing. Content is compared parsed, so a torn read followed by the
        same heartbeat does not count as a change.
        """
        if self._pid is None:
            return None
        now = self._clock()
        beat = self._read()
        fresh = beat is not None and beat not in (self._stale, self._beat)
        if beat is not None and fresh and self._belongs_to_child(beat):
            self._beat = beat
            self._changed_at = now
        if self._beat is None:
            return HeartbeatView(
                step=0, max_steps=None, phase=Phase.LOAD, age=max(0.0, now - child_started_at)
            )
        current = self._beat
        return HeartbeatView(
            step=current.step,
            max_steps=current.max_steps,
            phase=current.phase,
            age=max(0.0, now - self._changed_at),
            last_step_seconds=current.last_step_seconds,
        )

    def _belongs_to_child(self, beat: Heartbeat) -> bool:
        # The attempt number decides when the child wrote one: under torchrun the
        # writer is a rank process, not the pid we spawned. Without it, the pid must match.
        if beat.attempt is not None:
            return beat.attempt == self._attempt
        return beat.pid == self._pid

    def _read(self) -> Heartbeat | None:
        try:
            raw = self._path.read_bytes()
        except OSError:
            return None
        try:
            return Heartbeat.model_validate_json(raw)
        except (ValueError, ValidationError):
            return None
