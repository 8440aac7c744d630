"""What the child leaves behind for the morning after: the loss log and tracker run ids.

Light on purpose (standard library and ``protocol`` only): ``WardenCallback``
calls these from the Trainer's events, and nothing here may slow or stop
training. The loss log is appended without fsync (a line lost to a power cut
costs one point of a plot); a write that fails is reported once and skipped.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainer_child.protocol import (
    ENV_TRACKING_RUN_ID,
    Layout,
    MetricsLine,
    TrackingFile,
    atomic_write_model,
    read_model,
)

__all__ = ["LossLog", "adopt_tracking_run_name", "record_tracking_runs"]

log = logging.getLogger("trainer_child")

#: The MLFLOW_* variables a run id belongs to (see supervisor/shell/tracking.py).
_MLFLOW_IDENTITY = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class LossLog:
    """Append one ``MetricsLine`` per training log to ``.warden/metrics.jsonl``."""

    def __init__(self, output_dir: str | os.PathLike[str], *, attempt: int | None) -> None:
        self.path = Layout(output_dir).metrics
        self.attempt = attempt
        self._failing = False

    def append(self, step: int, logs: Mapping[str, Any], *, epoch: float | None = None) -> bool:
        """Write a line if ``logs`` is a training log (has a loss or learning rate)."""
        loss, lr = _number(logs.get("loss")), _number(logs.get("learning_rate"))
        if loss is None and lr is None:
            return False  # eval logs and the end-of-training summary
        line = MetricsLine(
            step=step,
            loss=loss,
            learning_rate=lr,
            epoch=_number(logs.get("epoch")) if epoch is None else epoch,
            attempt=self.attempt,
            wall_time=time.time(),
        )
        data = (line.model_dump_json(exclude_none=True) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, data)  # one write of one line: O_APPEND keeps lines whole
            finally:
                os.close(fd)
        except OSError as exc:
            if not self._failing:
                log.warning("loss_log_failed path=%s error=%s", self.path, exc)
            self._failing = True
            return False
        self._failing = False
        return True


def adopt_tracking_run_name(args: Any) -> str | None:
    """Give the Trainer a stable default ``run_name`` so trackio resumes one run by name.

    Only under trainwarden (``TRAINWARDEN_TRACKING_RUN_ID`` set) and only when the
    user gave no ``run_name``. Must run before the reporting callbacks set up
    (they read it at train begin).
    """
    run_id = os.environ.get(ENV_TRACKING_RUN_ID, "").strip()
    if not run_id or getattr(args, "run_name", None):
        return None
    name = f"{Path(args.output_dir or 'trainer_output').name}-{run_id}"
    args.run_name = name
    return name


def record_tracking_runs(output_dir: str | os.PathLike[str], *, attempt: int | None) -> None:
    """Note the MLflow run this process logs to, so later attempts can resume it.

    Called at train begin, after HF's ``MLflowCallback`` started its run; mlflow is
    only looked at if something already imported it.
    """
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return
    try:
        run = mlflow.active_run()
        if run is None:
            return
        run_id, experiment_id = str(run.info.run_id), str(run.info.experiment_id)
    except Exception as exc:  # telemetry must never stop training
        log.warning("tracking_lookup_failed error=%s", exc)
        return
    layout = Layout(output_dir)
    known = read_model(layout.tracking, TrackingFile)
    if known is not None and known.mlflow_run_id == run_id:
        return
    record = TrackingFile(
        mlflow_run_id=run_id,
        mlflow_experiment_id=experiment_id,
        mlflow_env={k: os.environ[k] for k in _MLFLOW_IDENTITY if os.environ.get(k)},
        attempt=attempt,
        wall_time=time.time(),
    )
    try:
        layout.warden.mkdir(parents=True, exist_ok=True)
        atomic_write_model(layout.tracking, record, durable=False)
    except OSError as exc:
        log.warning("tracking_record_failed path=%s error=%s", layout.tracking, exc)
        return
    log.info("tracking_recorded mlflow_run_id=%s", run_id)
