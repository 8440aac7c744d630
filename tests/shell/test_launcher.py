"""ProcessLauncher against real child processes: spawn, exit reports, signals, stop, log cap."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from supervisor.config import parse_config
from supervisor.loop import default_shell
from supervisor.shell.launcher import (
    ChildHandle,
    Launcher,
    ProcessLauncher,
    enforce_log_cap,
    live_group_members,
)
from supervisor.shell.standby import WarmLauncher
from supervisor.shell.testing import FakeLauncher
from tests.support.processes import wait_for

PY = sys.executable
#: A grace stop() would only use up if SIGTERM failed; the test's own timeout ends it first.
GRACE_NEVER_REACHED = 300.0
Exits = queue.SimpleQueue[tuple[int, int]]


@pytest.fixture
def launcher() -> Iterator[ProcessLauncher]:
    """A real launcher whose children are stopped (by pid) and waiters joined at teardown."""
    real = ProcessLauncher()
    try:
        yield real
    finally:
        real.close(grace=0.5)


def spawn(launcher: ProcessLauncher, tmp_path: Path, code: str, exits: Exits) -> ChildHandle:
    """Start ``python -c code`` with its output in tmp_path/child.log."""
    return launcher.spawn(
        [PY, "-c", textwrap.dedent(code)],
        env=dict(os.environ),
        cwd=tmp_path,
        log_path=tmp_path / "child.log",
        pass_fds=(),
        on_exit=lambda pid, rc: exits.put((pid, rc)),
    )


def kill_quietly(pid: int) -> None:
    """SIGKILL a pid we started, ignoring one that is already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


SLEEPER = """
    import pathlib, sys, time
    pathlib.Path("ready").write_text("1")
    time.sleep(60)
"""


def test_spawn_reports_exit_code_and_logs_output(launcher: ProcessLauncher, tmp_path: Path) -> None:
    """A child's exit code reaches on_exit and its stdout+stderr land in the log file."""
    exits: Exits = queue.SimpleQueue()
    (tmp_path / "child.log").write_text("earlier attempt line\n")
    handle = spawn(
        launcher,
        tmp_path,
        """
        import sys
        print("to stdout", flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        sys.exit(3)
        """,
        exits,
    )
    assert exits.get(timeout=10) == (handle.pid, 3)
    text = (tmp_path / "child.log").read_text()
    assert text.startswith("earlier attempt line\n")  # appended, not truncated
    assert "to stdout" in text
    assert "to stderr" in text
    assert handle.started_at <= time.monotonic()


def test_child_leads_its_own_session_with_stdin_closed(
    launcher: ProcessLauncher, tmp_path: Path
) -> None:
    """The child is a session and group leader and reads EOF from stdin."""
    exits: Exits = queue.SimpleQueue()
    handle = spawn(
        launcher,
        tmp_path,
        """
        import os, sys
        print(os.getpid() == os.getpgid(0) == os.getsid(0), repr(sys.stdin.read()), flush=True)
        """,
        exits,
    )
    assert exits.get(timeout=10) == (handle.pid, 0)
    assert (tmp_path / "child.log").read_text().strip() == "True ''"


def test_pass_fds_are_inherited_and_other_fds_closed(
    launcher: ProcessLauncher, tmp_path: Path
) -> None:
    """Only the descriptors in pass_fds stay open in the child."""
    exits: Exits = queue.SimpleQueue()
    keep = os.open(tmp_path / "keep", os.O_RDWR | os.O_CREAT)
    other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)
    os.set_inheritable(other, True)  # close_fds must close it anyway
    code = f"import os; print(os.get_inheritable({keep}), '{other}' in os.listdir('/proc/self/fd'))"
    try:
        handle = launcher.spawn(
            [PY, "-c", code],
            env=dict(os.environ),
            cwd=tmp_path,
            log_path=tmp_path / "child.log",
            pass_fds=(keep,),
            on_exit=lambda pid, rc: exits.put((pid, rc)),
        )
        assert exits.get(timeout=10) == (handle.pid, 0)
    finally:
        os.close(keep)
        os.close(other)
    assert (tmp_path / "child.log").read_text().strip() == "True False"


