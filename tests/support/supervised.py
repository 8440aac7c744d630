"""A real ``trainwarden run`` for end-to-end tests: started, poked with signals, always killed.

A test writes a job file (``jobs.write_config``), starts the supervisor through
``supervisor_process`` (which kills the supervisor's and the child's process
groups and reaps them on the way out), sends real signals, and compares the
final adapter with an uninterrupted run's, tensor by tensor.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from tests.support.jobs import Job, supervisor_argv
from tests.support.outputs import heartbeat
from tests.support.processes import REPO_ROOT, Process
from trainer_child.protocol import RunStateFile, read_model

__all__ = ["SupervisorProcess", "run_supervised", "status_json", "supervisor_process"]


class SupervisorProcess(Process):
    """A ``python -m supervisor run`` process in its own session, with its output captured."""

    what = "supervisor"
    default_timeout = 240.0
    log_tail = 8000

    def __init__(
        self,
        job: Job,
        env: Mapping[str, str],
        log_path: Path,
        *,
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        """``wrap`` turns the supervisor's argv into the one to run (unshare, a cgroup shim)."""
        self.job = job
        argv = supervisor_argv(job.path)
        super().__init__(wrap(argv) if wrap is not None else argv, env, log_path, append=True)

    def child_pid(self) -> int | None:
        """The live training child's pid, from its heartbeat (None before it writes one)."""
        beat = heartbeat(self.job.layout)
        return beat.pid if beat is not None else None

    def pids_to_kill(self) -> set[int]:
        """Also the child named in state.json or the heartbeat: it may be in another namespace."""
        pids = super().pids_to_kill()
        state = read_model(self.job.layout.state, RunStateFile)
        if state is not None and state.child_pid:
            pids.add(state.child_pid)
        beat = heartbeat(self.job.layout)
        if beat is not None:
            pids.add(beat.pid)
        return pids


@contextlib.contextmanager
def supervisor_process(
    job: Job,
    env: Mapping[str, str],
    log_path: Path | None = None,
    *,
    wrap: Callable[[list[str]], list[str]] | None = None,
) -> Iterator[SupervisorProcess]:
    """Run a supervisor for the duration of the block; it and its child die at the end."""
    proc = SupervisorProcess(
        job, env, log_path or job.path.with_suffix(".supervisor.log"), wrap=wrap
    )
    try:
        yield proc
    finally:
        proc.close()


def run_supervised(job: Job, env: Mapping[str, str], timeout: float = 240.0) -> tuple[int, str]:
    """Run a supervisor to its end; return its exit status and log tail."""
    with supervisor_process(job, env) as proc:
        code = proc.wait(timeout)
        return code, proc.log()


def status_json(output_dir: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """``trainwarden status OUTPUT_DIR --json``, run as a user would run it."""
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "status", str(output_dir), "--json"],
        env=dict(env),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report: dict[str, Any] = json.loads(done.stdout)
    return report
