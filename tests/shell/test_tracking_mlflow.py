"""Two attempts, one MLflow run: the first creates it, the second resumes it by id.

Runs HF's own ``MLflowCallback`` (what ``report_to=["mlflow"]`` adds) against a
local file store. mlflow is not a dev dependency (its client pulls in a large
tree), so this test runs where someone installed ``mlflow-skinny``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow  # noqa: F401 - dev extra: the test runs wherever make test does
import pytest

from supervisor.shell.tracking import tracking_env
from tests.support.processes import REPO_ROOT
from trainer_child.protocol import Layout

ATTEMPT = """
import json, sys
import mlflow
from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import MLflowCallback
from trainer_child.observe import record_tracking_runs

out, attempt = sys.argv[1], int(sys.argv[2])
args = TrainingArguments(output_dir=out, report_to=[], run_name="sft-0123456789abcdef")
state, control = TrainerState(), TrainerControl()
callback = MLflowCallback()
callback.on_train_begin(args, state, control, model=None)  # HF's callback starts the run
record_tracking_runs(out, attempt=attempt)                   # what WardenCallback does next
state.global_step = 10 * attempt
callback.on_log(args, state, control, logs={"loss": 1.0 / attempt})
print(json.dumps({"run_id": mlflow.active_run().info.run_id}))
mlflow.end_run()
"""


@pytest.mark.slow
def test_two_attempts_log_into_one_mlflow_run(tmp_path: Path) -> None:
    """Attempt 2 gets MLFLOW_RUN_ID from the run attempt 1 created; both losses land in it."""
    layout = Layout(tmp_path / "out")
    store = tmp_path / "mlruns"
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    base.update(
        MLFLOW_TRACKING_URI=store.as_uri(),
        MLFLOW_ALLOW_FILE_STORE="true",
        PYTHONPATH=str(REPO_ROOT),
        HF_HUB_OFFLINE="1",
    )
    ids = []
    for attempt in (1, 2):
        added = tracking_env("0123456789abcdef", base, layout)
        assert ("MLFLOW_RUN_ID" in added) == (attempt > 1)
        done = subprocess.run(
            [sys.executable, "-c", ATTEMPT, str(layout.output_dir), str(attempt)],
            env={**base, **added},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        ids.append(json.loads(done.stdout.strip().splitlines()[-1])["run_id"])
    assert ids[0] == ids[1]
    runs = [p for p in store.glob("*/*") if p.is_dir() and (p / "meta.yaml").exists()]
    assert [p.name for p in runs] == [ids[0]]
    history = (runs[0] / "metrics" / "loss").read_text().split()
    assert history[1::3] == ["1.0", "0.5"]
    assert history[2::3] == ["10", "20"]
