"""Chaos: SIGKILL the real training child again and again; the run still ends bit-identical.

A seeded schedule kills the child at random moments of its life: at a random
instant while it imports and loads, and right after a new ``checkpoint-N/``
appears, while HF is still writing it (the ``slow_save`` failpoint stretches
that window). An observer thread watches every commit record as it appears,
so the journal's resume points can be checked against what was provably
complete at the moment of each launch.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.jobs import FAST_RESTART, write_config
from tests.support.outputs import assert_bit_identical, events
from tests.support.supervised import SupervisorProcess, supervisor_process
from trainer_child.protocol import (
    COMMIT_RECORD,
    CommitRecord,
    Layout,
    RunStateFile,
    checkpoint_step,
    read_model,
)

pytestmark = pytest.mark.slow

SEED = 20_261_128
#: A checkpoint every 4 steps. Only a "save" kill lets a checkpoint commit
#: (one at most, see SCHEDULE), so before the last attempt the run is at step
#: 16 at most: 24 steps still leave every "save" kill two new folders to wait for.
SFT: dict[str, Any] = {"max_steps": 24, "save_steps": 4}
#: Each torch.save of a checkpoint sleeps this long, so a save takes ~0.5 s
#: with the folder visibly half-written: long enough to land a kill inside it.
SLOW_SAVE_SECONDS = 0.1
#: The kill schedule, shuffled by SEED. Every child first spends ~5-20 s (this
#: machine, quiet or loaded) importing torch/transformers/trl/peft and building
#: the trainer. A "load" kill lands at a random instant of that; a "save" kill
#: as soon as the attempt's 1st or 2nd new checkpoint folder appears, before
#: its record (after the 2nd, one commit and some training happened first).
#: A "save" kill costs a whole start-up, a "load" kill a fraction of one, so
#: most are "load": the file must stay within about two minutes on 2 cores.
SCHEDULE = ("save",) * 4 + ("load",) * 6
MIN_KILLS = 10
MIN_MID_SAVE_KILLS = 3
POLL = 0.002
OBSERVE_EVERY = 0.01


@dataclass(frozen=True)
class Kill:
    """One SIGKILL the chaos thread delivered to a live training child."""

    pid: int
    mode: str
    wall_time: float
    #: The checkpoint step that was still without a commit record when the child
    #: died (proved after its death), or None for a kill outside a save.
    mid_save_step: int | None


def _checkpoint_dirs(output_dir: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    try:
        with os.scandir(output_dir) as iterator:
            for entry in iterator:
                step = checkpoint_step(entry.name)
                if step is not None and entry.is_dir(follow_symlinks=False):
                    found[step] = Path(entry.path)
    except FileNotFoundError:
        pass
    return found


def _committed(folder: Path, step: int) -> bool:
    record = read_model(folder / COMMIT_RECORD, CommitRecord)
    return record is not None and record.step == step


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class _Worker(threading.Thread):
    """A thread that keeps the exception it died of, for the test to re-raise."""

    def __init__(self, name: str, target: Callable[[], None]) -> None:
        super().__init__(name=name, daemon=True)
        self._body = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._body()
        except BaseException as exc:  # re-raised in the test's thread
            self.error = exc

    def finish(self, timeout: float = 30.0) -> None:
        self.join(timeout)
        assert not self.is_alive(), f"{self.name} did not stop"
        if self.error is not None:
            raise self.error


@dataclass
class CommitObserver:
    """Record, per step, the wall times at which a valid commit record was seen."""

    layout: Layout
    stop: threading.Event = field(default_factory=threading.Event)
    seen: dict[int, list[float]] = field(default_factory=dict)

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.time()
            for step, folder in _checkpoint_dirs(self.layout.output_dir).items():
                if _committed(folder, step):
                    self.seen.setdefault(step, []).append(now)
            self.stop.wait(OBSERVE_EVERY)

    def valid_between(self, step: int, after: float, before: float) -> bool:
        """Say whether step's record was seen valid at some moment in (after, before)."""
        return any(after < t < before for t in self.seen.get(step, ()))

    def newest_valid_before(self, before: float) -> int | None:
        steps = [s for s, times in self.seen.items() if any(t < before for t in times)]
        return max(steps, default=None)


