"""TRL's own ``sft`` CLI, unmodified, supervised end to end as the README's recipe says.

``python -m trl.scripts.sft`` is what ``trl sft`` runs. It knows nothing of
trainwarden: it passes ``--resume_from_checkpoint`` straight to
``trainer.train()`` and saves the adapter into ``--output_dir`` at the end.
trainwarden adds WardenCallback to its trainer from outside (``inject_callback``)
and must still end, after kills, with exactly the adapter an unsupervised run
of the same command makes.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.byo import (
    RESUME_FLAG,
    global_step,
    run_unsupervised,
    trl_sft_argv,
    write_command_config,
)
from tests.support.jobs import Job
from tests.support.outputs import assert_bit_identical, checkpoint_steps, events, heartbeat
from tests.support.processes import wait_for
from tests.support.supervised import run_supervised, status_json, supervisor_process
from trainer_child.protocol import (
    COMMIT_RECORD,
    CommitRecord,
    ErrorKind,
    ErrorReport,
    Phase,
    RunStateFile,
    StandbyFile,
    read_model,
)

pytestmark = pytest.mark.slow

MAX_STEPS = 40
SAVE_STEPS = 5
SEED = 20_261_128


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: Path,
    jsonl_data: Path,
    env: dict[str, str],
) -> Path:
    """The output_dir of one unsupervised, uninterrupted run of the same command."""
    root = tmp_path_factory.mktemp("trl-reference")
    argv = trl_sft_argv(
        tiny_model, jsonl_data, root / "out", max_steps=MAX_STEPS, save_steps=SAVE_STEPS
    )
    run_unsupervised(argv, env, root / "trl.log")
    return root / "out"


def trl_job(tmp_path: Path, tiny_model: Path, jsonl_data: Path, **sections: Any) -> Job:
    out = tmp_path / "out"
    argv = trl_sft_argv(tiny_model, jsonl_data, out, max_steps=MAX_STEPS, save_steps=SAVE_STEPS)
    return write_command_config(tmp_path, [*argv, *RESUME_FLAG], out, **sections)


def child_of_attempt(job: Job, attempt: int) -> int | None:
    """The pid of attempt ``attempt``'s training process, once the supervisor recorded it."""
    state = read_model(job.layout.state, RunStateFile)
    if state is None or state.attempts != attempt or not state.child_pid:
        return None
    return state.child_pid


def assert_finished_like_reference(job: Job, reference: Path) -> None:
    """The adapter trl saved equals the reference's; no checkpoint went past max_steps."""
    assert_bit_identical(job.output_dir, reference)
    steps = checkpoint_steps(job.output_dir)
    assert steps[-1] == MAX_STEPS, steps
    assert global_step(job.output_dir / f"checkpoint-{MAX_STEPS}") == MAX_STEPS


def assert_every_checkpoint_committed(job: Job) -> None:
    """The injected callback wrote a commit record into every checkpoint trl saved."""
    for step in checkpoint_steps(job.output_dir):
        record = read_model(job.output_dir / f"checkpoint-{step}" / COMMIT_RECORD, CommitRecord)
        assert record is not None, f"checkpoint-{step} has no commit record"
        assert record.step == step


def test_trl_sft_completes_in_one_attempt_and_is_not_run_again(
    tmp_path: Path, tiny_model: Path, jsonl_data: Path, env: dict[str, str], reference: Path
) -> None:
    """A fresh start: one attempt, exit 0, status complete; a second run exits 0 at once."""
    job = trl_job(tmp_path, tiny_model, jsonl_data)

    code, log = run_supervised(job, env)

    assert code == 0, log
    journal = events(job.layout)
    assert [e["resume_step"] for e in journal if e["event"] == "launch"] == [None]
    assert not [e for e in journal if e["event"] == "failure"]
    assert_finished_like_reference(job, reference)
    assert_every_checkpoint_committed(job)
    assert status_json(job.output_dir, env)["state"] == "completed"

    started = time.monotonic()
    code, log = run_supervised(job, env)
    assert code == 0, log
    assert [e["event"] for e in events(job.layout)].count("launch") == 1
    assert any(e["event"] == "already_complete" for e in events(job.layout))
    print(f"second run exited after {time.monotonic() - started:.1f}s")


