"""Helpers for supervising users' own commands: TRL's ``sft`` CLI, a plain Trainer script.

The programs run exactly as installed; these helpers only build their command
lines, the job files that supervise them, and unsupervised reference runs to
compare the supervised result with, tensor by tensor.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support.jobs import FAST_RESTART, Job, write_yaml
from tests.support.processes import REPO_ROOT
from trainer_child.protocol import TRAINER_STATE

PLAIN_TRAINER = REPO_ROOT / "examples" / "plain_trainer.py"
RESUME_FLAG = ["--resume_from_checkpoint", "{resume_from}"]


def trl_sft_argv(
    model: Path, data: Path, output_dir: Path, *, max_steps: int, save_steps: int
) -> list[str]:
    """``python -m trl.scripts.sft`` (what ``trl sft`` runs) with a LoRA adapter, on the CPU."""
    return [
        sys.executable,
        "-m",
        "trl.scripts.sft",
        "--model_name_or_path",
        str(model),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(output_dir),
        "--max_steps",
        str(max_steps),
        "--save_steps",
        str(save_steps),
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "5e-3",
        "--max_length",
        "64",
        "--seed",
        "0",
        "--logging_steps",
        "5",
        "--use_peft",
        "--lora_r",
        "8",
        "--lora_alpha",
        "16",
        "--report_to",
        "none",
        "--bf16",
        "false",
    ]


def plain_trainer_argv(
    model: Path,
    data: Path,
    output_dir: Path,
    *,
    max_steps: int,
    save_steps: int,
    warden_callback: bool = False,
) -> list[str]:
    """The README's plain-Trainer recipe (``examples/plain_trainer.py``)."""
    argv = [
        str(PLAIN_TRAINER),
        "--model",
        str(model),
        "--data",
        str(data / "train.jsonl"),
        "--output_dir",
        str(output_dir),
        "--max_steps",
        str(max_steps),
        "--save_steps",
        str(save_steps),
    ]
    return [*argv, "--warden-callback"] if warden_callback else argv


def write_command_config(
    directory: Path,
    command: Sequence[str],
    output_dir: Path,
    *,
    name: str = "job.yaml",
    restart: Mapping[str, Any] | None = None,
    **sections: Any,
) -> Job:
    """Write a ``command:`` job file; ``sections`` add top-level keys (hang, env, batch...)."""
    document: dict[str, Any] = {
        "output_dir": str(output_dir),
        "command": list(command),
        "restart": {**FAST_RESTART, **(restart or {})},
        **sections,
    }
    return Job(path=write_yaml(directory / name, document), output_dir=output_dir)


def run_unsupervised(
    argv: Sequence[str], env: Mapping[str, str], log_path: Path, timeout: float = 300
) -> None:
    """Run a training command to its end with no supervisor and no fault (the ground truth)."""
    clean = {k: v for k, v in env.items() if not k.startswith("TRAINWARDEN_")}
    with log_path.open("wb") as log:
        done = subprocess.run(
            list(argv),
            env=clean,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    assert done.returncode == 0, log_path.read_text(errors="replace")[-4000:]


def global_step(checkpoint: Path) -> int:
    """``global_step`` of a checkpoint's trainer_state.json."""
    return int(json.loads((checkpoint / TRAINER_STATE).read_text())["global_step"])
