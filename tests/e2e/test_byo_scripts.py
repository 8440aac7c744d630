"""The README's plain-Trainer recipe, with and without WardenCallback, and under accelerate.

``examples/plain_trainer.py`` is a transformers ``Trainer`` script as users write
them; it resumes from ``TRAINWARDEN_RESUME_FROM``. It runs here as a ``command:``
job directly and under ``accelerate launch`` (one process), whose launcher dies
at once on SIGTERM while its worker is still saving.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import psutil
import pytest

from tests.e2e.byo import (
    global_step,
    plain_trainer_argv,
    run_unsupervised,
    write_command_config,
)
from tests.support.outputs import assert_bit_identical, checkpoint_steps, events, heartbeat
from tests.support.processes import wait_for
from tests.support.supervised import run_supervised, status_json, supervisor_process
from trainer_child.protocol import COMMIT_RECORD, Phase

pytestmark = pytest.mark.slow

MAX_STEPS = 60
SAVE_STEPS = 10
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu"]


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: Path,
    jsonl_data: Path,
    env: dict[str, str],
) -> Path:
    """The output_dir of the script run once, unsupervised and uninterrupted."""
    root = tmp_path_factory.mktemp("plain-reference")
    argv = plain_trainer_argv(
        tiny_model, jsonl_data, root / "out", max_steps=MAX_STEPS, save_steps=SAVE_STEPS
    )
    run_unsupervised([sys.executable, *argv], env, root / "plain.log")
    return root / "out"


@pytest.fixture
def inputs(tiny_model: Path, jsonl_data: Path) -> tuple[Path, Path]:
    """The local model folder and dataset the script trains on."""
    return tiny_model, jsonl_data


@pytest.fixture(params=[True, False], ids=["with-callback", "without"])
def warden_callback(request: pytest.FixtureRequest) -> bool:
    """Whether the script adds WardenCallback itself (and the hook is on), or neither."""
    return bool(request.param)


def test_plain_trainer_recipe_completes_in_one_attempt(
    tmp_path: Path,
    inputs: tuple[Path, Path],
    env: dict[str, str],
    reference: Path,
    warden_callback: bool,
) -> None:
    """With WardenCallback (and the hook on) or without either: one attempt, exit 0, complete."""
    out = tmp_path / "out"
    argv = plain_trainer_argv(
        *inputs,
        out,
        max_steps=MAX_STEPS,
        save_steps=SAVE_STEPS,
        warden_callback=warden_callback,
    )
    job = write_command_config(
        tmp_path,
        [sys.executable, *argv],
        out,
        inject_callback=warden_callback,
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )

    code, log = run_supervised(job, env)

    assert code == 0, log
    journal = events(job.layout)
    assert len([e for e in journal if e["event"] == "launch"]) == 1
    assert not [e for e in journal if e["event"] == "failure"]
    steps = checkpoint_steps(out)
    assert steps[-1] == MAX_STEPS
    assert global_step(out / f"checkpoint-{MAX_STEPS}") == MAX_STEPS
    records = [(out / f"checkpoint-{s}" / COMMIT_RECORD).exists() for s in steps]
    assert all(records) if warden_callback else not any(records)
    assert status_json(job.output_dir, env)["state"] == "completed"
    assert_bit_identical(out, reference)


def test_accelerate_launch_resumes_after_a_worker_sigkill_and_stops_cleanly_on_sigterm(
    tmp_path: Path, tiny_model: Path, jsonl_data: Path, env: dict[str, str], reference: Path
) -> None:
    """`accelerate launch` (one process): a killed worker resumes; SIGTERM waits for its save."""
    out = tmp_path / "out"
    argv = plain_trainer_argv(
        tiny_model, jsonl_data, out, max_steps=MAX_STEPS, save_steps=SAVE_STEPS
    )
    job = write_command_config(tmp_path, [*ACCELERATE, *argv], out)

    def worker(attempt: int) -> int | None:
        beat = heartbeat(job.layout)
        if beat is None or beat.attempt != attempt or beat.phase is not Phase.TRAIN:
            return None
        return beat.pid if beat.step > SAVE_STEPS else None

    with supervisor_process(job, env) as supervisor:
        # The heartbeat is written by the worker (the rank), not by the launcher.
        victim = wait_for(lambda: worker(1), 180)
        launcher = psutil.Process(victim).parent()
        assert launcher is not None
        assert "accelerate" in " ".join(launcher.cmdline())
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: worker(2), 180)
        supervisor.signal(signal.SIGTERM)
        code = supervisor.wait(180)
        log = supervisor.log()

    assert code == 0, log
    journal = events(job.layout)
    failure = next(e for e in journal if e["event"] == "failure")
    assert failure["kind"] == "crash"
    assert "SIGKILL" in failure["evidence"]
    stopped = next(e for e in journal if e["event"] == "preempted")
    newest = max(checkpoint_steps(out))
    assert stopped["checkpoint"] == newest
    assert (out / f"checkpoint-{newest}" / COMMIT_RECORD).exists()

    code, log = run_supervised(job, env)
    assert code == 0, log
    launches = [e for e in events(job.layout) if e["event"] == "launch"]
    assert launches[-1]["resume_step"] == newest
    assert global_step(out / f"checkpoint-{MAX_STEPS}") == MAX_STEPS
    assert_bit_identical(out, reference)
