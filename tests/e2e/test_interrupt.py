"""Ctrl-C, and early pruning below disk.reserve: one real supervised run shows both.

``disk.reserve`` is set far above any disk's free space, so free space is below
the reserve for real (statvfs) from the first tick: the supervisor must prune
down to the newest checkpoint while the child trains, before any save could
meet ENOSPC. Once it has, and the child is inside step 10, the test does what a
terminal does on Ctrl-C: SIGINT to the supervisor's foreground process group
(the child leads a session of its own, so only the supervisor can tell it).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.jobs import Job, write_config
from tests.support.outputs import checkpoint_steps, events, verify_commit
from tests.support.processes import wait_for
from tests.support.supervised import supervisor_process

pytestmark = pytest.mark.slow

#: More free space than any disk has: "below the reserve" holds for real, always.
HUGE_RESERVE = "1EiB"
#: Step 10 starts with a pause; the failpoint's counter file appears as it begins.
PAUSE_IN_STEP_10 = {"TRAINWARDEN_FAILPOINTS": "slow_step@step=10,seconds=3,times=1"}
BELOW_RESERVE = "disk pressure: free space below reserve"


@dataclass(frozen=True)
class InterruptedRun:
    job: Job
    code: int
    log: str
    journal: list[dict[str, Any]]


def _pruned_below_reserve(journal: list[dict[str, Any]]) -> bool:
    return any(e["event"] == "pruned" and e["reason"] == BELOW_RESERVE for e in journal)


@pytest.fixture(scope="module")
def interrupted_run(
    tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]
) -> InterruptedRun:
    root = tmp_path_factory.mktemp("interrupted-run")
    job = write_config(root, env=PAUSE_IN_STEP_10, disk={"reserve": HUGE_RESERVE})
    with supervisor_process(job, env) as proc:
        wait_for(
            lambda: (
                (_pruned_below_reserve(events(job.layout)) and job.layout.failpoints.exists())
                or proc.proc.poll() is not None
            ),
            240,
            what="an early prune, then step 10",
        )
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(120)
        log = proc.log()
    return InterruptedRun(job, code, log, events(job.layout))


def test_ctrl_c_saves_an_emergency_checkpoint_and_exits_zero(
    interrupted_run: InterruptedRun,
) -> None:
    """SIGINT: forwarded as SIGTERM, emergency checkpoint committed, exit 0, not a failure."""
    assert interrupted_run.code == 0, interrupted_run.log
    journal = interrupted_run.journal
    (requested,) = [e for e in journal if e["event"] == "preempt_requested"]
    assert requested["signal"] == "SIGINT"
    assert journal[-1]["event"] == "preempted"
    assert not [e for e in journal if e["event"] in ("failure", "escalated")]
    output_dir = interrupted_run.job.output_dir
    newest = checkpoint_steps(output_dir)[-1]
    assert newest >= 10
    assert verify_commit(output_dir / f"checkpoint-{newest}", expect_step=newest).reason == (
        "emergency"
    )
    assert journal[-1]["checkpoint"] == newest


def test_free_space_below_the_reserve_prunes_early_while_the_child_trains(
    interrupted_run: InterruptedRun,
) -> None:
    """Below disk.reserve the supervisor prunes to the newest checkpoint before any ENOSPC."""
    assert interrupted_run.code == 0, interrupted_run.log
    journal = interrupted_run.journal
    names = [e["event"] for e in journal]
    low = names.index("disk_low")
    assert journal[low]["free_bytes"] < journal[low]["reserve_bytes"]
    assert low < names.index("preempt_requested"), "pruned only after the child had gone"
    pruned = [e for e in journal if e["event"] == "pruned"]
    assert pruned
    assert {e["reason"] for e in pruned} == {BELOW_RESERVE}
    committed: list[int] = []
    for entry in journal:  # after every event, the newest committed checkpoint is kept
        if entry["event"] == "checkpoint_committed":
            committed.append(entry["step"])
        elif entry["event"] == "pruned":
            assert entry["step"] < max(committed), entry
    assert not [e for e in journal if e["event"] == "failure"]
    left = checkpoint_steps(interrupted_run.job.output_dir)
    assert len(left) <= 2, left  # the newest periodic one and the emergency save, no more
