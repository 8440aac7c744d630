"""Preemption: SIGTERM to the supervisor means "save what you have and stop", never a failure."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import pytest

from tests.support.jobs import write_config
from tests.support.metadata import MetadataStandIn
from tests.support.outputs import assert_bit_identical, events, heartbeat
from tests.support.processes import wait_for
from tests.support.supervised import SupervisorProcess, supervisor_process
from trainer_child.protocol import (
    COMMIT_RECORD,
    CommitRecord,
    Layout,
    RunStateFile,
    checkpoint_step,
    read_model,
)

pytestmark = pytest.mark.slow

SAVE_STEPS = 4


def _committed(output_dir: Path) -> dict[int, CommitRecord]:
    found = {}
    for folder in output_dir.glob("checkpoint-*"):
        step = checkpoint_step(folder.name)
        record = read_model(folder / COMMIT_RECORD, CommitRecord)
        if step is not None and record is not None:
            found[step] = record
    return found


def _in_step_6(output_dir: Path, proc: SupervisorProcess) -> bool:
    """Step 6's slow_step failpoint has fired: the child sleeps inside step 6 now.

    The failpoint records its fire in .warden/failpoints.json before it sleeps,
    so the file's appearance is the event (or the supervisor ended: reported later).
    """
    return Layout(output_dir).failpoints.exists() or proc.proc.poll() is not None


def test_sigterm_saves_an_emergency_checkpoint_and_the_next_run_resumes_from_it(
    tmp_path: Path, env: dict[str, str], reference_final: Callable[..., Path]
) -> None:
    """SIGTERM: emergency checkpoint, exit 0 within the grace; the next run loses no step."""
    grace = 30.0
    job = write_config(
        tmp_path,
        preemption={"grace": f"{grace}s"},
        # Step 6 of the first attempt starts with a 2 s pause, in which SIGTERM lands.
        env={"TRAINWARDEN_FAILPOINTS": "slow_step@step=6,seconds=2,times=1"},
    )
    with supervisor_process(job, env) as proc:
        wait_for(partial(_in_step_6, job.output_dir, proc), 120)
        proc.signal(signal.SIGTERM)
        sent = time.monotonic()
        code = proc.wait(grace + 30)
        took = time.monotonic() - sent
        log = proc.log()

    print(f"SIGTERM -> supervisor exit: {took:.2f}s (grace {grace:.0f}s)")
    assert code == 0, log
    committed = _committed(job.output_dir)
    newest = max(committed)
    assert committed[newest].reason == "emergency"
    assert newest > 5
    assert newest > max(s for s, r in committed.items() if r.reason == "periodic")
    beat = heartbeat(job.layout)
    assert beat is not None
    assert beat.step == newest  # nothing trained beyond what was saved
    first = events(job.layout)
    assert not [e for e in first if e["event"] == "failure"]
    # Saved within the grace: the supervisor never had to escalate to SIGKILL.
    assert not [e for e in first if e["event"] == "escalated"]
    assert first[-1]["event"] == "preempted"
    assert first[-1]["checkpoint"] == newest
    state = read_model(job.layout.state, RunStateFile)
    assert state is not None
    assert state.mode == "preempted"

    with supervisor_process(job, env) as proc:
        code = proc.wait(240)
        log = proc.log()

    assert code == 0, log
    second = events(job.layout)[len(first) :]
    launches = [e for e in second if e["event"] == "launch"]
    assert len(launches) == 1
    assert launches[0]["resume_from"] == f"checkpoint-{newest}"
    assert launches[0]["resume_step"] == newest
    assert not [e for e in second if e["event"] == "failure"]
    assert second[-1]["event"] == "completed"
    assert_bit_identical(job.output_dir / "final", reference_final())


#: Per escalation path: the preemption grace, and what the journal says triggered SIGKILL.
ESCALATIONS = {
    "second_sigterm": (60.0, "second SIGTERM"),
    "grace_runs_out": (2.0, "stop grace ran out"),
}


def test_a_child_that_cannot_save_in_time_is_killed_and_the_supervisor_exits_0(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """A second SIGTERM, or the grace running out, escalates to SIGKILL; still exit 0."""
    jobs = {
        name: write_config(
            tmp_path,
            name=f"{name}.yaml",
            output_dir=tmp_path / name,
            preemption={"grace": f"{grace}s"},
            # Step 6 never ends in time: SIGTERM only raises the flag read at its end.
            env={"TRAINWARDEN_FAILPOINTS": "slow_step@step=6,seconds=60,times=1"},
        )
        for name, (grace, _) in ESCALATIONS.items()
    }
    # Both paths at once, one core each.
    with contextlib.ExitStack() as stack:
        procs = {
            name: stack.enter_context(supervisor_process(job, env)) for name, job in jobs.items()
        }
        for name, proc in procs.items():
            wait_for(partial(_in_step_6, jobs[name].output_dir, proc), 120)
        children, sent = {}, {}
        for name, proc in procs.items():
            children[name] = heartbeat(jobs[name].layout)
            proc.signal(signal.SIGTERM)
            sent[name] = time.time()
        second = jobs["second_sigterm"].layout
        wait_for(lambda: any(e["event"] == "preempt_requested" for e in events(second)), 60)
        procs["second_sigterm"].signal(signal.SIGTERM)
        results = {name: (proc.wait(90), proc.log()) for name, proc in procs.items()}

    for name, (grace, why) in ESCALATIONS.items():
        code, log = results[name]
        assert code == 0, log
        child = children[name]
        assert child is not None
        journal = events(jobs[name].layout)
        escalated = [e for e in journal if e["event"] == "escalated"]
        assert len(escalated) == 1, journal
        assert escalated[0]["signal"] == "SIGKILL"
        assert escalated[0]["why"] == why
        stopped = journal[-1]
        assert stopped["event"] == "preempted"
        assert stopped["signal"] == signal.SIGKILL
        assert stopped["pid"] == child.pid
        took = stopped["ts"] - sent[name]
        print(
            f"{name}: SIGTERM -> child killed, supervisor exiting: {took:.2f}s (grace {grace:.0f}s)"
        )
        # The order of events says what triggered SIGKILL: our SIGTERM was forwarded
        # first, then either the second SIGTERM or the deadline (see "why" above).
        names = [e["event"] for e in journal]
        assert names.index("preempt_requested") < names.index("escalated")
        assert names.index("escalated") < names.index("preempted")
        # No emergency checkpoint could be written; the periodic one is intact.
        assert max(_committed(jobs[name].output_dir)) == SAVE_STEPS


def test_a_cloud_preemption_notice_saves_and_uploads_before_the_clouds_sigterm(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """AWS's spot notice (from a loopback stand-in): emergency save and upload, exit 0.

    The cloud's own SIGTERM follows its notice while the child saves: expected,
    so it does not escalate to SIGKILL as a second SIGTERM would.
    """
    remote = tmp_path / "remote"
    with MetadataStandIn().start() as metadata:
        job = write_config(
            tmp_path,
            preemption={
                "grace": "30s",
                "notice": "aws",
                "notice_url": metadata.url,
                "notice_interval": "0.2s",
            },
            mirror={"url": remote.as_uri()},
            env={"TRAINWARDEN_FAILPOINTS": "slow_step@step=6,seconds=2,times=1"},
        )
        with supervisor_process(job, env) as proc:
            wait_for(partial(_in_step_6, job.output_dir, proc), 120)
            metadata.aws_action = {"action": "terminate", "time": "2026-11-28T08:22:00Z"}
            noticed = partial(_journaled, job.layout, "preemption_notice", proc)
            wait_for(noticed, 30, what="the supervisor to journal the notice")
            proc.signal(signal.SIGTERM)  # the cloud's, a moment later
            code = proc.wait(60)
            log = proc.log()
    assert code == 0, log
    assert metadata.token_requests >= 1, "IMDSv2: a token first"
    assert not metadata.bad_requests
    journal = events(job.layout)
    (notice,) = [e for e in journal if e["event"] == "preemption_notice"]
    assert (notice["provider"], notice["action"]) == ("aws", "terminate")
    assert notice["deadline"] == datetime(2026, 11, 28, 8, 22, tzinfo=timezone.utc).timestamp()
    (asked,) = [e for e in journal if e["event"] == "preempt_requested"]
    assert asked["signal"] == "preemption notice (aws terminate)"
    assert [e["signal"] for e in journal if e["event"] == "stop_signal_after_notice"] == ["SIGTERM"]
    assert not [e for e in journal if e["event"] in ("escalated", "failure")]
    committed = _committed(job.output_dir)
    newest = max(committed)
    assert committed[newest].reason == "emergency"
    assert newest >= 6
    drained = [e for e in journal if e["event"] == "mirror_drained"][-1]
    assert drained["complete"] is True, drained
    assert drained["step"] == newest
    assert (remote / f"checkpoint-{newest}" / COMMIT_RECORD).is_file()
    (preempted,) = [e for e in journal if e["event"] == "preempted"]
    assert preempted["checkpoint"] == newest


def _journaled(layout: Layout, event: str, proc: SupervisorProcess) -> bool:
    return any(e["event"] == event for e in events(layout)) or proc.proc.poll() is not None
