"""RunLock: one supervisor per output_dir, and an orphaned child keeps the lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supervisor.shell.lock import RunLock, held_by_someone


def test_second_lock_is_refused_until_first_is_released(tmp_path: Path) -> None:
    """Only one RunLock holds the file; the next one gets it after release."""
    path = tmp_path / ".warden" / "lock"
    first, second = RunLock(path), RunLock(path)
    try:
        assert first.acquire()
        assert first.acquire()  # idempotent for the holder
        assert not second.acquire()
        assert not second.held
        first.release()
        assert second.acquire()
    finally:
        first.release()
        second.release()


def test_held_by_someone_probes_without_taking_the_lock(tmp_path: Path) -> None:
    """held_by_someone sees a holder (even in this process) and leaves a free lock free."""
    path = tmp_path / "lock"
    assert not held_by_someone(path)  # no file yet
    lock = RunLock(path)
    try:
        assert lock.acquire()
        assert held_by_someone(path)
        assert lock.held  # probing did not drop our lock (a POSIX lock would have)
        assert not RunLock(path).acquire()
    finally:
        lock.release()
    assert not held_by_someone(path)
    again = RunLock(path)
    assert again.acquire()  # the probe left nothing behind
    again.release()


def test_fd_is_inheritable_and_file_names_holder(tmp_path: Path) -> None:
    """The locked fd is inheritable (for the child) and the file names our pid for humans."""
    lock = RunLock(tmp_path / "lock")
    with pytest.raises(RuntimeError):
        _ = lock.fd
    try:
        assert lock.acquire()
        assert os.get_inheritable(lock.fd)
        assert (tmp_path / "lock").read_text().strip() == str(os.getpid())
    finally:
        lock.release()


def test_child_keeps_lock_after_supervisor_lets_go(tmp_path: Path) -> None:
    """A child given the fd holds the lock after the parent closes its copy, until it exits."""
    path = tmp_path / "lock"
    lock = RunLock(path)
    assert lock.acquire()
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        pass_fds=(lock.fd,),
        start_new_session=True,
    )
    try:
        lock.release()  # what a dying supervisor's exit does to its copy
        assert held_by_someone(path)
        assert not RunLock(path).acquire()
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 5
        while held_by_someone(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        taker = RunLock(path)
        assert taker.acquire()
        taker.release()
    finally:
        child.kill()
        child.wait(10)
        lock.release()