def test_trl_sft_survives_sigkills_and_ends_bit_identical(
    tmp_path: Path, tiny_model: Path, jsonl_data: Path, env: dict[str, str], reference: Path
) -> None:
    """Three SIGKILLs at random moments and one mid-save; the adapter is the uninterrupted one's."""
    rng = random.Random(SEED)
    # Each torch.save of a checkpoint sleeps, so the folder stays half-written
    # long enough to kill into it (a test facility: timing, not a fault).
    job = trl_job(
        tmp_path,
        tiny_model,
        jsonl_data,
        env={"TRAINWARDEN_FAILPOINTS": "slow_save@seconds=0.3"},
    )
    mid_save: list[Path] = []
    with supervisor_process(job, env) as supervisor:
        # Attempt 1: somewhere in imports and loading.
        victim = wait_for(lambda: child_of_attempt(job, 1), 120)
        time.sleep(rng.uniform(0.5, 4.0))
        os.kill(victim, signal.SIGKILL)
        # Attempt 2: while a checkpoint folder exists without its commit record.
        victim = wait_for(lambda: child_of_attempt(job, 2), 120)

        def half_written() -> Path | None:
            for step in checkpoint_steps(job.output_dir):
                folder = job.output_dir / f"checkpoint-{step}"
                if not (folder / COMMIT_RECORD).exists():
                    return folder
            return None

        folder = wait_for(half_written, 120, interval=0.005)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not psutil.pid_exists(victim) or _zombie(victim), 30)
        if not (folder / COMMIT_RECORD).exists():
            mid_save.append(folder)
        # Attempts 3 and 4: at random moments of training.
        for attempt in (3, 4):
            victim = wait_for(lambda a=attempt: child_of_attempt(job, a), 120)  # type: ignore[misc]
            time.sleep(rng.uniform(1.0, 8.0))
            os.kill(victim, signal.SIGKILL)
        code = supervisor.wait(400)
        log = supervisor.log()

    assert code == 0, log
    assert mid_save, "the mid-save kill landed after the commit record: no partial checkpoint"
    journal = events(job.layout)
    failures = [e for e in journal if e["event"] == "failure"]
    assert len(failures) == 4, failures
    assert all("SIGKILL" in e["evidence"] for e in failures)
    quarantined = [e for e in journal if e["event"] == "quarantined"]
    assert any(e["step"] == int(mid_save[0].name.split("-")[1]) for e in quarantined), quarantined
    assert_finished_like_reference(job, reference)
    assert_every_checkpoint_committed(job)


