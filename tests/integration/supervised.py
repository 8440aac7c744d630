"""Helpers for real-process tests of the whole supervisor (``trainwarden run``).

A test writes a job file with ``write_config``, starts ``python -m supervisor run``
through ``supervisor_process`` (which always kills the supervisor's and the
child's process groups and reaps them on the way out), pokes the processes with
real signals, and then compares the final adapter with an uninterrupted run's,
tensor by tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from tests.integration.childkit import Child, child_env
from trainer_child.protocol import Heartbeat, Layout, RunStateFile, read_model

#: The standard supervised job: 16 optimizer steps, a checkpoint every 4.
STANDARD_SFT: dict[str, Any] = {
    "max_steps": 16,
    "save_steps": 4,
    "per_device_train_batch_size": 2,
    "learning_rate": 5e-3,
    "max_length": 64,
    "seed": 0,
    "logging_steps": 4,
}
#: Fast restarts so tests spend their time training, not sleeping.
FAST_RESTART: dict[str, Any] = {
    "backoff_initial": "0.2s",
    "backoff_max": "1s",
    "max_restarts": 50,
    "no_progress_limit": 5,
}


@dataclass(frozen=True)
class Job:
    """A job file on disk and the output_dir it names."""

    path: Path
    output_dir: Path

    @property
    def layout(self) -> Layout:
        return Layout(self.output_dir)


def write_config(
    directory: Path,
    *,
    sft: Mapping[str, Any] | None = None,
    name: str = "job.yaml",
    output_dir: Path | None = None,
    **sections: Any,
) -> Job:
    """Write a job file for the built-in tiny job; ``sections`` add or replace top-level keys."""
    out = output_dir or directory / "out"
    document: dict[str, Any] = {
        "output_dir": str(out),
        "train": {"sft": {**STANDARD_SFT, **(sft or {})}},
        "restart": dict(FAST_RESTART),
    }
    document.update(sections)
    path = directory / name
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return Job(path=path, output_dir=out)


class SupervisorProcess(Child):
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
        argv = [sys.executable, "-m", "supervisor", "run", str(job.path), "--log-format", "json"]
        super().__init__(wrap(argv) if wrap is not None else argv, env, log_path, append=True)

    def child_pid(self) -> int | None:
        """The live training child's pid, from its heartbeat (None before it writes one)."""
        beat = read_model(self.job.layout.heartbeat, Heartbeat)
        return beat.pid if beat is not None else None

    def close(self) -> None:
        """Kill the supervisor's group and any child it started (by PID), then reap."""
        pids = {self.pid}
        # Descendants too: a child in another mount namespace (or one that has not
        # written state.json yet) is found from the process tree, not from files.
        with contextlib.suppress(psutil.Error):
            pids.update(p.pid for p in psutil.Process(self.pid).children(recursive=True))
        state = read_model(self.job.layout.state, RunStateFile)
        if state is not None and state.child_pid:
            pids.add(state.child_pid)
        beat = read_model(self.job.layout.heartbeat, Heartbeat)
        if beat is not None:
            pids.add(beat.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        self._log.close()


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


def events(layout: Layout) -> list[dict[str, Any]]:
    """Every line of events.jsonl, parsed."""
    try:
        lines = layout.events.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.02) -> Any:
    """Poll until ``predicate()`` is truthy; return its value or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def heartbeat(layout: Layout) -> Heartbeat | None:
    return read_model(layout.heartbeat, Heartbeat)


def adapter_tensors(directory: Path) -> dict[str, Any]:
    """Load ``adapter_model.safetensors`` of a final/ or checkpoint folder."""
    from safetensors.torch import load_file

    return dict(load_file(str(directory / "adapter_model.safetensors")))


def assert_bit_identical(final_dir: Path, reference_dir: Path) -> None:
    """Every adapter tensor is torch.equal to the reference run's."""
    import torch

    got, want = adapter_tensors(final_dir), adapter_tensors(reference_dir)
    assert sorted(got) == sorted(want)
    different = [name for name in want if not torch.equal(got[name], want[name])]
    assert not different, f"tensors differ from the uninterrupted run: {different}"


def max_abs_diff(final_dir: Path, reference_dir: Path) -> float:
    """The largest absolute difference over all adapter tensors."""
    got, want = adapter_tensors(final_dir), adapter_tensors(reference_dir)
    assert sorted(got) == sorted(want)
    return max(float((got[n].float() - want[n].float()).abs().max()) for n in want)


__all__ = [
    "FAST_RESTART",
    "STANDARD_SFT",
    "Job",
    "SupervisorProcess",
    "adapter_tensors",
    "assert_bit_identical",
    "child_env",
    "events",
    "heartbeat",
    "max_abs_diff",
    "run_supervised",
    "supervisor_process",
    "wait_for",
    "write_config",
]
