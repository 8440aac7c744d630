"""Bring-your-own ``command:`` jobs: completion, start-up failures, the max_steps guard."""

from __future__ import annotations

import dataclasses

import pytest

from supervisor.core.command import render_command
from supervisor.core.model import (
    CheckpointEntry,
    Exit,
    FailureKind,
    HeartbeatView,
    Integrity,
    Mode,
    PreviousRun,
    Record,
)
from supervisor.loop import injection_env
from supervisor.shell.evidence import last_error_line
from tests.unit.test_policy import CONFIG, Run, ckpt, inv, launches, of, records
from trainer_child.protocol import ENV_INJECT, SITE_DIR, Overrides, Phase

COMMAND = dataclasses.replace(
    CONFIG, require_record=False, success_needs_final=False, step_guard=True, no_progress_limit=5
)
UNGUARDED = dataclasses.replace(COMMAND, step_guard=False)


def previous(**kw: object) -> PreviousRun:
    fields: dict[str, object] = {
        "attempts": 1,
        "overrides": Overrides(),
        "failures": (),
        "restart_ages": (),
        "consecutive_failures": 0,
        "poisoned_steps": (),
        "gave_up": None,
    }
    fields.update(kw)
    return PreviousRun(**fields)  # type: ignore[arg-type]


def mode(run: Run) -> Mode:
    """The run's mode, read afresh (mypy would narrow ``run.state.mode`` across calls)."""
    return run.state.mode


def at_end(step: int, max_steps: int, *, record: bool) -> CheckpointEntry:
    return CheckpointEntry(
        step=step,
        integrity=Integrity.COMPLETE,
        size_bytes=100,
        has_record=record,
        max_steps=max_steps,
    )


# --- the command line ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "fresh"),
    [
        (
            ["trl", "sft", "--resume_from_checkpoint", "{resume_from}", "--x", "1"],
            ["trl", "sft", "--x", "1"],
        ),
        (["train.py", "--resume_from_checkpoint={resume_from}", "-v"], ["train.py", "-v"]),
        (["train.py", "{resume_from}"], ["train.py"]),
        (["bash", "-c", "run.sh {resume_from}"], ["bash", "-c", "run.sh "]),
        (["train.py", "--epochs", "2"], ["train.py", "--epochs", "2"]),
    ],
)
def test_fresh_start_drops_the_placeholder_with_its_flag(
    template: list[str], fresh: list[str]
) -> None:
    """On a fresh start no empty path reaches the script: the flag goes with its placeholder."""
    assert render_command(template, None) == fresh
    assert render_command(template, "") == fresh


def test_resume_substitutes_every_placeholder() -> None:
    """When resuming, every {resume_from} becomes the checkpoint path."""
    template = ["t.py", "--resume_from_checkpoint", "{resume_from}", "--log={resume_from}/x"]
    assert render_command(template, "/o/checkpoint-8") == [
        "t.py",
        "--resume_from_checkpoint",
        "/o/checkpoint-8",
        "--log=/o/checkpoint-8/x",
    ]


def test_injection_puts_only_the_hook_folder_first_on_pythonpath() -> None:
    """The user's PYTHONPATH stays, after the hook's folder, which is never listed twice."""
    env = injection_env({"PYTHONPATH": f"/mine:{SITE_DIR}"})
    assert env == {"PYTHONPATH": f"{SITE_DIR}:/mine", ENV_INJECT: "1"}
    assert injection_env({})["PYTHONPATH"] == str(SITE_DIR)


# --- the error's last line ------------------------------------------------------------------

TRACEBACK = """step 3 loss 2.1
Traceback (most recent call last):
  File "train.py", line 3, in <module>
    main()
ValueError: first

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "train.py", line 9, in <module>
    load(path)
OSError: Repo id must be in the form 'repo_name' or 'namespace/repo_name': '/nope'.
Use `repo_type` argument if needed.
"""


def test_last_error_line_is_the_final_exception_line() -> None:
    """The last traceback's exception line names the error, not its continuation lines."""
    assert last_error_line(TRACEBACK) == (
        "OSError: Repo id must be in the form 'repo_name' or 'namespace/repo_name': '/nope'."
    )


def test_last_error_line_reads_argparse_and_ignores_plain_output() -> None:
    """argparse's 'prog: error:' line counts; a log with no error has no error line."""
    usage = "usage: sft.py [-h]\nsft.py: error: argument --max_steps: invalid int value: 'x'\n"
    assert last_error_line(usage) == "sft.py: error: argument --max_steps: invalid int value: 'x'"
    assert last_error_line("step 1\nstep 2\n 50%|#####     | 5/10\n") is None


