"""Configuration and data errors: exit 78 at once, the bad field named, no restart loop."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.jobs import STANDARD_SFT, write_config
from tests.support.outputs import events
from tests.support.processes import REPO_ROOT
from tests.support.supervised import supervisor_process

pytestmark = pytest.mark.slow

EXIT_CONFIG = 78


def test_invalid_job_file_exits_78_before_anything_starts(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """Unknown keys and a wrong type: exit 78 naming each field path; no attempt, no output_dir."""
    job = write_config(
        tmp_path,
        restart={"max_restarts": "plenty", "backoff_intial": "1s"},
        retension={"keep_last": 2},
    )
    result = subprocess.run(
        [sys.executable, "-m", "supervisor", "run", str(job.path)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == EXIT_CONFIG, result.stderr
    stderr = _squeezed(result.stderr)
    for problem in (
        "retension: unknown key",
        "restart.backoff_intial: unknown key",
        "restart.max_restarts: Input should be a valid integer",
    ):
        assert _squeezed(problem) in stderr, result.stderr
    assert not job.output_dir.exists()


def _squeezed(text: str) -> str:
    """``text`` without whitespace: the console wraps and folds long lines."""
    return "".join(text.split())


def test_child_side_config_and_data_errors_exit_78_after_one_attempt(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """An unknown sft field and a missing dataset: exit 78 after one attempt, each named."""
    missing = tmp_path / "no-such-data.jsonl"
    cases = {
        "unknown_field": (
            {"sft": {**STANDARD_SFT, "learning_rat": 1e-3}},
            "unknown train.sft field 'learning_rat' (did you mean learning_rate",
        ),
        "missing_dataset": (
            {"dataset": str(missing), "sft": STANDARD_SFT},
            f"train.dataset file {str(missing)!r} does not exist",
        ),
    }
    jobs = {
        name: write_config(tmp_path, train=train, name=f"{name}.yaml", output_dir=tmp_path / name)
        for name, (train, _) in cases.items()
    }
    # Both at once: each is one child that fails while loading, on its own core.
    with contextlib.ExitStack() as stack:
        procs = {
            name: stack.enter_context(supervisor_process(job, env)) for name, job in jobs.items()
        }
        results = {name: (proc.wait(180), proc.log()) for name, proc in procs.items()}

    for name, (_, expected) in cases.items():
        code, log = results[name]
        assert code == EXIT_CONFIG, log
        journal = events(jobs[name].layout)
        assert len([e for e in journal if e["event"] == "launch"]) == 1
        failures = [e for e in journal if e["event"] == "failure"]
        assert [(e["kind"], e["returncode"]) for e in failures] == [("config", EXIT_CONFIG)]
        assert journal[-1]["event"] == "gave_up"
        assert journal[-1]["exit_code"] == EXIT_CONFIG
        assert expected in journal[-1]["reason"]
        stderr = _squeezed(log)
        assert _squeezed("trainwarden gave up: configuration or data error") in stderr
        assert _squeezed(expected) in stderr, log
