"""Two attempts, two processes, one W&B run (offline mode: nothing leaves the machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import wandb  # noqa: F401 - dev extra: the test runs wherever make test does

from supervisor.shell.tracking import tracking_env, tracking_run_id
from trainer_child.protocol import Layout, RunStateFile

ATTEMPT = """
import json, sys
import wandb
run = wandb.init(project="trainwarden-test", dir=sys.argv[1])
run.log({"loss": float(sys.argv[2])})
print(json.dumps({"id": run.id}))
run.finish()
"""


def run_attempt(root: Path, env: dict[str, str], loss: float) -> str:
    done = subprocess.run(
        [sys.executable, "-c", ATTEMPT, str(root / "tracker"), str(loss)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return str(json.loads(done.stdout.strip().splitlines()[-1])["id"])


@pytest.mark.slow
def test_two_attempts_log_into_one_wandb_run(tmp_path: Path) -> None:
    """Each attempt gets the env from state.json's run id and wandb resumes that run."""
    layout = Layout(tmp_path / "out")
    run_id = tracking_run_id(None)
    state = RunStateFile(tracking_run_id=run_id)  # what the supervisor persists
    base = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    base.update(
        HOME=str(tmp_path),
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_CONSOLE="off",
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
        WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
    )
    ids = []
    for attempt, loss in enumerate((2.5, 2.0), start=1):
        # A new supervisor (or the same one) reads the id back from state.json.
        env = {**base, **tracking_env(tracking_run_id(state), base, layout)}
        env["TRAINWARDEN_ATTEMPT"] = str(attempt)
        ids.append(run_attempt(tmp_path, env, loss))
    assert ids == [run_id, run_id]
    runs = sorted((tmp_path / "tracker" / "wandb").glob("offline-run-*"))
    assert runs, "no offline run directory"
    assert all(path.name.endswith(f"-{run_id}") for path in runs)
    assert all((path / f"run-{run_id}.wandb").is_file() for path in runs)
