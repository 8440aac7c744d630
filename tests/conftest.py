"""Shared fixtures: every test must leave no thread and no process behind.

The test process makes itself a child subreaper, so a training child orphaned by
a SIGKILLed supervisor is re-parented to us rather than to PID 1, and the leak
check below can see it (and kill it) instead of letting it train on unnoticed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

PR_SET_CHILD_SUBREAPER = 36
LEAK_GRACE_SECONDS = 5.0


def _become_subreaper() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


_become_subreaper()


def _live_children() -> list[psutil.Process]:
    alive = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                # Re-parented orphans that died: reap them so they do not pile up.
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(proc.pid, os.WNOHANG)
                continue
            alive.append(proc)
        except psutil.NoSuchProcess:
            continue
    return alive


def _foreign_thread(thread: threading.Thread) -> bool:
    # Threads that libraries start once per process and keep (torch's, pytest-timeout's,
    # fsspec's event loop that s3fs runs on).
    name = thread.name
    return name.startswith(("pytest_timeout", "asyncio_", "ThreadPoolExecutor", "fsspecIO"))


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves threads or child processes behind (and clean them up)."""
    threads_before = set(threading.enumerate())
    children_before = {p.pid for p in _live_children()}
    yield
    deadline = time.monotonic() + LEAK_GRACE_SECONDS
    while True:
        threads = [
            t
            for t in threading.enumerate()
            if t not in threads_before and t.is_alive() and not _foreign_thread(t)
        ]
        children = [p for p in _live_children() if p.pid not in children_before]
        if (not threads and not children) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for proc in children:
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    if children:
        with contextlib.suppress(psutil.Error):
            psutil.wait_procs(children, timeout=5)
        _live_children()
    problems = []
    if threads:
        problems.append(f"threads left running: {[t.name for t in threads]}")
    if children:
        problems.append(
            "processes left running (killed now): " + ", ".join(f"{p.pid}" for p in children)
        )
    if problems:
        pytest.fail("; ".join(problems))
