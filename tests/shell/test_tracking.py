"""One tracker run across attempts: the run id, the env each child gets, the user's win."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from supervisor.shell.tracking import tracking_env, tracking_run_id
from trainer_child.observe import LossLog, adopt_tracking_run_name, record_tracking_runs
from trainer_child.protocol import (
    ENV_TRACKING_RUN_ID,
    Layout,
    MetricsLine,
    RunStateFile,
    TrackingFile,
    read_model,
)


def test_the_run_id_is_made_once_and_kept() -> None:
    """A new run gets a fresh id; a state.json that has one keeps it."""
    first = tracking_run_id(None)
    assert len(first) == 16
    assert first != tracking_run_id(None)
    assert tracking_run_id(RunStateFile(tracking_run_id=first)) == first
    assert tracking_run_id(RunStateFile()) != first


def test_wandb_and_trackio_variables_are_offered(tmp_path: Path) -> None:
    """Every attempt gets the W&B id with resume=allow, and our own id for trackio."""
    env = tracking_env("0123456789abcdef", {}, Layout(tmp_path))
    assert env == {
        ENV_TRACKING_RUN_ID: "0123456789abcdef",
        "WANDB_RUN_ID": "0123456789abcdef",
        "WANDB_RESUME": "allow",
    }


def test_the_users_settings_win(tmp_path: Path) -> None:
    """A variable the user set is never replaced (an empty one counts as unset)."""
    user = {"WANDB_RUN_ID": "mine", "WANDB_RESUME": "", "PATH": "/bin"}
    env = tracking_env("0123456789abcdef", user, Layout(tmp_path))
    assert "WANDB_RUN_ID" not in env
    assert env["WANDB_RESUME"] == "allow"


def test_mlflow_run_id_comes_from_the_first_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run MLflow made in attempt 1 is handed to later attempts, at the same server only."""
    layout = Layout(tmp_path)
    assert "MLFLOW_RUN_ID" not in tracking_env("id", {}, layout)  # attempt 1: MLflow creates it

    run = types.SimpleNamespace(info=types.SimpleNamespace(run_id="f" * 32, experiment_id="7"))
    fake = types.ModuleType("mlflow")
    fake.active_run = lambda: run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/mlruns")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    record_tracking_runs(tmp_path, attempt=1)
    record = read_model(layout.tracking, TrackingFile)
    assert record is not None
    assert record.mlflow_run_id == "f" * 32
    assert record.mlflow_env == {"MLFLOW_TRACKING_URI": "file:///tmp/mlruns"}

    same = {"MLFLOW_TRACKING_URI": "file:///tmp/mlruns"}
    assert tracking_env("id", same, layout)["MLFLOW_RUN_ID"] == "f" * 32
    # Another server or experiment: that id names no run there, so MLflow makes one.
    assert "MLFLOW_RUN_ID" not in tracking_env("id", {}, layout)
    other = {**same, "MLFLOW_EXPERIMENT_NAME": "other"}
    assert "MLFLOW_RUN_ID" not in tracking_env("id", other, layout)
    assert "MLFLOW_RUN_ID" not in tracking_env("id", {**same, "MLFLOW_RUN_ID": "x"}, layout)


def test_no_mlflow_imported_means_nothing_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without mlflow in the process the child writes no tracking file."""
    monkeypatch.delitem(sys.modules, "mlflow", raising=False)
    record_tracking_runs(tmp_path, attempt=1)
    assert not Layout(tmp_path).tracking.exists()


def test_trackio_gets_a_stable_default_run_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under trainwarden an unnamed run is named after the output dir and the run id."""
    args = types.SimpleNamespace(output_dir="/runs/llama-sft", run_name=None)
    monkeypatch.delenv(ENV_TRACKING_RUN_ID, raising=False)
    assert adopt_tracking_run_name(args) is None
    monkeypatch.setenv(ENV_TRACKING_RUN_ID, "0123456789abcdef")
    assert adopt_tracking_run_name(args) == "llama-sft-0123456789abcdef"
    assert args.run_name == "llama-sft-0123456789abcdef"
    named = types.SimpleNamespace(output_dir="/runs/x", run_name="my-run")
    assert adopt_tracking_run_name(named) is None
    assert named.run_name == "my-run"


def test_loss_log_appends_training_logs_only(tmp_path: Path) -> None:
    """Training logs become lines; eval logs and the final summary do not."""
    loss_log = LossLog(tmp_path, attempt=2)
    assert loss_log.append(5, {"loss": 2.5, "learning_rate": 1e-4, "grad_norm": 0.3}, epoch=0.1)
    assert not loss_log.append(5, {"eval_loss": 2.4})
    assert not loss_log.append(10, {"train_runtime": 12.0, "train_loss": 2.2})
    assert loss_log.append(10, {"loss": 2.25, "learning_rate": 5e-5, "epoch": 0.2})
    lines = [
        MetricsLine.model_validate_json(raw)
        for raw in Layout(tmp_path).metrics.read_text().splitlines()
    ]
    assert [(m.step, m.loss, m.attempt) for m in lines] == [(5, 2.5, 2), (10, 2.25, 2)]
    assert lines[1].epoch == 0.2
    assert all(m.wall_time > 0 for m in lines)


def test_loss_log_never_raises(tmp_path: Path) -> None:
    """A loss log that cannot be written is skipped: it must not stop training."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    loss_log = LossLog(blocker, attempt=1)  # .warden/ would have to live inside a file
    assert not loss_log.append(1, {"loss": 1.0})
    assert not loss_log.append(2, {"loss": 1.0})
