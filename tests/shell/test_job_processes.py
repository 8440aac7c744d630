"""The launcher reaches processes that left the child's process group, as torchrun's ranks do.

torchrun's agent starts each rank with ``start_new_session``. Here a plain
shell plays the agent and ``setsid sleep`` a rank: a process in a session of
its own that carries the job's marker (the output_dir) in its environment.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from supervisor.shell.launcher import ChildHandle, JobMarker, JobScan, ProcessLauncher

MARKER_NAME = "TRAINWARDEN_OUTPUT_DIR"
Exits = queue.SimpleQueue[tuple[int, int]]


def wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {predicate}")
        time.sleep(0.01)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def output_dir(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


@pytest.fixture
def launcher(output_dir: Path) -> Iterator[ProcessLauncher]:
    """A launcher that knows the job by its output_dir; everything it started dies at teardown."""
    real = ProcessLauncher(linger=30.0, marker=JobMarker(MARKER_NAME, str(output_dir)))
    try:
        yield real
    finally:
        for pid in real.job_processes(None):
            os.kill(pid, signal.SIGKILL)
        real.close(grace=0.5)


def spawn_agent(
    launcher: ProcessLauncher, output_dir: Path, script: str, exits: Exits
) -> ChildHandle:
    """Run ``sh -c script`` as the child, with the job's marker in its environment."""
    return launcher.spawn(
        ["sh", "-c", script],
        env={**os.environ, MARKER_NAME: str(output_dir)},
        cwd=output_dir.parent,
        log_path=output_dir / "agent.log",
        pass_fds=(),
        on_exit=lambda pid, rc: exits.put((pid, rc)),
    )


def rank_pid(output_dir: Path) -> int:
    """The pid the agent script wrote for its 'rank', once it leads a session of its own."""
    path = output_dir / "rank.pid"
    wait_for(lambda: path.exists() and path.read_text().endswith("\n"))
    pid = int(path.read_text())
    # $! is known before the background job has run setsid(2).
    wait_for(lambda: os.getsid(pid) == pid)
    return pid


#: The agent: starts one 'rank' in a session of its own, notes its pid, waits.
AGENT = "setsid sleep 300 & echo $! > out/rank.pid; wait"


def test_scan_finds_marked_processes_in_other_sessions_only_for_this_job(
    output_dir: Path, tmp_path: Path
) -> None:
    """A marked process in its own session is found (path relative or not); others are not."""
    other = tmp_path / "other"
    other.mkdir()
    env = dict(os.environ)
    procs = [
        subprocess.Popen(
            ["sleep", "300"], env={**env, MARKER_NAME: str(output_dir)}, start_new_session=True
        ),
        subprocess.Popen(
            ["sleep", "300"], env={**env, MARKER_NAME: "out"}, cwd=tmp_path, start_new_session=True
        ),
        subprocess.Popen(
            ["sleep", "300"], env={**env, MARKER_NAME: str(other)}, start_new_session=True
        ),
        subprocess.Popen(["sleep", "300"], env=env, start_new_session=True),
    ]
    try:
        scan = JobScan(JobMarker(MARKER_NAME, str(output_dir)))
        found = set(scan.members(None))
        assert {procs[0].pid, procs[1].pid} <= found
        assert not {procs[2].pid, procs[3].pid} & found
        procs[0].kill()
        procs[0].wait()
        assert procs[0].pid not in scan.members(None)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_signal_reaches_a_rank_in_its_own_session(
    launcher: ProcessLauncher, output_dir: Path
) -> None:
    """SIGTERM to the child's group also reaches what left it; the exit waits for it."""
    exits: Exits = queue.SimpleQueue()
    handle = spawn_agent(launcher, output_dir, AGENT, exits)
    rank = rank_pid(output_dir)
    assert os.getpgid(rank) != handle.pid
    assert rank in launcher.job_processes(handle.pid)
    launcher.signal_group(handle.pid, signal.SIGTERM)
    pid, _ = exits.get(timeout=10)
    assert pid == handle.pid
    assert not alive(rank)


def test_exit_is_reported_once_the_rank_outliving_its_agent_is_gone(
    output_dir: Path,
) -> None:
    """The agent dies first; its rank is given the linger, then SIGKILLed, then the exit counts."""
    launcher = ProcessLauncher(linger=0.3, marker=JobMarker(MARKER_NAME, str(output_dir)))
    exits: Exits = queue.SimpleQueue()
    try:
        handle = spawn_agent(launcher, output_dir, AGENT.replace("; wait", ""), exits)
        rank = rank_pid(output_dir)
        pid, code = exits.get(timeout=10)
        assert (pid, code) == (handle.pid, 0)
        assert not alive(rank), "the exit was reported while the rank still ran"
    finally:
        launcher.close(grace=0.5)


def test_a_stopped_rank_counts_as_a_stopped_child(
    launcher: ProcessLauncher, output_dir: Path
) -> None:
    """SIGSTOP of the rank, not the agent, is seen: the hang handling must SIGCONT it."""
    exits: Exits = queue.SimpleQueue()
    handle = spawn_agent(launcher, output_dir, AGENT, exits)
    rank = rank_pid(output_dir)
    assert not launcher.process_stopped(handle.pid)
    os.kill(rank, signal.SIGSTOP)
    wait_for(lambda: psutil.Process(rank).status() == psutil.STATUS_STOPPED)
    # The list of the job's processes is at most a few seconds old; the rank was in it.
    assert launcher.process_stopped(handle.pid)
    launcher.stop(handle.pid, grace=5.0)
    assert not alive(rank)
    assert exits.get(timeout=10)[0] == handle.pid
