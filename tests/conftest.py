"""Rules every test obeys: leave no thread and no process behind, and never skip quietly.

The test process makes itself a child subreaper, so a training child orphaned by
a SIGKILLed supervisor is re-parented to us rather than to PID 1, and the leak
check below can see it (and kill it) instead of letting it train on unnoticed.

A skip is allowed only through ``tests.support.capabilities.require``, which
skips when the machine truly lacks something (root, a binary, a cgroup
hierarchy); any other skip fails. ``--require-run`` (the Makefile's serial
stage) fails a session in which no test ran at all; outside CI (``$CI`` unset)
it lets pass a session whose every test lacked a capability, saying so.
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

from tests.support.capabilities import ABSENT_PREFIX

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


# --- no quiet skips, no empty stage -----------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-run",
        action="store_true",
        help="fail the session when no selected test ran (all skipped, or none selected)",
    )


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Turn a skip that does not name a missing capability into a failure."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if not reason.startswith(ABSENT_PREFIX):
            report.outcome = "failed"
            report.longrepr = (
                f"skipped, but not for a missing capability ({reason}): a test that can run "
                "here must run; skip only through tests.support.capabilities.require"
            )


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """The same rule for a whole module skipped at import (``pytest.importorskip``)."""
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped:
        reason = _skip_reason(report)  # type: ignore[arg-type]
        if not reason.startswith(ABSENT_PREFIX):
            report.outcome = "failed"
            report.longrepr = (
                f"{collector.nodeid} skipped at collection, but not for a missing capability "
                f"({reason}); skip only through tests.support.capabilities.require"
            )


class _Tally:
    ran = 0
    absent: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _Tally.absent.append(_skip_reason(report))
    elif report.when == "call" or (report.when == "setup" and report.failed):
        _Tally.ran += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not session.config.getoption("--require-run") or _Tally.ran:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if _Tally.absent and not os.environ.get("CI"):
        if reporter is not None:
            reporter.write_line(
                f"no test ran, each lacked a capability: {sorted(set(_Tally.absent))}"
            )
        return
    if reporter is not None:
        reporter.write_line(
            f"--require-run: no test ran (skips: {sorted(set(_Tally.absent)) or 'none selected'})",
            red=True,
        )
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
