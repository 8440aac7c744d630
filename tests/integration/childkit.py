"""Helpers to run ``python -m trainer_child`` as a real process and inspect what it wrote."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer_child.protocol import (
    COMMIT_RECORD,
    TRAINER_STATE,
    CommitRecord,
    ErrorReport,
    Heartbeat,
    JobFile,
    Layout,
    file_digest,
    read_model,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Small enough for seconds on 2 cores, long enough for periodic and emergency saves.
BASE_SFT: dict[str, Any] = {
    "max_steps": 10,
    "save_steps": 3,
    "per_device_train_batch_size": 4,
    "learning_rate": 5e-3,
    "max_length": 64,
    "seed": 0,
    "logging_steps": 5,
}


def child_env(cache_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return an offline environment that builds the built-in model under ``cache_home``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("TRAINWARDEN_")  # a stray failpoint must not leak in
    }
    env.update(
        {
            "XDG_CACHE_HOME": str(cache_home),
            "HF_HOME": str(cache_home / "hf"),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            # The same thread count in every run keeps float reductions identical,
            # and lets two children share the 2 cores without oversubscription.
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


def write_job(path: Path, output_dir: Path, **sft: Any) -> Path:
    """Write a JobFile for the built-in tiny job (``BASE_SFT`` updated by ``sft``)."""
    settings = {**BASE_SFT, **sft}
    job = JobFile.model_validate({"output_dir": str(output_dir), "train": {"sft": settings}})
    path.write_text(job.model_dump_json(indent=1))
    return path


class Child:
    """One training process, its log file, and a guaranteed kill when the test ends."""

    #: What the process is called in failure messages.
    what = "child"
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
        self.log_path = log_path
        self._log = open(log_path, "ab" if append else "wb")  # noqa: SIM115 - closed in close()
        # Its own session, so close() can also reach what it forked (the ENOSPC
        # test's shell runs the child as a grandchild).
        self.proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float | None = None) -> int:
        """Return the exit status (negative for a signal), failing loudly on timeout."""
        timeout = self.default_timeout if timeout is None else timeout
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.what} {self.pid} still running after {timeout}s\n{self.log()}"
            ) from None

    def signal(self, signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-self.log_tail :]

    def close(self) -> None:
        """Kill the process (and its process group, by the PID it leads) and reap it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()


@contextlib.contextmanager
def run_child(argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> Iterator[Child]:
    """Start a process and make sure it is dead and reaped when the block exits."""
    child = Child(argv, env, log_path)
    try:
        yield child
    finally:
        child.close()


def trainer_child_argv(job: Path, resume_from: Path | None = None) -> list[str]:
    argv = [sys.executable, "-m", "trainer_child", "--job", str(job)]
    if resume_from is not None:
        argv += ["--resume-from", str(resume_from)]
    return argv


def run_to_end(
    job: Path,
    env: Mapping[str, str],
    log_path: Path,
    *,
    resume_from: Path | None = None,
    timeout: float = 120.0,
) -> tuple[int, str]:
    """Run the child to completion; return its exit status and log tail."""
    with run_child(trainer_child_argv(job, resume_from), env, log_path) as child:
        code = child.wait(timeout)
        return code, child.log()


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
    running: dict[str, Child] = {}
    results: dict[str, tuple[int, str]] = {}
    deadline = time.monotonic() + timeout
    try:
        while pending or running:
            while pending and len(running) < parallel:
                launch = pending.pop(0)
                running[launch.name] = Child(launch.argv, launch.env, launch.log_path)
            for name, child in list(running.items()):
                code = child.proc.poll()
                if code is not None:
                    results[name] = (code, child.log())
                    child.close()
                    del running[name]
            if time.monotonic() > deadline:
                raise AssertionError(f"still running after {timeout}s: {sorted(running)}")
            time.sleep(0.05)
    finally:
        for child in running.values():
            child.close()
    return results


def wait_for(
    condition: Callable[[], bool], *, timeout: float, interval: float = 0.02, what: str = ""
) -> None:
    """Poll ``condition`` until true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


def heartbeat(output_dir: Path) -> Heartbeat | None:
    return read_model(Layout(output_dir).heartbeat, Heartbeat)


def error_report(output_dir: Path) -> ErrorReport | None:
    return read_model(Layout(output_dir).error, ErrorReport)


def checkpoint_steps(output_dir: Path) -> list[int]:
    """Return the N of every ``checkpoint-N`` folder, ascending."""
    return sorted(
        int(path.name.split("-", 1)[1])
        for path in output_dir.glob("checkpoint-*")
        if path.name.split("-", 1)[1].isdigit()
    )


def verify_commit(folder: Path, *, expect_step: int | None = None) -> CommitRecord:
    """Check ``warden.json`` against the folder: every file, size and hash, and nothing unlisted."""
    record = read_model(folder / COMMIT_RECORD, CommitRecord)
    assert record is not None, f"{folder} has no readable {COMMIT_RECORD}"
    if expect_step is not None:
        assert record.step == expect_step
    on_disk = {
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and path.name != COMMIT_RECORD
    }
    assert on_disk == {entry.path for entry in record.files}, f"{folder}: listed != present"
    for entry in record.files:
        path = folder / entry.path
        assert path.stat().st_size == entry.size, f"{path}: size differs from the record"
        assert file_digest(path, record.hash_algorithm) == entry.hash, f"{path}: hash differs"
    if (folder / TRAINER_STATE).exists():
        state = json.loads((folder / TRAINER_STATE).read_text())
        assert state["global_step"] == record.step
    assert {"torch", "transformers", "peft"} <= set(record.versions)
    return record


def adapter_tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return dict(load_file(str(folder / "adapter_model.safetensors")))


def assert_adapters_equal(left: Path, right: Path) -> int:
    """Assert the two adapters hold torch.equal tensors, name by name; return the count."""
    import torch

    a, b = adapter_tensors(left), adapter_tensors(right)
    assert sorted(a) == sorted(b), "adapters hold different tensor names"
    unequal = [name for name in a if not torch.equal(a[name], b[name])]
    assert not unequal, f"tensors differ from the uninterrupted run: {unequal}"
    return len(a)
