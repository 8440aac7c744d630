"""Write ``.warden/heartbeat.json`` from the training loop, throttled.

This module is light on purpose (standard library and ``protocol`` only) so that
``python -m trainer_child`` can announce the ``load`` phase before it spends
seconds importing torch, and so the callback and ``__main__`` share one writer.

Heartbeats are only ever written by the thread that trains: a background thread
would keep a hung loop looking alive, which is exactly what the supervisor's hang
detection must not be fooled by.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from trainer_child.protocol import ENV_ATTEMPT, Heartbeat, Layout, Phase, atomic_write_model

__all__ = ["HeartbeatWriter", "attempt_from_env", "forget_marks", "mark"]

#: The contract allows at most one heartbeat a second, plus one at every phase change.
MIN_INTERVAL_SECONDS = 1.0

#: This process's milestones (name -> time.time()); every heartbeat carries them.
_MARKS: dict[str, float] = {}


def mark(name: str) -> None:
    """Note when a start-up milestone was reached (first time only); later heartbeats carry it.

    Module state, not a writer's, because ``__main__`` and the callback each hold
    their own writer. Costs a dict lookup; bench/ splits restart latency with it.
    """
    _MARKS.setdefault(name, time.time())


def forget_marks() -> None:
    """Drop every milestone: a warm standby becomes an attempt long after its own start-up."""
    _MARKS.clear()


def attempt_from_env() -> int | None:
    """Return the supervisor's 1-based attempt number, or None when run by hand."""
    raw = os.environ.get(ENV_ATTEMPT, "").strip()
    try:
        return int(raw) if raw else None
    except ValueError:
        # A malformed attempt number only labels files; it must not stop training.
        return None


class HeartbeatWriter:
    """Replace the heartbeat file at most once a second, and at every phase change.

    The file is replaced atomically but not fsynced: a heartbeat lost to a power
    cut is worthless anyway, and an fsync per step would cost real time.
    """

    def __init__(self, output_dir: str | os.PathLike[str], *, attempt: int | None = None) -> None:
        self.layout = Layout(output_dir)
        self.attempt = attempt if attempt is not None else attempt_from_env()
        self.phase: Phase | None = None
        self.step = 0
        self.max_steps: int | None = None
        self.last_step_seconds: float | None = None
        self._last_write = float("-inf")

    @property
    def path(self) -> Path:
        return self.layout.heartbeat

    def beat(
        self,
        phase: Phase,
        *,
        step: int | None = None,
        max_steps: int | None = None,
        last_step_seconds: float | None = None,
        force: bool = False,
    ) -> bool:
        """Record progress; write the file if the phase changed or a second has passed.

        Returns whether the file was written. OSError (ENOSPC included) propagates:
        a child that cannot write its heartbeat is about to fail its next checkpoint
        too, and the real cause is more useful than a hang verdict later.
        """
        if step is not None:
            self.step = step
        if max_steps is not None:
            self.max_steps = max_steps
        if last_step_seconds is not None:
            self.last_step_seconds = last_step_seconds
        now = time.monotonic()
        changed = phase != self.phase
        if not (force or changed or now - self._last_write >= MIN_INTERVAL_SECONDS):
            return False
        self.phase = phase
        self._last_write = now
        self.layout.warden.mkdir(parents=True, exist_ok=True)
        record = Heartbeat(
            step=self.step,
            max_steps=self.max_steps,
            phase=phase,
            pid=os.getpid(),
            attempt=self.attempt,
            wall_time=time.time(),
            last_step_seconds=self.last_step_seconds,
            marks=dict(_MARKS),
        )
        atomic_write_model(self.path, record, durable=False)
        return True
