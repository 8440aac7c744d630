"""Real processes for tests and benchmarks: started in their own session, always reaped.

``Process`` writes the process's output to a log file, never a pipe (a full pipe
would block it), and its ``close`` kills by pid, never by name: the process's
own group and the group of every descendant it was seen with (a supervisor's
training child leads a group of its own), then reaps it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]

__all__ = [
    "REPO_ROOT",
    "Launch",
    "Process",
    "descendants",
    "live_descendants",
    "run_all",
    "run_process",
    "start_exec",
    "wait_for",
]


def wait_for(
    predicate: Callable[[], Any], timeout: float, *, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll until ``predicate()`` is truthy and return its value; AssertionError after ``timeout``.

    The timeout is a safety net against a hung test, not a claim about speed:
    make it generous, and assert on what happened, not on how long it took.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def descendants(pid: int) -> list[psutil.Process]:
    """Every live descendant of ``pid`` (empty when ``pid`` is gone)."""
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return []


def live_descendants(pid: int, match: Callable[[Sequence[str]], bool]) -> list[psutil.Process]:
    """Descendants of ``pid`` whose command line ``match``es and that are not zombies."""
    found = []
    for proc in descendants(pid):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and match(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def start_exec(argv: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Start ``argv`` and return once it has exec'd.

    Until exec, ``/proc/PID`` shows the parent's cmdline and environment: a check
    that looks at the process in that window judges the test's own Python.
    """
    proc = subprocess.Popen(list(argv), **popen)
    wait_for(
        lambda: _cmdline(proc.pid) == list(argv) or proc.poll() is not None,
        30,
        interval=0.005,
        what=f"pid {proc.pid} to exec {argv[0]}",
    )
    return proc


def _cmdline(pid: int) -> list[str] | None:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return None


class Process:
    """One process, its log file, and a guaranteed kill and reap when done with it."""

    #: What the process is called in failure messages.
    what = "process"
    #: How long ``wait`` waits by default.
    default_timeout = 120.0
    #: How much of the log's tail ``log`` returns.
    log_tail = 6000

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        *,
        append: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "ab" if append else "wb")  # noqa: SIM115 - closed in close()
        #: Wall time of the start, for latencies against the journal's ``ts``.
        self.started = time.time()
        self.proc = subprocess.Popen(
            self.argv,
            env=dict(env),
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._seen: set[int] = set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        """Return the exit status if it has ended, noting its descendants meanwhile."""
        self._seen.update(p.pid for p in descendants(self.pid))
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Return the exit status (negative for a signal), failing loudly on timeout."""
        timeout = self.default_timeout if timeout is None else timeout
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.what} {self.pid} still running after {timeout}s\n{self.log()}"
            ) from None

    def exit_within(self, timeout: float) -> int | None:
        """Return the exit status, or None if it still runs after ``timeout`` (benchmarks)."""
        try:
            return self.wait(timeout)
        except AssertionError:
            return None

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-self.log_tail :]

    def pids_to_kill(self) -> set[int]:
        """Itself and every descendant seen: the process groups ``close`` kills."""
        self.poll()
        return {self.pid, *self._seen}

    def close(self) -> None:
        """Kill the process, its group and every descendant's group, by pid; then reap it.

        Only groups are signalled for pids merely seen (or named in a file): a
        pid that died and was reused by a stranger is not a group leader of ours.
        """
        live = {self.pid, *(p.pid for p in descendants(self.pid))}
        for pid in sorted(self.pids_to_kill() | live):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        for pid in sorted(live):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        self._log.close()


@contextlib.contextmanager
def run_process(argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> Iterator[Process]:
    """Run a process for the duration of the block; it and its descendants die at the end."""
    process = Process(argv, env, log_path)
    try:
        yield process
    finally:
        process.close()


@dataclass(frozen=True)
class Launch:
    """A process to run to completion in ``run_all``."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path


def run_all(
    launches: Sequence[Launch], *, parallel: int = 2, timeout: float = 240.0
) -> dict[str, tuple[int, str]]:
    """Run every launch, ``parallel`` at a time; return (exit status, log tail) by name.

    Every process started here is dead and reaped when this returns or raises.
    """
    pending = list(launches)
    running: dict[str, Process] = {}
    results: dict[str, tuple[int, str]] = {}
    deadline = time.monotonic() + timeout
    try:
        while pending or running:
            while pending and len(running) < parallel:
                launch = pending.pop(0)
                running[launch.name] = Process(launch.argv, launch.env, launch.log_path)
            for name, process in list(running.items()):
                code = process.poll()
                if code is not None:
                    results[name] = (code, process.log())
                    process.close()
                    del running[name]
            if time.monotonic() > deadline:
                raise AssertionError(f"still running after {timeout}s: {sorted(running)}")
            time.sleep(0.05)
    finally:
        for process in running.values():
            process.close()
    return results
