"""One experiment-tracker run across every attempt: the env each child gets.

Without this, each restart shows up as a new W&B/MLflow/trackio run (transformers
#25032, verl #2783). The run gets one id, made once and kept in ``state.json``
(``tracking_run_id``), and every attempt is pointed at it:

* **W&B**: ``WANDB_RUN_ID=<id>`` + ``WANDB_RESUME=allow``. ``wandb.init`` reads
  both; the first attempt creates the run, later ones resume it.
* **MLflow**: ``MLFLOW_RUN_ID`` must name a run that *exists* (mlflow's
  ``start_run`` calls ``get_run`` on it and fails otherwise), and MLflow makes its
  own ids. So the first attempt is left to create the run; the child's
  ``WardenCallback`` writes its id to ``.warden/tracking.json`` at train begin
  (HF's ``MLflowCallback`` runs first and has started it by then), and every
  later attempt gets ``MLFLOW_RUN_ID`` from there: but only under the same
  ``MLFLOW_TRACKING_URI`` / ``MLFLOW_EXPERIMENT_NAME`` / ``MLFLOW_EXPERIMENT_ID``
  it was created with, since anywhere else it names no run (or one in another
  experiment, which mlflow refuses) and the child would crash at start.
* **trackio** has no run-id variable: HF's ``TrackioCallback`` calls
  ``trackio.init(name=args.run_name, resume="allow")``, which resumes a run *by
  name*. So the child gets ``TRAINWARDEN_TRACKING_RUN_ID`` and ``WardenCallback``
  makes ``<output_dir name>-<id>`` the default ``run_name`` (a ``run_name`` the
  user set wins). W&B and MLflow then show that same name.

A variable the user set (in the supervisor's environment or the job's ``env:``)
is never replaced.

How the loop uses it::

    run_id = tracking_run_id(previous_state_file)       # at start; keep it
    ...RunStateFile(..., tracking_run_id=run_id)         # in every state.json write
    env = {**os.environ, **config.env}
    env.update(tracking_env(run_id, env, layout))       # in _env(), per launch
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from trainer_child.protocol import (
    ENV_TRACKING_RUN_ID,
    Layout,
    RunStateFile,
    TrackingFile,
    read_model,
)

__all__ = ["MLFLOW_IDENTITY", "new_tracking_run_id", "tracking_env", "tracking_run_id"]

#: The variables that decide which MLflow server and experiment a run id belongs to.
MLFLOW_IDENTITY = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")


def new_tracking_run_id() -> str:
    """Make a fresh run id: 16 lowercase hex characters, valid for W&B and as a name."""
    return secrets.token_hex(8)


def tracking_run_id(previous: RunStateFile | None) -> str:
    """Return the run's tracking id from state.json, or a new one for a new run."""
    if previous is not None and previous.tracking_run_id:
        return previous.tracking_run_id
    return new_tracking_run_id()


def tracking_env(run_id: str, env: Mapping[str, str], layout: Layout) -> dict[str, str]:
    """Return the variables to add to a child's ``env``; none that ``env`` already sets."""
    additions: dict[str, str] = {ENV_TRACKING_RUN_ID: run_id}
    offered = {"WANDB_RUN_ID": run_id, "WANDB_RESUME": "allow"}
    tracking = read_model(layout.tracking, TrackingFile)
    if tracking is not None and tracking.mlflow_run_id:
        same_place = all(
            env.get(name, "") == tracking.mlflow_env.get(name, "") for name in MLFLOW_IDENTITY
        )
        if same_place:
            offered["MLFLOW_RUN_ID"] = tracking.mlflow_run_id
    for name, value in offered.items():
        if not env.get(name):
            additions[name] = value
    return additions