def test_sigkill_is_reported_as_negative_returncode(
    launcher: ProcessLauncher, tmp_path: Path
) -> None:
    """A child killed by SIGKILL reports returncode -9; signalling it again is no error."""
    exits: Exits = queue.SimpleQueue()
    handle = spawn(launcher, tmp_path, SLEEPER, exits)
    try:
        wait_for((tmp_path / "ready").exists, 30)
        assert launcher.process_alive(handle.pid)
        launcher.signal_group(handle.pid, signal.SIGKILL)
        assert exits.get(timeout=10) == (handle.pid, -signal.SIGKILL)
        assert not launcher.process_alive(handle.pid)
        launcher.signal_group(handle.pid, signal.SIGTERM)  # already dead: not an error
    finally:
        kill_quietly(handle.pid)


def test_sigstopped_child_is_reported_stopped(launcher: ProcessLauncher, tmp_path: Path) -> None:
    """process_stopped is true while the child is SIGSTOPped and false after SIGCONT."""
    exits: Exits = queue.SimpleQueue()
    handle = spawn(launcher, tmp_path, SLEEPER, exits)
    try:
        wait_for((tmp_path / "ready").exists, 30)
        assert not launcher.process_stopped(handle.pid)
        launcher.signal_group(handle.pid, signal.SIGSTOP)
        wait_for(lambda: launcher.process_stopped(handle.pid), 30)
        assert launcher.process_alive(handle.pid)
        launcher.signal_group(handle.pid, signal.SIGCONT)
        wait_for(lambda: not launcher.process_stopped(handle.pid), 30)
    finally:
        kill_quietly(handle.pid)


def test_stop_sigkills_group_that_ignores_sigterm(
    launcher: ProcessLauncher, tmp_path: Path
) -> None:
    """stop() waits the grace, then SIGKILLs the child and its grandchild in the same group."""
    exits: Exits = queue.SimpleQueue()
    handle = spawn(
        launcher,
        tmp_path,
        f"""
        import pathlib, signal, subprocess, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # SIG_IGN survives exec, so the grandchild ignores SIGTERM too.
        grandchild = subprocess.Popen([{PY!r}, "-c", "import time; time.sleep(60)"])
        pathlib.Path("grandchild").write_text(str(grandchild.pid))
        time.sleep(60)
        """,
        exits,
    )
    grandchild = 0
    try:
        wait_for((tmp_path / "grandchild").exists, 30)
        grandchild = int((tmp_path / "grandchild").read_text())
        assert os.getpgid(grandchild) == handle.pid
        started = time.monotonic()
        launcher.stop(handle.pid, grace=0.5)
        assert time.monotonic() - started >= 0.5  # the grace was given before SIGKILL
        # on_exit has already run when stop() returns.
        assert exits.get_nowait() == (handle.pid, -signal.SIGKILL)
        assert live_group_members(handle.pid) == []
        assert not psutil.pid_exists(grandchild) or (
            psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
        )
    finally:
        kill_quietly(handle.pid)
        if grandchild:
            kill_quietly(grandchild)


def test_stop_returns_early_when_child_honours_sigterm(
    launcher: ProcessLauncher, tmp_path: Path
) -> None:
    """stop() returns as soon as a polite child exits on SIGTERM, well inside the grace."""
    exits: Exits = queue.SimpleQueue()
    handle = spawn(launcher, tmp_path, SLEEPER, exits)
    try:
        wait_for((tmp_path / "ready").exists, 30)
        launcher.stop(handle.pid, grace=GRACE_NEVER_REACHED)
        # Died of our SIGTERM, reported by the time stop() returned: no SIGKILL needed.
        assert exits.get_nowait() == (handle.pid, -signal.SIGTERM)
    finally:
        kill_quietly(handle.pid)


