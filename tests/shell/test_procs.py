"""Orphan and peer detection against real processes and a real lock."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from supervisor.shell import procs
from supervisor.shell.lock import RunLock
from tests.support.processes import start_exec
from trainer_child.protocol import ENV_OUTPUT_DIR, Layout, RunStateFile

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


class Orphan:
    """A child that inherited the run lock from a 'supervisor' (this test) that let go."""

    def __init__(self, layout: Layout, output_dir_env: str) -> None:
        lock = RunLock(layout.lock)
        assert lock.acquire()
        # Judged only once exec'd: before, /proc/PID shows pytest's own environ.
        self.proc = start_exec(
            SLEEP,
            pass_fds=(lock.fd,),
            start_new_session=True,
            env={**os.environ, ENV_OUTPUT_DIR: output_dir_env},
        )
        lock.release()  # the supervisor "dies"; the child's copy keeps the lock
        self.pid = self.proc.pid
        self.create_time = psutil.Process(self.pid).create_time()

    def kill(self) -> None:
        """SIGKILL and reap the child (idempotent)."""
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    """An output_dir with .warden/ created."""
    result = Layout(tmp_path / "run")
    result.ensure()
    return result


@pytest.fixture
def orphan(layout: Layout) -> Iterator[Orphan]:
    """An orphaned child holding the lock, with TRAINWARDEN_OUTPUT_DIR naming the run."""
    child = Orphan(layout, str(layout.output_dir))
    try:
        yield child
    finally:
        child.kill()


def state_for(pid: int | None, create_time: float | None) -> RunStateFile:
    """A state.json naming a child."""
    return RunStateFile(child_pid=pid, child_create_time=create_time, supervisor_pid=1)


def test_orphan_holding_the_lock_is_found(layout: Layout, orphan: Orphan) -> None:
    """The child named in state.json, alive, matching create time and output_dir, is the orphan."""
    assert procs.find_orphan(layout, state_for(orphan.pid, orphan.create_time)) == orphan.pid


def test_orphan_found_by_environment_when_create_time_unrecorded(
    layout: Layout, orphan: Orphan
) -> None:
    """Without a recorded create time the environment's output_dir identifies the child."""
    assert procs.find_orphan(layout, state_for(orphan.pid, None)) == orphan.pid


def test_recycled_pid_is_not_an_orphan(layout: Layout, orphan: Orphan) -> None:
    """A live pid whose create time differs from the recorded one is someone else."""
    assert procs.find_orphan(layout, state_for(orphan.pid, orphan.create_time - 60)) is None


def test_no_orphan_without_state_or_pid(layout: Layout, orphan: Orphan) -> None:
    """No state.json, or one without a child pid, names no orphan."""
    assert procs.find_orphan(layout, None) is None
    assert procs.find_orphan(layout, state_for(None, None)) is None


def test_dead_child_is_not_an_orphan(layout: Layout, orphan: Orphan) -> None:
    """Once the child has died (and released the lock) there is no orphan."""
    orphan.kill()
    assert procs.find_orphan(layout, state_for(orphan.pid, orphan.create_time)) is None


def test_child_of_another_output_dir_is_not_ours(layout: Layout, tmp_path: Path) -> None:
    """A live lock holder whose environment names another output_dir is not our orphan."""
    child = Orphan(layout, str(tmp_path / "elsewhere"))
    try:
        assert procs.find_orphan(layout, state_for(child.pid, child.create_time)) is None
    finally:
        child.kill()


def test_free_lock_means_no_orphan(layout: Layout) -> None:
    """A live process named in state.json does not count if nobody holds the lock."""
    proc = start_exec(SLEEP, env={**os.environ, ENV_OUTPUT_DIR: str(layout.output_dir)})
    try:
        state = state_for(proc.pid, psutil.Process(proc.pid).create_time())
        assert procs.find_orphan(layout, state) is None
    finally:
        proc.kill()
        proc.wait(10)


def test_supervisor_alive_recognises_a_live_python_peer() -> None:
    """A live python peer counts as a supervisor; we, the dead and non-python do not."""
    # Both exec'd first: a fork not yet exec'd is still this (python) test process.
    peer = start_exec(SLEEP)
    other = start_exec(["sleep", "60"])
    try:
        assert procs.supervisor_alive(RunStateFile(supervisor_pid=peer.pid))
        assert not procs.supervisor_alive(RunStateFile(supervisor_pid=os.getpid()))
        assert not procs.supervisor_alive(RunStateFile(supervisor_pid=other.pid))
        assert not procs.supervisor_alive(RunStateFile())
        assert not procs.supervisor_alive(None)
        peer.kill()
        peer.wait(10)
        assert not procs.supervisor_alive(RunStateFile(supervisor_pid=peer.pid))
    finally:
        for proc in (peer, other):
            proc.kill()
            proc.wait(10)


def test_create_time_of_live_and_dead_pids() -> None:
    """create_time matches psutil for a live pid and is None for a dead one."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        started = procs.create_time(proc.pid)
        assert started is not None
        assert abs(started - time.time()) < 60
    finally:
        proc.wait(10)
    assert procs.create_time(proc.pid) is None
