"""Recognise what an earlier supervisor left running: a live peer, or an orphaned child.

On start the supervisor may find ``.warden/lock`` taken. Either another
supervisor is alive (refuse: two must never share an output_dir), or the
previous supervisor died and its child, which inherited the lock's descriptor,
is still training (wait for it rather than start a second trainer on the same
checkpoints). ``state.json`` names both pids; this module decides whether those
pids still mean what they meant, because pids are reused.
"""

from __future__ import annotations

import os
from typing import Protocol

import psutil

from supervisor.shell.lock import held_by_someone
from trainer_child.protocol import ENV_OUTPUT_DIR, Layout, RunStateFile

__all__ = ["Peers", "ProcPeers", "create_time", "find_orphan", "supervisor_alive"]

#: ``create_time`` is wall-clock based (boot time + start ticks); a wall clock
#: stepped by more than this between two supervisors makes the orphan
#: unrecognisable, which fails safe (the lock stays refused, a human looks).
CREATE_TIME_TOLERANCE = 1.0


def create_time(pid: int) -> float | None:
    """Return psutil's create time of ``pid`` (stored in state.json as ``child_create_time``)."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _live(pid: int) -> psutil.Process | None:
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def _names_output_dir(proc: psutil.Process, layout: Layout) -> bool | None:
    """Say whether the process's environment points at this output_dir; None if unreadable."""
    try:
        env = proc.environ()
        cwd = proc.cwd()
    except psutil.AccessDenied:
        return None
    except psutil.Error:
        return False
    value = env.get(ENV_OUTPUT_DIR)
    if not value:
        return False
    # The supervisor may have passed a relative output_dir; it is relative to the child's cwd.
    theirs = os.path.realpath(os.path.join(cwd, value))
    return theirs == os.path.realpath(layout.output_dir)


def find_orphan(layout: Layout, state: RunStateFile | None) -> int | None:
    """Return the pid of an earlier supervisor's child that still trains on this output_dir.

    All must hold: someone holds the lock; state.json names a child pid that is
    alive (not a zombie); its create time matches the recorded one (when
    recorded), and its environment names this output_dir (when readable). With
    neither identity check possible the pid is not trusted: killing a stranger
    is worse than asking a human.
    """
    if state is None or state.child_pid is None:
        return None
    if not held_by_someone(layout.lock):
        return None
    pid = state.child_pid
    if pid == os.getpid():
        return None
    proc = _live(pid)
    if proc is None:
        return None
    checked = False
    if state.child_create_time is not None:
        started = create_time(pid)
        if started is None or abs(started - state.child_create_time) > CREATE_TIME_TOLERANCE:
            return None
        checked = True
    ours = _names_output_dir(proc, layout)
    if ours is False:
        return None
    if ours is None and not checked:
        return None
    return pid


def supervisor_alive(state: RunStateFile | None) -> bool:
    """Say whether the supervisor named in state.json is alive, is not us, and looks like one.

    "Looks like one" means a Python or trainwarden process: a recycled pid now
    running something else is not a supervisor.
    """
    if state is None or state.supervisor_pid is None or state.supervisor_pid == os.getpid():
        return False
    proc = _live(state.supervisor_pid)
    if proc is None:
        return False
    try:
        name = proc.name()
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return "python" in name or "trainwarden" in name or "trainwarden" in cmdline


class Peers(Protocol):
    """What the loop asks about processes it did not start itself."""

    def supervisor_alive(self, state: RunStateFile | None) -> bool:
        """Say whether the supervisor named in state.json still runs (and is not us)."""
        ...

    def find_orphan(self, state: RunStateFile | None) -> int | None:
        """Return the pid of an earlier supervisor's child still training here, if any."""
        ...

    def create_time(self, pid: int) -> float | None:
        """Return ``pid``'s create time, recorded so a recycled pid is never taken for it."""
        ...


class ProcPeers:
    """The real answers, from /proc (psutil) and the run lock of one output_dir."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout

    def supervisor_alive(self, state: RunStateFile | None) -> bool:
        """See the module function ``supervisor_alive``."""
        return supervisor_alive(state)

    def find_orphan(self, state: RunStateFile | None) -> int | None:
        """See the module function ``find_orphan``."""
        return find_orphan(self._layout, state)

    def create_time(self, pid: int) -> float | None:
        """See the module function ``create_time``."""
        return create_time(pid)
