"""A checkpoint that will not load, and a child SIGTERMed by someone else: one real run.

The run starts from copies of the reference run's checkpoint-4 and checkpoint-8,
with checkpoint-8's optimizer state replaced by something torch loads but the
optimizer cannot take, and its commit record rewritten to match: a checkpoint
saved wrong, which verification passes and only loading finds out. Attempt 1
fails while loading it (kind ``resume``); attempt 2 starts from checkpoint-4
and is SIGTERMed by the test, not by the supervisor, inside step 6 (exit 75);
attempt 3 resumes from that emergency checkpoint and finishes.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.checkpoints import OPTIMIZER, write_commit_record
from tests.support.jobs import Job, write_config
from tests.support.outputs import assert_bit_identical, events, heartbeat
from tests.support.processes import wait_for
from tests.support.supervised import supervisor_process
from trainer_child.protocol import EXIT_PREEMPTED

pytestmark = pytest.mark.slow

#: Attempt 2's step 6 starts with a pause; the failpoint's counter file appears
#: as it begins, which is when the test sends its SIGTERM.
PAUSE_IN_STEP_6 = {"TRAINWARDEN_FAILPOINTS": "slow_step@step=6,seconds=2,times=1"}


@dataclass(frozen=True)
class ResumeRun:
    job: Job
    code: int
    log: str
    journal: list[dict[str, Any]]
    #: The pid of attempt 2's child, which the test SIGTERMed.
    terminated_pid: int


@pytest.fixture(scope="module")
def resume_run(
    tmp_path_factory: pytest.TempPathFactory,
    env: dict[str, str],
    reference_final: Callable[..., Path],
) -> ResumeRun:
    root = tmp_path_factory.mktemp("resume-run")
    reference = reference_final().parent
    job = write_config(root, env=PAUSE_IN_STEP_6)
    job.output_dir.mkdir()
    for step in (4, 8):
        shutil.copytree(reference / f"checkpoint-{step}", job.output_dir / f"checkpoint-{step}")
    bad = job.output_dir / "checkpoint-8"
    torch.save({"not": "an optimizer state"}, bad / OPTIMIZER)
    write_commit_record(bad, 8)
    with supervisor_process(job, env) as proc:
        wait_for(lambda: job.layout.failpoints.exists() or proc.proc.poll() is not None, 240)
        beat = heartbeat(job.layout)
        assert beat is not None, proc.log()
        assert beat.attempt == 2, beat
        # Straight to the child, as an operator or a VM agent would: not through us.
        os.kill(beat.pid, signal.SIGTERM)
        code = proc.wait(240)
        log = proc.log()
    return ResumeRun(job, code, log, events(job.layout), beat.pid)


def test_a_checkpoint_that_will_not_load_is_quarantined_and_an_older_one_resumed(
    resume_run: ResumeRun, reference_final: Callable[..., Path]
) -> None:
    """Loading checkpoint-8 fails (kind resume): it is quarantined and checkpoint-4 resumed."""
    assert resume_run.code == 0, resume_run.log
    journal = resume_run.journal
    launches = [e for e in journal if e["event"] == "launch"]
    assert launches[0]["resume_from"] == "checkpoint-8"
    assert launches[1]["resume_from"] == "checkpoint-4"
    (failure,) = [e for e in journal if e["event"] == "failure"]
    assert failure["kind"] == "resume"
    assert failure["attempt"] == 1
    assert failure["resume_from"] == 8
    (quarantined,) = [e for e in journal if e["event"] == "quarantined"]
    assert quarantined["step"] == 8
    assert quarantined["reason"].startswith("failed to resume")
    assert (resume_run.job.layout.quarantine / "checkpoint-8").is_dir()
    assert journal[-1]["event"] == "completed"
    assert_bit_identical(resume_run.job.output_dir / "final", reference_final())


def test_a_child_sigtermed_by_someone_else_is_resumed_at_once_not_counted(
    resume_run: ResumeRun,
) -> None:
    """Exit 75 from an outside SIGTERM: no failure, no backoff, resume from its emergency save."""
    assert resume_run.code == 0, resume_run.log
    journal = resume_run.journal
    names = [e["event"] for e in journal]
    (preempted,) = [e for e in journal if e["event"] == "child_preempted"]
    assert preempted["pid"] == resume_run.terminated_pid
    assert preempted["returncode"] == EXIT_PREEMPTED
    third = [i for i, name in enumerate(names) if name == "launch"][2]
    between = names[names.index("child_preempted") : third]
    assert "failure" not in between
    assert "backoff" not in between
    emergency = [e["step"] for e in journal[:third] if e["event"] == "checkpoint_committed"][-1]
    assert 6 <= emergency < 16
    assert journal[third]["resume_from"] == f"checkpoint-{emergency}"
    assert [e["kind"] for e in journal if e["event"] == "failure"] == ["resume"]
