"""Hangs: a child frozen by SIGSTOP, and a child stuck in a loop that never heartbeats."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.jobs import write_config
from tests.support.outputs import assert_bit_identical, events, heartbeat
from tests.support.processes import wait_for
from tests.support.supervised import supervisor_process
from trainer_child.protocol import Phase

pytestmark = pytest.mark.slow

HANG_TIMEOUT = 3.0
#: Short limits so a hang costs seconds; loading keeps the default (it is not under test).
HANG: dict[str, Any] = {
    "timeout": f"{HANG_TIMEOUT}s",
    "save_timeout": f"{HANG_TIMEOUT}s",
    "kill_grace": "2s",
}


def test_sigstopped_child_is_a_hang_once_the_timeout_passed(
    tmp_path: Path, env: dict[str, str], reference_final: Callable[..., Path]
) -> None:
    """A SIGSTOPped child is called hung (not before hang.timeout); the run then completes."""
    job = write_config(
        tmp_path,
        hang=HANG,
        # Attempt 1's first steps take 0.3 s more each: it is surely mid-training when stopped.
        env={"TRAINWARDEN_FAILPOINTS": "slow_step@step=1,seconds=0.3,times=4"},
    )
    with supervisor_process(job, env) as proc:
        beat = wait_for(
            lambda: (
                ((b := heartbeat(job.layout)) is not None and b.phase is Phase.TRAIN and b)
                or proc.proc.poll() is not None
            ),
            120,
        )
        assert beat is not True, proc.log()
        os.kill(beat.pid, signal.SIGSTOP)
        stopped_at = time.time()
        try:
            detected = wait_for(
                lambda: (
                    next((e for e in events(job.layout) if e["event"] == "hang_detected"), None)
                    or proc.proc.poll() is not None
                ),
                120,
            )
        finally:
            # The supervisor continues it itself; this is only for a failing test.
            with contextlib.suppress(ProcessLookupError):
                os.kill(beat.pid, signal.SIGCONT)
        code = proc.wait(240)
        log = proc.log()

    assert detected is not True, log
    # How fast is the benchmark's business (bench/detection.py); here: the right
    # verdict, reached by the supervisor's own clock only after the timeout.
    print(f"SIGSTOP -> hang_detected: {detected['ts'] - stopped_at:.2f}s (timeout {HANG_TIMEOUT}s)")
    assert detected["heartbeat_age"] > HANG_TIMEOUT
    assert detected["stopped"] is True
    assert code == 0, log
    journal = events(job.layout)
    failures = [e for e in journal if e["event"] == "failure"]
    assert [e["kind"] for e in failures] == ["hang"]
    assert failures[0]["pid"] == beat.pid
    assert journal[-1]["event"] == "completed"
    assert_bit_identical(job.output_dir / "final", reference_final())


def test_hung_child_has_its_stacks_dumped_and_is_restarted(
    tmp_path: Path, env: dict[str, str], reference_final: Callable[..., Path]
) -> None:
    """A child stuck in hang_forever: stacks dumped into its attempt log, killed, run completes."""
    job = write_config(tmp_path, hang=HANG, env={"TRAINWARDEN_FAILPOINTS": "hang@step=6,times=1"})
    with supervisor_process(job, env) as proc:
        code = proc.wait(240)
        log = proc.log()

    assert code == 0, log
    journal = events(job.layout)
    detected = next(e for e in journal if e["event"] == "hang_detected")
    assert detected["attempt"] == 1
    assert detected["phase"] == "train"
    assert detected["heartbeat_age"] > HANG_TIMEOUT
    # SIGTERM only sets the preemption flag of a thread that never returns: SIGKILL ends it.
    assert any(e["event"] == "escalated" and e["signal"] == "SIGKILL" for e in journal)
    failure = next(e for e in journal if e["event"] == "failure")
    assert failure["kind"] == "hang"
    assert failure["signal"] == signal.SIGKILL
    stacks = job.layout.attempt_log(1).read_text(errors="replace")
    assert "(most recent call first)" in stacks  # faulthandler's dump
    assert "in hang_forever" in stacks
    launches = [e for e in journal if e["event"] == "launch"]
    assert launches[-1]["resume_from"] == "checkpoint-4"
    assert journal[-1]["event"] == "completed"
    assert_bit_identical(job.output_dir / "final", reference_final())