def test_stop_continues_a_sigstopped_child(launcher: ProcessLauncher, tmp_path: Path) -> None:
    """A SIGSTOPped child receives SIGCONT with SIGTERM, so it dies without the SIGKILL wait."""
    exits: Exits = queue.SimpleQueue()
    handle = spawn(launcher, tmp_path, SLEEPER, exits)
    try:
        wait_for((tmp_path / "ready").exists, 30)
        launcher.signal_group(handle.pid, signal.SIGSTOP)
        wait_for(lambda: launcher.process_stopped(handle.pid), 30)
        launcher.stop(handle.pid, grace=GRACE_NEVER_REACHED)
        # Died of our SIGTERM, reported by the time stop() returned: no SIGKILL needed.
        assert exits.get_nowait() == (handle.pid, -signal.SIGTERM)
    finally:
        kill_quietly(handle.pid)


def test_stop_of_unknown_or_dead_pid_is_not_an_error(launcher: ProcessLauncher) -> None:
    """Stopping a group that no longer exists returns at once."""
    proc = psutil.Popen([PY, "-c", "pass"])
    proc.wait(10)
    started = time.monotonic()
    launcher.stop(proc.pid, grace=5.0)
    assert time.monotonic() - started < 1.0


def test_close_stops_children_still_running(tmp_path: Path) -> None:
    """close() stops a child that is still running and joins its waiter thread."""
    real = ProcessLauncher()
    exits: Exits = queue.SimpleQueue()
    handle = spawn(real, tmp_path, SLEEPER, exits)
    try:
        wait_for((tmp_path / "ready").exists, 30)
        real.close(grace=2.0)
        assert exits.get_nowait() == (handle.pid, -signal.SIGTERM)
        assert real.running() == []
        assert real.join(timeout=0)
    finally:
        kill_quietly(handle.pid)
        real.close(grace=0.1)


def test_spawn_of_missing_program_raises_oserror(launcher: ProcessLauncher, tmp_path: Path) -> None:
    """A program that cannot start raises OSError and leaves no waiter behind."""
    with pytest.raises(FileNotFoundError):
        launcher.spawn(
            [str(tmp_path / "no-such-program")],
            env={},
            cwd=tmp_path,
            log_path=tmp_path / "child.log",
            pass_fds=(),
            on_exit=lambda pid, rc: None,
        )
    assert launcher.running() == []


def test_on_exit_exception_does_not_break_the_waiter(
    launcher: ProcessLauncher, tmp_path: Path
) -> None:
    """A failing on_exit callback is logged; stop() still returns and the waiter ends."""

    def explode(pid: int, rc: int) -> None:
        raise RuntimeError("callback bug")

    handle = launcher.spawn(
        [PY, "-c", "pass"],
        env=dict(os.environ),
        cwd=tmp_path,
        log_path=tmp_path / "child.log",
        pass_fds=(),
        on_exit=explode,
    )
    launcher.stop(handle.pid, grace=5.0)
    assert launcher.join(timeout=5)


# --- log cap ---------------------------------------------------------------------------


def test_log_cap_keeps_newest_half_with_marker(tmp_path: Path) -> None:
    """Past the cap the log keeps its newest half, starting at a line, behind a counting marker."""
    path = tmp_path / "attempt-1.log"
    lines = [f"line {i:05d}\n" for i in range(2000)]  # 11 bytes each, 22000 bytes
    path.write_text("".join(lines))
    assert enforce_log_cap(path, 100_000) == 0  # under the cap: untouched

    cut = enforce_log_cap(path, 8192)
    text = path.read_text()
    header, _, body = text.partition("\n")
    assert header == f"[trainwarden: {cut} bytes truncated]"
    assert "".join(lines).endswith(body)
    assert body.startswith("line ")  # at a line boundary
    assert len(body) <= 4096
    assert cut + len(body) == 22000

    with path.open("a") as handle:
        handle.write("".join(lines))
    cut2 = enforce_log_cap(path, 8192)
    header2 = path.read_text().partition("\n")[0]
    assert header2 == f"[trainwarden: {cut + cut2} bytes truncated]"


def test_log_cap_rejects_tiny_cap(tmp_path: Path) -> None:
    """A cap too small to hold a marker and a tail is a configuration error."""
    with pytest.raises(ValueError, match="minimum"):
        enforce_log_cap(tmp_path / "x.log", 100)