@dataclass
class Chaos:
    """Kill each new child of the supervisor once, at a moment the seeded schedule picks."""

    supervisor: SupervisorProcess
    layout: Layout
    rng: random.Random
    schedule: tuple[str, ...]
    stop: threading.Event = field(default_factory=threading.Event)
    kills: list[Kill] = field(default_factory=list)

    def run(self) -> None:
        for mode in self.schedule:
            if not self._strike(mode):
                return

    def _strike(self, mode: str) -> bool:
        """Wait for the next child, wait for the moment ``mode`` picks, kill it."""
        pid = self._next_child()
        if pid is None:
            return False
        known = set(_checkpoint_dirs(self.layout.output_dir))
        if mode == "load":
            self.stop.wait(self.rng.uniform(0.05, 2.5))
        else:
            # A later folder lets the ones before it commit: progress, then a tear.
            nth = self.rng.choice((1, 2))
            if not self._wait(lambda: self._new_uncommitted(known, nth), 120):
                return False
        self._kill(pid, mode)
        return True

    def _wait(self, predicate: Callable[[], object], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.stop.is_set() and time.monotonic() < deadline:
            if self.supervisor.proc.poll() is not None:
                return False
            if predicate():
                return True
            time.sleep(POLL)
        return False

    def _next_child(self) -> int | None:
        """The attempt's child, as state.json names it: a warm standby is a child too."""
        killed = {k.pid for k in self.kills}
        found: list[int] = []

        def child() -> bool:
            state = read_model(self.layout.state, RunStateFile)
            pid = state.child_pid if state is not None else None
            try:
                children = {c.pid for c in psutil.Process(self.supervisor.pid).children()}
            except psutil.NoSuchProcess:
                return False
            found[:] = [pid] if pid in children and pid not in killed and not _dead(pid) else []
            return bool(found)

        return found[0] if self._wait(child, 120) else None

    def _new_uncommitted(self, known: set[int], nth: int) -> bool:
        folders = _checkpoint_dirs(self.layout.output_dir)
        new = sorted(set(folders) - known)
        # Should the nth one commit before we look, the next new folder is the target.
        return len(new) >= nth and not (folders[new[-1]] / COMMIT_RECORD).exists()

    def _kill(self, pid: int, mode: str) -> None:
        uncommitted = {
            step: folder
            for step, folder in _checkpoint_dirs(self.layout.output_dir).items()
            if not (folder / COMMIT_RECORD).exists()
        }
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        when = time.time()
        deadline = time.monotonic() + 10
        while not _dead(pid):
            assert time.monotonic() < deadline, f"child {pid} survived SIGKILL"
            time.sleep(0.0005)
        # Dead now, so nothing can add a record any more: a folder still without
        # one (where it is, or where the supervisor quarantined it) was mid-save.
        torn = [s for s, folder in uncommitted.items() if self._still_uncommitted(s, folder, when)]
        self.kills.append(Kill(pid, mode, when, max(torn) if torn else None))

    def _still_uncommitted(self, step: int, folder: Path, since: float) -> bool:
        if folder.is_dir():
            return not (folder / COMMIT_RECORD).exists()
        # Moved by the supervisor in the meantime: find the slot it went to.
        slots = [
            slot
            for slot in self.layout.quarantine.glob(f"checkpoint-{step}*")
            if slot.is_dir() and slot.stat().st_mtime >= since - 1.0
        ]
        return bool(slots) and not any((slot / COMMIT_RECORD).exists() for slot in slots)


def test_chaos_sigkills_recover_bit_identical(
    tmp_path: Path, env: dict[str, str], reference_final: Callable[..., Path]
) -> None:
    """Ten seeded SIGKILLs (3+ mid-save) end in a final adapter equal to the reference's."""
    journal = _chaos(tmp_path, env, reference_final, standby="off")
    assert {e["start"] for e in journal if e["event"] == "child_started"} == {"cold"}


def test_chaos_with_a_warm_standby_recovers_bit_identical(
    tmp_path: Path, env: dict[str, str], reference_final: Callable[..., Path]
) -> None:
    """The same seeded SIGKILLs, restarts taken by warm standbys: still bit-identical."""
    journal = _chaos(tmp_path, env, reference_final, standby="auto")
    starts = [e for e in journal if e["event"] == "child_started"]
    warm = [e for e in starts if e["start"] == "warm"]
    print(f"warm starts: {len(warm)} of {len(starts)}: {[e.get('why') for e in starts]}")
    assert starts[0]["start"] == "cold"
    assert len(warm) >= len(starts) // 2, starts


def _chaos(
    tmp_path: Path,
    env: dict[str, str],
    reference_final: Callable[..., Path],
    *,
    standby: str,
) -> list[dict[str, Any]]:
    """Run the seeded chaos schedule; check every launch and the result; return the journal."""
    # The reference run needs no supervisor: let it use the other core meanwhile.
    reference: list[Path] = []
    reference_thread = _Worker("reference-run", lambda: reference.append(reference_final(**SFT)))
    reference_thread.start()

    job = write_config(
        tmp_path,
        sft=SFT,
        env={"TRAINWARDEN_FAILPOINTS": f"slow_save@seconds={SLOW_SAVE_SECONDS}"},
        restart={
            **FAST_RESTART,
            "backoff_initial": "0.1s",
            "backoff_max": "0.3s",
            # Kills on purpose land before any new commit; that is not a stuck job.
            "no_progress_limit": 30,
            "standby": standby,
        },
    )
    layout = job.layout
    rng = random.Random(SEED)
    schedule = tuple(rng.sample(SCHEDULE, len(SCHEDULE)))
    observer = CommitObserver(layout)
    observer_thread = _Worker("commit-observer", observer.run)
    observer_thread.start()
    try:
        with supervisor_process(job, env) as supervisor:
            chaos = Chaos(supervisor, layout, rng, schedule)
            chaos_thread = _Worker("chaos", chaos.run)
            chaos_thread.start()
            try:
                code = supervisor.wait(timeout=240)
            finally:
                chaos.stop.set()
                chaos_thread.finish()
            log = supervisor.log()
    finally:
        observer.stop.set()
        observer_thread.finish()
        reference_thread.finish(timeout=300)

    kills = chaos.kills
    context = f"seed {SEED}, schedule {schedule}, kills {kills}\n{log}"
    assert code == 0, context
    assert len(kills) >= MIN_KILLS, context
    mid_save = [k for k in kills if k.mid_save_step is not None]
    assert len(mid_save) >= MIN_MID_SAVE_KILLS, context

    journal = events(layout)
    failures = [e for e in journal if e["event"] == "failure"]
    assert len(failures) == len(kills), context
    assert sorted(e["pid"] for e in failures) == sorted(k.pid for k in kills), context
    for failure in failures:
        assert failure["kind"] == "crash", failure
        assert "SIGKILL" in failure["evidence"], failure

    launches = [e for e in journal if e["event"] == "launch"]
    assert len(launches) == len(kills) + 1, context
    resumed = 0
    for launch in launches:
        assert "resume_from" in launch, launch
        step = launch["resume_step"]
        # The newest checkpoint whose record had been seen valid: nothing older.
        assert step == observer.newest_valid_before(launch["ts"]), (launch, observer.seen)
        if step is None:
            assert launch["resume_from"] is None, launch
            continue
        resumed += 1
        assert launch["resume_from"] == f"checkpoint-{step}", launch
        # A folder killed mid-save is resumed from only after a later attempt
        # wrote it again and its record was seen valid after that kill.
        torn_at = max(
            (
                k.wall_time
                for k in mid_save
                if k.mid_save_step == step and k.wall_time < launch["ts"]
            ),
            default=0.0,
        )
        assert observer.valid_between(step, torn_at, launch["ts"]), (launch, torn_at)
    assert resumed >= 1, context
    assert any(e["event"] == "completed" for e in journal), context

    assert reference, "the reference run produced nothing"
    assert_bit_identical(layout.final, reference[0])
    return journal
