"""Run one job (bare, supervised, or in the naive loop) under an optional kill plan, and record it.

``run_job`` is the single driver every real-training benchmark uses: it starts the
process, records heartbeats, lets the ``Killer`` loose, samples the
supervisor's footprint, stops at the end, the cap or the window, and returns
a ``RunRecord`` holding everything the analyses need. It also recognises the
naive loop's crash loop: two attempts in a row that die on their own while
resuming from the same checkpoint will do so forever (same folder, same code),
so the run stops there and is charged the full cap.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.common import (
    HeartbeatRecorder,
    is_trainer_child,
)
from bench.killer import Killer, KillPlan, KillRecord
from supervisor.core.model import Integrity
from supervisor.shell.verify import verify_checkpoint
from tests.support.outputs import events
from tests.support.processes import Process, live_descendants
from trainer_child.protocol import Heartbeat, Layout, Phase, checkpoint_step

#: How often the driver looks at the processes, and samples the supervisor's RSS.
POLL_SECONDS = 0.05
FOOTPRINT_EVERY = 0.5


@dataclass
class Footprint:
    """The supervisor's memory and CPU while its child trained (load and exit excluded)."""

    rss_samples: list[float] = field(default_factory=list)
    peak_rss: float = 0.0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0


@dataclass
class RunRecord:
    """What one run did, as seen from outside."""

    label: str
    system: str
    output_dir: Path
    started: float
    ended: float
    exit_code: int | None
    finished: bool
    capped: bool = False
    crash_loop: bool = False
    kills: list[KillRecord] = field(default_factory=list)
    beats: dict[int, Heartbeat] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    footprint: Footprint | None = None
    window: dict[str, Any] = field(default_factory=dict)
    #: (wall_time, step) of every heartbeat seen, per child pid.
    history: dict[int, list[tuple[float, int]]] = field(default_factory=dict)

    @property
    def wall(self) -> float:
        return self.ended - self.started

    def first_beat(self) -> Heartbeat | None:
        return self.beats[self.pids[0]] if self.pids else None

    def last_beat(self) -> Heartbeat | None:
        return self.beats[self.pids[-1]] if self.pids else None


def newest_complete_step(output_dir: Path, *, require_record: bool) -> int:
    """The newest checkpoint that is complete by trainwarden's rules (0 if none).

    ``require_record=False`` judges a plain HF checkpoint by structure, which is
    the most generous reading of what the naive loop kept.
    """
    steps = sorted(
        (step for p in output_dir.glob("checkpoint-*") if (step := checkpoint_step(p.name))),
        reverse=True,
    )
    for step in steps:
        entry = verify_checkpoint(
            output_dir / f"checkpoint-{step}", require_record=require_record, deep=False
        )
        if entry.integrity is Integrity.COMPLETE:
            return step
    return 0


class _CrashLoopWatch:
    """Spot attempts that die on their own, twice in a row, resuming from the same folder."""

    def __init__(self, root_pid: int, killer: Killer | None) -> None:
        self.root_pid = root_pid
        self.killer = killer
        self.alive: dict[int, str] = {}
        self.streak: list[str] = []

    def looping(self) -> bool:
        now = {p.pid: p for p in live_descendants(self.root_pid, is_trainer_child)}
        for pid, proc in now.items():
            if pid not in self.alive:
                with contextlib.suppress(psutil.Error):
                    self.alive[pid] = _resume_arg(proc.cmdline())
        for pid in [p for p in self.alive if p not in now]:
            resume = self.alive.pop(pid)
            killed = self.killer is not None and pid in self.killer.targeted
            if killed:
                self.streak.clear()
            else:
                self.streak.append(resume)
        return len(self.streak) >= 2 and self.streak[-1] == self.streak[-2] != ""


def _resume_arg(cmdline: Sequence[str]) -> str:
    for index, part in enumerate(cmdline[:-1]):
        if part == "--resume-from":
            return cmdline[index + 1]
    return ""


def run_job(
    proc: Process,
    output_dir: Path,
    *,
    label: str,
    system: str,
    cap: float,
    plan: KillPlan | None = None,
    window: float | None = None,
    at_window: Callable[[], dict[str, Any]] | None = None,
    footprint: bool = False,
) -> RunRecord:
    """Drive ``proc`` (already started) to its end, the cap, or ``window`` seconds; then kill it.

    ``at_window`` is called at the window's end, before anything is stopped, so
    it sees the run exactly as it stood.
    """
    usage = Footprint() if footprint else None
    capped = crash_loop = False
    code: int | None = None
    ended = proc.started
    window_data: dict[str, Any] = {}
    killer = Killer(proc.pid, output_dir, plan) if plan is not None else None
    watch = _CrashLoopWatch(proc.pid, killer) if system == "naive" else None
    cpu_start: tuple[float, float] | None = None
    cpu_last: tuple[float, float] | None = None
    next_sample = 0.0
    measured = psutil.Process(proc.pid)
    with HeartbeatRecorder(output_dir) as recorder:
        if killer is not None:
            killer.__enter__()
        try:
            while True:
                code = proc.poll()
                now = time.time()
                if code is not None:
                    ended = now
                    break
                if window is not None and now - proc.started >= window:
                    window_data = at_window() if at_window is not None else {}
                    ended = now
                    break
                if now - proc.started >= cap:
                    capped, ended = True, now
                    break
                if watch is not None and watch.looping():
                    crash_loop, ended = True, now
                    break
                if usage is not None and now >= next_sample:
                    next_sample = now + FOOTPRINT_EVERY
                    beat = recorder.latest()
                    training = beat is not None and beat.phase in (Phase.TRAIN, Phase.SAVE)
                    with contextlib.suppress(psutil.Error):
                        rss = measured.memory_info().rss
                        cpu = measured.cpu_times()
                        usage.peak_rss = max(usage.peak_rss, rss)
                        if training:
                            usage.rss_samples.append(rss)
                            if cpu_start is None:
                                cpu_start = (now, cpu.user + cpu.system)
                            cpu_last = (now, cpu.user + cpu.system)
                time.sleep(POLL_SECONDS)
        finally:
            if killer is not None:
                killer.stop()
            proc.close()
    if usage is not None and cpu_start is not None and cpu_last is not None:
        usage.wall_seconds = cpu_last[0] - cpu_start[0]
        usage.cpu_seconds = cpu_last[1] - cpu_start[1]
    layout = Layout(output_dir)
    finished = code == 0 and (system != "trainwarden" or layout.final.is_dir())
    return RunRecord(
        label=label,
        system=system,
        output_dir=output_dir,
        started=proc.started,
        ended=ended,
        exit_code=code,
        finished=finished,
        capped=capped,
        crash_loop=crash_loop,
        kills=list(killer.kills) if killer is not None else [],
        beats=dict(recorder.by_pid),
        pids=list(recorder.order),
        events=events(output_dir),
        footprint=usage,
        window=window_data,
        history={pid: list(points) for pid, points in recorder.history.items()},
    )


__all__ = ["Footprint", "RunRecord", "newest_complete_step", "run_job"]