def test_trl_sft_restarts_warm_in_a_standby_and_ends_bit_identical(
    tmp_path: Path, tiny_model: Path, jsonl_data: Path, env: dict[str, str], reference: Path
) -> None:
    """restart.standby auto: a kill once the standby is ready restarts warm, in-process (runpy)."""
    job = trl_job(
        tmp_path,
        tiny_model,
        jsonl_data,
        # Slow steps (numerics untouched) keep it training while the standby imports.
        env={"TRAINWARDEN_FAILPOINTS": "slow_step@seconds=1.5"},
        restart={"standby": "auto"},
    )
    with supervisor_process(job, env) as supervisor:

        def ready_standby() -> int | None:
            record = read_model(job.layout.standby, StandbyFile)
            child = child_of_attempt(job, 1)
            if record is None or record.state != "ready" or record.pid == child:
                return None
            return record.pid if not _zombie(record.pid) else None

        standby = wait_for(ready_standby, 240)
        victim = child_of_attempt(job, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: child_of_attempt(job, 2), 60) == standby
        code = supervisor.wait(400)
        log = supervisor.log()

    assert code == 0, log
    journal = events(job.layout)
    started = [e for e in journal if e["event"] == "child_started"]
    assert [e["start"] for e in started] == ["cold", "warm"], started
    assert "python -m trl.scripts.sft" in started[1]["why"]
    assert_finished_like_reference(job, reference)
    assert_every_checkpoint_committed(job)
    assert status_json(job.output_dir, env)["standby"]["last_start"] == "warm"


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_trl_sft_hang_is_detected_and_sigterm_saves_an_emergency_checkpoint(
    tmp_path: Path, tiny_model: Path, jsonl_data: Path, env: dict[str, str], reference: Path
) -> None:
    """SIGSTOP of the child is a hang; SIGTERM to the supervisor: emergency checkpoint, exit 0."""
    job = trl_job(tmp_path, tiny_model, jsonl_data, hang={"timeout": "5s", "kill_grace": "5s"})
    with supervisor_process(job, env) as supervisor:
        wait_for(
            lambda: (
                (beat := heartbeat(job.layout)) is not None
                and beat.phase is Phase.TRAIN
                and beat.step >= SAVE_STEPS + 1
            ),
            120,
        )
        victim = child_of_attempt(job, 1)
        assert victim is not None
        os.kill(victim, signal.SIGSTOP)
        hang = wait_for(
            lambda: next((e for e in events(job.layout) if e["event"] == "hang_detected"), None),
            60,
        )
        # Attempt 2 trains past its resume point; then the machine "shuts down".
        wait_for(lambda: child_of_attempt(job, 2), 60)
        resumed_at = max(checkpoint_steps(job.output_dir))
        wait_for(
            lambda: (
                (beat := heartbeat(job.layout)) is not None
                and beat.attempt == 2
                and beat.phase is Phase.TRAIN
                and beat.step > resumed_at
            ),
            120,
        )
        supervisor.signal(signal.SIGTERM)
        code = supervisor.wait(120)
        log = supervisor.log()

    assert code == 0, log
    assert hang["stopped"] is True
    journal = events(job.layout)
    assert [e["kind"] for e in journal if e["event"] == "failure"] == ["hang"]
    assert any(e["event"] == "preempted" for e in journal)
    # The child stopped at the end of a step and saved that very step: at once
    # as an emergency checkpoint, or as the periodic save it was already doing.
    newest = max(checkpoint_steps(job.output_dir))
    assert newest > resumed_at
    record = read_model(job.output_dir / f"checkpoint-{newest}" / COMMIT_RECORD, CommitRecord)
    assert record is not None
    assert record.reason in ("emergency", "periodic")
    report = read_model(job.layout.error, ErrorReport)
    assert report is not None
    assert report.kind is ErrorKind.PREEMPTED
    assert report.step == newest
    assert status_json(job.output_dir, env)["state"] != "completed"

    # The next start resumes from the emergency checkpoint and finishes exactly.
    code, log = run_supervised(job, env)
    assert code == 0, log
    launches = [e for e in events(job.layout) if e["event"] == "launch"]
    assert launches[-1]["resume_step"] == newest
    assert_finished_like_reference(job, reference)


@pytest.mark.parametrize(("inject", "expected"), [(True, (78, 1)), (False, (76, 2))])
def test_trl_sft_with_a_wrong_model_path_gives_up_quickly_naming_the_error(
    tmp_path: Path, jsonl_data: Path, env: dict[str, str], inject: bool, expected: tuple[int, int]
) -> None:
    """A bad --model_name_or_path: 78 at once with the hook, 76 after two attempts without."""
    out = tmp_path / "out"
    argv = trl_sft_argv(tmp_path / "no-such-model", jsonl_data, out, max_steps=4, save_steps=2)
    job = write_command_config(tmp_path, [*argv, *RESUME_FLAG], out, inject_callback=inject)

    got, log = run_supervised(job, env)

    code, attempts = expected
    assert got == code, log
    journal = events(job.layout)
    assert len([e for e in journal if e["event"] == "launch"]) == attempts
    status = status_json(job.output_dir, env)
    assert status["state"] == "gave up"
    assert "Repo id must be in the form" in status["gave_up"]
    assert str(tmp_path / "no-such-model") in status["gave_up"]
