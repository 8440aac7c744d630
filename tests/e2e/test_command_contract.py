"""What the README promises a ``command:`` job, shown with small scripts as real processes.

Each script is a few lines of Python that behaves like a training command in
one respect (it resumes, runs out of CUDA memory, hangs while loading, fails
the same way every time) and writes down what it was given, so the test can
check what the supervisor passed on. They start in a fraction of a second, so
every promise is checked for real without a real training run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.byo import RESUME_FLAG, write_command_config
from tests.support.outputs import events
from tests.support.processes import REPO_ROOT, wait_for
from tests.support.supervised import run_supervised, status_json, supervisor_process
from trainer_child.protocol import RunStateFile, read_model

#: Shared by every script: note what this attempt was given, one JSON line each.
PROLOGUE = """
import json, os, sys, time
from pathlib import Path
SEEN = Path({seen!r})
attempt = int(os.environ["TRAINWARDEN_ATTEMPT"])
with SEEN.open("a") as f:
    f.write(json.dumps({{"attempt": attempt, "argv": sys.argv[1:],
        "resume": os.environ.get("TRAINWARDEN_RESUME_FROM"),
        "micro": os.environ.get("TRAINWARDEN_PER_DEVICE_TRAIN_BATCH_SIZE"),
        "accum": os.environ.get("TRAINWARDEN_GRADIENT_ACCUMULATION_STEPS")}}) + "\\n")