def test_log_cap_while_child_appends(launcher: ProcessLauncher, tmp_path: Path) -> None:
    """Capping a log a live child appends to keeps it bounded, ordered and whole-lined."""
    exits: Exits = queue.SimpleQueue()
    handle = spawn(
        launcher,
        tmp_path,
        """
        import sys
        for i in range(60000):
            sys.stdout.write(f"line {i:06d}\\n")
            if i % 50 == 0:
                sys.stdout.flush()
        sys.stdout.flush()
        """,
        exits,
    )
    log_path = tmp_path / "child.log"
    cap = 64 * 1024
    cuts = 0
    try:
        while True:
            try:
                exits.get(timeout=0.005)
                break
            except queue.Empty:
                cuts += enforce_log_cap(log_path, cap) > 0
        enforce_log_cap(log_path, cap)
    finally:
        kill_quietly(handle.pid)
    assert cuts > 0
    assert log_path.stat().st_size <= cap
    header, _, body = log_path.read_text().partition("\n")
    assert header.startswith("[trainwarden: ")
    numbers = [int(line.split()[1]) for line in body.splitlines()]
    assert all(line.startswith("line ") and len(line) == 11 for line in body.splitlines())
    assert numbers == sorted(numbers)
    assert numbers[-1] == 59999


# --- the contract the fake keeps too ----------------------------------------------------


@pytest.mark.parametrize("kind", ["process", "fake"])
def test_both_launchers_report_a_stopped_child_once_and_refuse_the_unstartable(
    kind: str, tmp_path: Path
) -> None:
    """ProcessLauncher and FakeLauncher alike: alive until stopped, exit -SIGTERM, OSError."""
    real = ProcessLauncher()
    fake = FakeLauncher()
    launcher: Launcher = real if kind == "process" else fake
    exits: list[tuple[int, int]] = []
    try:
        handle = launcher.spawn(
            [PY, "-c", "import time; time.sleep(60)"],
            env=dict(os.environ),
            cwd=tmp_path,
            log_path=tmp_path / "a.log",
            pass_fds=(),
            on_exit=lambda pid, rc: exits.append((pid, rc)),
        )
        assert launcher.process_alive(handle.pid)
        assert not launcher.process_stopped(handle.pid)
        launcher.signal_group(handle.pid, signal.SIGCONT)  # harmless to a running child
        launcher.stop(handle.pid, grace=10.0)
        assert exits == [(handle.pid, -signal.SIGTERM)]  # reported before stop() returns
        assert not launcher.process_alive(handle.pid)
        fake.fail_next = FileNotFoundError(2, "No such file or directory", "no-such-binary")
        with pytest.raises(OSError):
            launcher.spawn(
                ["/nonexistent/no-such-binary"],
                env={},
                cwd=tmp_path,
                log_path=tmp_path / "b.log",
                pass_fds=(),
                on_exit=print,
            )
    finally:
        launcher.close()


@pytest.mark.parametrize(
    ("standby", "kind", "note"),
    [
        ("off", ProcessLauncher, "restart.standby is off"),
        ("auto", WarmLauncher, "python -c runs code from the command line"),
    ],
)
def test_the_shell_says_why_a_child_started_cold(
    standby: str, kind: type, note: str, tmp_path: Path
) -> None:
    """default_shell: with the standby off every start is cold *and says so*; auto keeps one."""
    config = parse_config(
        {
            "output_dir": str(tmp_path / "out"),
            "command": [PY, "-c", "pass"],
            "restart": {"standby": standby},
        }
    )
    launcher = default_shell(config).launcher
    assert isinstance(launcher, kind)
    exits: Exits = queue.SimpleQueue()
    handle = spawn(launcher, tmp_path, "pass", exits)  # type: ignore[arg-type]
    try:
        assert exits.get(timeout=30) == (handle.pid, 0)
        assert handle.start == "cold"
        assert handle.start_note.startswith(note)
    finally:
        launcher.close()
