"""The restart budget: a child that keeps crashing is restarted max_restarts times, then 76.

The child is a ``command:`` job, a few lines of Python that crash with a
different exit status on each attempt (its attempt number), so every restart is
real (a process started, reaped and classified) yet costs milliseconds, and no
other rule (no progress, a deterministic start-up error) can end the run first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.support.jobs import Job, write_yaml
from tests.support.outputs import events
from tests.support.supervised import run_supervised
from trainer_child.protocol import EXIT_GAVE_UP, RunStateFile, read_model

pytestmark = pytest.mark.slow

CRASHER = "import os, sys; sys.exit(int(os.environ['TRAINWARDEN_ATTEMPT']))"
MAX_RESTARTS = 2


def test_a_spent_restart_budget_gives_up_with_76(tmp_path: Path, env: dict[str, str]) -> None:
    """max_restarts restarts within the window, then exit 76 naming the budget and the crash."""
    out = tmp_path / "out"
    document = {
        "output_dir": str(out),
        "command": [sys.executable, "-c", CRASHER],
        "restart": {
            "max_restarts": MAX_RESTARTS,
            "window": "1h",
            "backoff_initial": "0.1s",
            "backoff_max": "0.2s",
            "no_progress_limit": 10,
        },
    }
    job = Job(write_yaml(tmp_path / "job.yaml", document), out)
    code, log = run_supervised(job, env, timeout=120)
    assert code == EXIT_GAVE_UP, log
    journal = events(job.layout)
    failures = [e for e in journal if e["event"] == "failure"]
    assert [e["returncode"] for e in failures] == [1, 2, 3]
    assert {e["kind"] for e in failures} == {"crash"}
    assert len([e for e in journal if e["event"] == "launch"]) == MAX_RESTARTS + 1
    (gave_up,) = [e for e in journal if e["event"] == "gave_up"]
    assert gave_up["kind"] == "crash"
    assert gave_up["exit_code"] == EXIT_GAVE_UP
    assert gave_up["reason"].startswith(f"restart budget spent: {MAX_RESTARTS} restarts")
    assert "restart budget spent" in log  # said on stderr too
    state = read_model(job.layout.state, RunStateFile)
    assert state is not None
    assert state.gave_up == gave_up["reason"]