"""


def script(tmp_path: Path, body: str) -> tuple[list[str], Path]:
    """Write a script with the shared prologue; return its command and the file it notes into."""
    seen = tmp_path / "seen.jsonl"
    path = tmp_path / "train.py"
    path.write_text(PROLOGUE.format(seen=str(seen)) + textwrap.dedent(body))
    return [sys.executable, str(path)], seen


def seen(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_placeholder_is_dropped_on_a_fresh_start_and_filled_on_resume(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """`--flag {resume_from}`: absent at first, the checkpoint after; exit 0 is done."""
    command, seen_file = script(
        tmp_path,
        """
        if attempt == 1:
            sys.path.insert(0, {repo!r})
            from tests.support.checkpoints import make_checkpoint
            make_checkpoint(Path(os.environ["TRAINWARDEN_OUTPUT_DIR"]), 4, record=False)
            sys.exit(1)
        """.replace("{repo!r}", repr(str(REPO_ROOT))),
    )
    out = tmp_path / "out"
    job = write_command_config(tmp_path, [*command, "--epochs", "1", *RESUME_FLAG], out)

    code, log = run_supervised(job, env)

    assert code == 0, log
    first, second = seen(seen_file)
    assert first["argv"] == ["--epochs", "1"]
    assert first["resume"] == ""
    resume = str(out / "checkpoint-4")
    assert second["argv"] == ["--epochs", "1", "--resume_from_checkpoint", resume]
    assert second["resume"] == resume
    journal = events(job.layout)
    assert [e["event"] for e in journal if e["event"] in ("failure", "completed")] == [
        "failure",
        "completed",
    ]
    assert status_json(job.output_dir, env)["state"] == "completed"
    # Run again: the command already exited 0, so nothing is launched.
    code, log = run_supervised(job, env)
    assert code == 0, log
    assert len(seen(seen_file)) == 2
    assert events(job.layout)[-1]["event"] in ("already_complete", "supervisor_exit")
    assert any(e["event"] == "already_complete" for e in events(job.layout))


def test_cuda_oom_in_the_log_halves_the_batch_and_it_survives_a_supervisor_restart(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """A script that prints CUDA OOM gets half the micro-batch, still after a supervisor SIGKILL."""
    command, seen_file = script(
        tmp_path,
        """
        if attempt == 1:
            print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB", flush=True)
            sys.exit(1)
        if attempt == 2:
            time.sleep(600)  # the test kills the supervisor meanwhile
        """,
    )
    job = write_command_config(
        tmp_path,
        command,
        tmp_path / "out",
        batch={"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2},
        preemption={"grace": "5s"},
    )
    with supervisor_process(job, env) as first:
        wait_for(lambda: len(seen(seen_file)) >= 2 if seen_file.exists() else False, 120)
        first.signal(signal.SIGKILL)
        first.wait(30)
        # The orphaned attempt 2 still holds the lock; the next supervisor asks it to stop.
        code, log = run_supervised(job, env)

    assert code == 0, log
    attempts = seen(seen_file)
    assert [(a["micro"], a["accum"]) for a in attempts] == [(None, None), ("4", "4"), ("4", "4")]
    journal = events(job.layout)
    failure = next(e for e in journal if e["event"] == "failure")
    assert failure["kind"] == "cuda_oom"
    assert "CUDA out of memory" in failure["evidence"]
    remedy = next(e for e in journal if e["event"] == "remediation")
    assert remedy["per_device_train_batch_size"] == [8, 4]
    assert remedy["gradient_accumulation_steps"] == [2, 4]
    assert any(e["event"] == "orphan_found" for e in journal)
    state = read_model(job.layout.state, RunStateFile)
    assert state is not None
    assert state.overrides.per_device_train_batch_size == 4


def test_script_hanging_while_it_loads_is_caught_by_the_startup_timeout(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """No callback, so no heartbeat: a load that never ends is a hang after startup_timeout."""
    command, seen_file = script(
        tmp_path,
        """
        if attempt == 1:
            time.sleep(600)
        """,
    )
    job = write_command_config(
        tmp_path,
        command,
        tmp_path / "out",
        inject_callback=False,
        hang={"startup_timeout": "2s", "kill_grace": "2s"},
    )
    code, log = run_supervised(job, env)

    assert code == 0, log
    journal = events(job.layout)
    hang = next(e for e in journal if e["event"] == "hang_detected")
    assert hang["phase"] == "load"
    assert hang["heartbeat_age"] >= 2
    failure = next(e for e in journal if e["event"] == "failure")
    assert failure["kind"] == "hang"
    assert len(seen(seen_file)) == 2


def test_the_same_start_up_error_twice_gives_up_naming_it(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """A command that dies the same way before training, every time: 76 after two attempts."""
    message = "We couldn't connect to 'https://huggingface.co' to load the files"
    command, seen_file = script(tmp_path, f"raise OSError({message!r})\n")
    job = write_command_config(tmp_path, command, tmp_path / "out", inject_callback=False)

    code, log = run_supervised(job, env)

    assert code == 76, log
    assert len(seen(seen_file)) == 2
    status = status_json(job.output_dir, env)
    assert status["state"] == "gave up"
    assert f"OSError: {message}" in status["gave_up"]
    assert "before training began" in status["gave_up"]


def test_a_rejected_command_line_is_a_config_error_at_once(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """argparse's 'error:' (exit 2) is a configuration problem: 78 on the first attempt."""
    command, seen_file = script(
        tmp_path,
        """
        import argparse
        parser = argparse.ArgumentParser(prog="train.py")
        parser.add_argument("--max_steps", type=int)
        parser.parse_args()
        """,
    )
    job = write_command_config(tmp_path, [*command, "--max_steps", "ten"], tmp_path / "out")

    code, log = run_supervised(job, env)

    assert code == 78, log
    assert len(seen(seen_file)) == 1
    status = status_json(job.output_dir, env)
    assert "invalid int value: 'ten'" in status["gave_up"]


@pytest.mark.parametrize("inject", [True, False])
def test_the_hook_stays_out_of_the_way_of_a_script_that_never_imports_transformers(
    tmp_path: Path, env: dict[str, str], inject: bool
) -> None:
    """With or without the hook, a non-HF command's environment and exit status are its own."""
    command, _ = script(
        tmp_path,
        """
        import sysconfig
        print("PYTHONPATH", os.environ.get("PYTHONPATH", ""), flush=True)
        assert "transformers" not in sys.modules
        """,
    )
    job = write_command_config(
        tmp_path, command, tmp_path / "out", inject_callback=inject, env={"PYTHONPATH": "/mine"}
    )
    code, log = run_supervised(job, env)
    assert code == 0, log
    attempt_log = (job.layout.logs / "attempt-1.log").read_text()
    line = next(x for x in attempt_log.splitlines() if x.startswith("PYTHONPATH "))
    paths = line.split(" ", 1)[1].split(os.pathsep)
    assert paths[-1] == "/mine"
    assert (len(paths) == 2) is inject
