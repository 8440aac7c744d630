"""The one chaos monkey: SIGKILL the training child on a schedule, for every benchmark.

Used unchanged around trainwarden and around the naive ``until`` loop, so both
suffer exactly the same faults. It finds "the training child" as the live
descendant of the process it watches (the supervisor, or the loop's bash) whose
command line is ``python -m trainer_child``, so it never depends on what either
side wrote to disk.

A kill can be aimed *into a save*: after its deadline it waits for the child's
``save`` heartbeat (written when HF's checkpoint save starts) and fires
``into_save`` seconds later, inside the ``slow_save`` failpoint's sleep before a
``torch.save``: the folder then holds the adapter but no ``trainer_state.json``,
the partial checkpoint HF's non-atomic save leaves on a real crash.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.common import (
    is_trainer_child,
)
from tests.support.outputs import heartbeat
from tests.support.processes import live_descendants
from trainer_child.protocol import TRAINER_STATE, Layout, Phase, RunStateFile, read_model


@dataclass(frozen=True)
class KillPlan:
    """When to kill: gaps between kills, and which kills wait for a save to start.

    ``anchored``: kill i fires at start + gaps[0] + ... + gaps[i] whatever happened
    before (a failure process in wall time: the same instants for every run that
    uses the plan); otherwise each gap counts from the previous kill.
    """

    gaps: tuple[float, ...]
    mid_save: frozenset[int] = frozenset()
    into_save: float = 0.15
    anchored: bool = False
    #: A kill aimed into a save gives up waiting for one after this long.
    save_wait: float = 120.0

    @classmethod
    def periodic(cls, period: float, count: int, *, mid_save_every: int = 0) -> KillPlan:
        """Every ``period`` seconds; every ``mid_save_every``-th kill (2nd, 4th...) into a save."""
        aimed = (
            frozenset(i for i in range(count) if (i + 1) % mid_save_every == 0)
            if mid_save_every
            else frozenset()
        )
        return cls(gaps=(period,) * count, mid_save=aimed)

    @classmethod
    def poisson(cls, mean: float, horizon: float, seed: int) -> KillPlan:
        """Kills of a Poisson process (mean gap ``mean``) over ``horizon`` s, from a seeded RNG.

        Given that a Poisson process has n events in [0, H], their instants are
        independent and uniform over it; n is fixed at H/mean (its expectation)
        and the instants stratified, one uniform draw in each H/n slice. So the
        gaps are exponential-like with mean ``mean``, while a window of a few
        mean gaps still gets its fair share of kills instead of, by luck, none.
        """
        rng = random.Random(seed)
        count = max(1, round(horizon / mean))
        instants = [horizon * (i + rng.random()) / count for i in range(count)]
        gaps = [b - a for a, b in zip([0.0, *instants], instants, strict=False)]
        return cls(gaps=tuple(gaps), anchored=True)


@dataclass(frozen=True)
class KillRecord:
    """One kill (or a deadline with nothing to kill)."""

    index: int
    ts: float
    pid: int | None
    phase: str | None
    step: int | None
    aimed_mid_save: bool
    #: The save it was aimed at left checkpoint-N without trainer_state.json.
    left_partial: bool = False
    #: The child's resident memory when it was killed (its teardown grows with it).
    rss_mb: float = 0.0

    @property
    def missed(self) -> bool:
        return self.pid is None


class Killer:
    """Run a ``KillPlan`` against the trainer child under ``root_pid`` in a thread."""

    def __init__(
        self,
        root_pid: int,
        output_dir: Path,
        plan: KillPlan,
        *,
        match: Callable[[Sequence[str]], bool] = is_trainer_child,
    ) -> None:
        self.root_pid = root_pid
        self.output_dir = output_dir
        self.plan = plan
        self.match = match
        self.records: list[KillRecord] = []
        #: Every pid a SIGKILL was sent to, noted before sending (see runs.py).
        self.targeted: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-killer", daemon=True)

    def __enter__(self) -> Killer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def kills(self) -> list[KillRecord]:
        return [r for r in self.records if not r.missed]

    def _run(self) -> None:
        start = previous = time.time()
        elapsed = 0.0
        for index, gap in enumerate(self.plan.gaps):
            elapsed += gap
            deadline = start + elapsed if self.plan.anchored else previous + gap
            if self._stop.wait(max(0.0, deadline - time.time())):
                return
            aimed = index in self.plan.mid_save
            if aimed and not self._wait_for_save():
                return
            record = self._kill(index, aimed)
            self.records.append(record)
            previous = record.ts

    def _wait_for_save(self) -> bool:
        """Block until the current child announces a save, then a little into it."""
        give_up = time.monotonic() + self.plan.save_wait
        # Only a save that starts from now on: one already under way may be
        # about to end, and the kill would land after it.
        since = time.time()
        while time.monotonic() < give_up:
            # The heartbeat first: a file read, where listing processes is not.
            beat = heartbeat(self.output_dir)
            if beat is not None and beat.phase is Phase.SAVE and beat.wall_time >= since:
                children = self._children()
                if children and beat.pid == children[0].pid:
                    return not self._stop.wait(self.plan.into_save)
            if self._stop.wait(0.005):
                return False
        return True

    def _children(self) -> list[psutil.Process]:
        """The training child: the one state.json names (under trainwarden), else by cmdline.

        Under trainwarden a warm standby is a ``trainer_child`` process too, idle
        until the supervisor hands it an attempt: only state.json tells them apart.
        """
        state = read_model(Layout(self.output_dir).state, RunStateFile)
        if state is not None and state.child_pid:
            named = state.child_pid
            return [p for p in live_descendants(self.root_pid, lambda _: True) if p.pid == named]
        return live_descendants(self.root_pid, self.match)

    def _kill(self, index: int, aimed: bool) -> KillRecord:
        children = self._children()
        if not children:
            return KillRecord(index, time.time(), None, None, None, aimed)
        pid = children[0].pid
        try:
            rss_mb = children[0].memory_info().rss / 1e6
        except psutil.Error:
            rss_mb = 0.0
        beat = heartbeat(self.output_dir)
        own = beat is not None and beat.pid == pid
        self.targeted.add(pid)
        ts = time.time()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return KillRecord(index, ts, None, None, None, aimed)
        phase = beat.phase.value if own and beat is not None else "load"
        step = beat.step if own and beat is not None else None
        partial = False
        if own and beat is not None and beat.phase is Phase.SAVE:
            folder = self.output_dir / f"checkpoint-{beat.step}"
            partial = folder.is_dir() and not (folder / TRAINER_STATE).exists()
        return KillRecord(index, ts, pid, phase, step, aimed, partial, rss_mb)


__all__ = ["KillPlan", "KillRecord", "Killer"]
