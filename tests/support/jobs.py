"""Jobs to run: the offline environment, the child's job file, the supervisor's YAML."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.processes import REPO_ROOT, run_process
from trainer_child.protocol import JobFile, Layout

__all__ = [
    "FAST_RESTART",
    "PYTHON",
    "STANDARD_SFT",
    "TINY_SFT",
    "Job",
    "child_env",
    "run_to_end",
    "supervisor_argv",
    "trainer_child_argv",
    "write_config",
    "write_job",
    "write_tiny_job",
    "write_yaml",
]

PYTHON = sys.executable

#: The child's own tests: small enough for seconds on 2 cores, long enough for
#: periodic and emergency saves.
TINY_SFT: dict[str, Any] = {
    "max_steps": 10,
    "save_steps": 3,
    "per_device_train_batch_size": 4,
    "learning_rate": 5e-3,
    "max_length": 64,
    "seed": 0,
    "logging_steps": 5,
}
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
    # A standby doubles every run's start-up work on 2 cores; its own tests turn it on.
    "standby": "off",
}


def child_env(cache_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """An offline, single-threaded environment that builds the built-in model under cache_home.

    One thread per child: the same float reductions in every run (bit-identical
    comparisons depend on it), and two children share 2 cores without
    oversubscription. A stray ``TRAINWARDEN_*`` (a failpoint) must not leak in.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINWARDEN_")}
    env.update(
        {
            "XDG_CACHE_HOME": str(cache_home),
            "HF_HOME": str(cache_home / "hf"),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(REPO_ROOT),
        }
    )
    env.update(extra or {})
    return env


def write_job(path: Path, output_dir: Path, sft: Mapping[str, Any]) -> Path:
    """Write a ``protocol.JobFile`` of the built-in job for ``python -m trainer_child --job``."""
    job = JobFile.model_validate({"output_dir": str(output_dir), "train": {"sft": dict(sft)}})
    path.write_text(job.model_dump_json(indent=1))
    return path


def write_tiny_job(path: Path, output_dir: Path, **sft: Any) -> Path:
    """Write the child tests' job: ``TINY_SFT`` updated by ``sft``."""
    return write_job(path, output_dir, {**TINY_SFT, **sft})


def write_yaml(path: Path, document: Mapping[str, Any]) -> Path:
    """Write a trainwarden job file (YAML)."""
    path.write_text(yaml.safe_dump(dict(document), sort_keys=False))
    return path


@dataclass(frozen=True)
class Job:
    """A supervisor job file on disk and the output_dir it names."""

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
    """Write a job file for the standard job; ``sections`` add or replace top-level keys."""
    out = output_dir or directory / "out"
    document: dict[str, Any] = {
        "output_dir": str(out),
        "train": {"sft": {**STANDARD_SFT, **(sft or {})}},
        "restart": dict(FAST_RESTART),
    }
    document.update(sections)
    return Job(path=write_yaml(directory / name, document), output_dir=out)


def trainer_child_argv(job: Path, resume_from: Path | None = None) -> list[str]:
    """``python -m trainer_child --job JOB [--resume-from DIR]``."""
    argv = [PYTHON, "-m", "trainer_child", "--job", str(job)]
    if resume_from is not None:
        argv += ["--resume-from", str(resume_from)]
    return argv


def supervisor_argv(config: Path) -> list[str]:
    """``python -m supervisor run CONFIG --log-format json``."""
    return [PYTHON, "-m", "supervisor", "run", str(config), "--log-format", "json"]


def run_to_end(
    job: Path,
    env: Mapping[str, str],
    log_path: Path,
    *,
    resume_from: Path | None = None,
    timeout: float = 120.0,
) -> tuple[int, str]:
    """Run ``python -m trainer_child`` to completion; return its exit status and log tail."""
    with run_process(trainer_child_argv(job, resume_from), env, log_path) as child:
        code = child.wait(timeout)
        return code, child.log()