# --- completion -----------------------------------------------------------------------------


def test_command_exit_zero_completes_without_final() -> None:
    """A command: job that exits 0 is done: recorded, exit 0, no restart."""
    run = Run(COMMAND)
    run.start()
    actions = run.exit(0, inventory=inv(ckpt(4)))
    assert mode(run) is Mode.COMPLETED
    assert of(actions, Exit)[0].code == 0
    assert "completed" in records(actions)
    assert not launches(actions)


def test_completed_command_job_is_not_run_again() -> None:
    """A second `trainwarden run` of a command that exited 0 exits 0 at once."""
    run = Run(COMMAND)
    actions = run.start(inv(ckpt(4)), previous=previous(completed=True))
    assert not launches(actions)
    assert mode(run) is Mode.COMPLETED
    assert of(actions, Exit)[0].code == 0


def test_builtin_job_needs_final_even_if_state_says_completed() -> None:
    """For the built-in job only final/ proves completion; state.json alone does not."""
    run = Run()
    actions = run.start(inv(ckpt(4)), previous=previous(completed=True))
    assert launches(actions)[0].resume_from == 4


def test_valid_final_is_success_even_when_the_exit_was_stopped_as_a_hang() -> None:
    """A child that wrote final/ and then hung on its way out finished the run."""
    run = Run()
    run.start()
    run.tick(advance=61, heartbeat=HeartbeatView(16, 16, Phase.DONE, age=61))
    assert mode(run) is Mode.STOPPING
    actions = run.exit(None, sig=15, inventory=inv(ckpt(16), final=True))
    assert mode(run) is Mode.COMPLETED
    assert of(actions, Exit)[0].code == 0


# --- deterministic start-up failures ----------------------------------------------------------

LINE = "OSError: We couldn't connect to 'https://huggingface.co' to load the files"


def test_same_error_twice_before_training_gives_up_naming_it() -> None:
    """Two attempts that die with the same line before training began: give up (76)."""
    run = Run(COMMAND)
    run.start()
    run.exit(1, error_line=LINE)
    assert mode(run) is Mode.BACKOFF
    run.after_backoff()
    actions = run.exit(1, error_line=LINE)
    assert mode(run) is Mode.GAVE_UP
    exit_ = of(actions, Exit)[0]
    assert exit_.code == 76
    assert LINE in exit_.reason
    assert "before training began" in exit_.reason


def test_different_errors_or_errors_after_training_began_keep_restarting() -> None:
    """Another line, or a failure after the first step, is not deterministic."""
    run = Run(COMMAND)
    run.start()
    run.exit(1, error_line=LINE)
    run.after_backoff()
    run.exit(1, error_line="RuntimeError: NCCL timeout")
    assert mode(run) is Mode.BACKOFF
    run.after_backoff()
    run.tick(heartbeat=HeartbeatView(3, 16, Phase.TRAIN, age=0.1))
    run.exit(1, error_line="RuntimeError: NCCL timeout")
    assert mode(run) is Mode.BACKOFF


def test_argparse_rejection_is_a_config_error_at_once() -> None:
    """Exit 2 with argparse's 'error:' line: 78 on the first attempt."""
    run = Run(COMMAND)
    run.start()
    line = "sft.py: error: argument --max_steps: invalid int value: 'x'"
    actions = run.exit(2, error_line=line, log_usage_error=True)
    assert mode(run) is Mode.GAVE_UP
    assert of(actions, Exit)[0].code == 78
    failure = next(a for a in of(actions, Record) if a.event == "failure")
    assert failure.fields["kind"] == FailureKind.CONFIG.value
    assert line in str(failure.fields["evidence"])


# --- never past max_steps -------------------------------------------------------------------


def test_unguarded_resume_at_max_steps_gives_up_instead_of_training_past_it() -> None:
    """Without the callback, resuming checkpoint-max_steps would train step max+1: refuse."""
    run = Run(UNGUARDED)
    actions = run.start(inv(at_end(200, 200, record=False)))
    assert not launches(actions)
    assert mode(run) is Mode.GAVE_UP
    reason = of(actions, Exit)[0].reason
    assert "checkpoint-200" in reason
    assert "inject_callback" in reason


def test_guarded_resume_at_max_steps_launches() -> None:
    """With the callback (injected, or proven by a commit record) the resume takes no step."""
    for config, record in ((COMMAND, False), (UNGUARDED, True)):
        run = Run(config)
        actions = run.start(inv(at_end(200, 200, record=record)))
        assert launches(actions)[0].resume_from == 200
