"""The accounting of a run, from scripted journal lines: restarts, losses, goodput."""

from __future__ import annotations

import pytest

from supervisor.core.accounting import (
    Activity,
    Ledger,
    ProgressSample,
    RunResult,
    account,
)
from trainer_child.protocol import JournalEntry

T0 = 1_800_000_000.0


def e(t: float, event: str, attempt: int, **fields: object) -> JournalEntry:
    """One journal line ``t`` seconds into the run."""
    return JournalEntry.model_validate({"ts": T0 + t, "event": event, "attempt": attempt, **fields})


def p(t: float, step: int, attempt: int) -> ProgressSample:
    return ProgressSample(T0 + t, step, attempt)


def crash(t: float, attempt: int, step: int | None, kind: str = "crash") -> list[JournalEntry]:
    return [
        e(t, "failure", attempt, kind=kind, step=step, evidence="killed by SIGKILL"),
        e(t, "backoff", attempt, seconds=1.0),
    ]


def launch(t: float, attempt: int, resume: int | None) -> list[JournalEntry]:
    return [
        e(t, "launch", attempt, resume_step=resume),
        e(t + 0.01, "child_started", attempt, pid=100 + attempt),
    ]


def test_uninterrupted_run_has_full_goodput() -> None:
    """A run with no failure loses nothing and spends all its time training."""
    journal = [
        *launch(0, 1, None),
        e(10, "checkpoint_committed", 1, step=5),
        e(20, "completed", 1, step=10, restarts=0),
    ]
    summary = account(journal)
    assert summary.result is RunResult.COMPLETED
    assert summary.goodput == 1.0
    assert summary.lost_seconds == 0.0
    assert summary.restarts == 0
    assert summary.wall_seconds == 20.0
    assert summary.seconds(Activity.TRAINING) == 20.0
    assert summary.last_step == 10
    assert [c.step for c in summary.commits] == [5]


def test_two_kills_cost_the_time_until_their_steps_are_regained() -> None:
    """Time lost runs from each failure until a later attempt passes its step again."""
    journal = [
        *launch(0, 1, None),
        e(12, "checkpoint_committed", 1, step=5),
        e(14, "checkpoint_committed", 1, step=10),
        *crash(14, 1, step=10),
        *launch(16, 2, 10),
        *crash(30, 2, step=13),
        *launch(32, 3, 10),
        e(50, "checkpoint_committed", 3, step=15),
        e(60, "completed", 3, step=30, restarts=2),
    ]
    samples = [
        p(20, 10, 2),  # attempt 2 is back at step 10 at t=20: the first failure is regained
        p(26, 12, 2),
        p(40, 11, 3),
        p(42, 15, 3),  # passes step 13 halfway between t=40 (11) and t=42 (15): t=41
    ]
    summary = account(journal, samples)
    assert summary.result is RunResult.COMPLETED
    assert summary.failures_by_kind == {"crash": 2}
    assert summary.restarts == 2
    assert summary.attempts == 3
    first, second = summary.failures
    assert first.steps_lost == 0
    assert first.regained_at == pytest.approx(T0 + 20)
    assert first.lost_seconds == pytest.approx(6)
    assert second.steps_lost == 3
    assert second.resume_step == 10
    assert second.regained_at == pytest.approx(T0 + 41)
    assert second.lost_seconds == pytest.approx(11)
    assert summary.steps_lost == 3
    assert summary.lost_seconds == pytest.approx(17)
    assert summary.goodput == pytest.approx(1 - 17 / 60)
    assert summary.seconds(Activity.RESTARTING) == pytest.approx(4)
    assert summary.seconds(Activity.TRAINING) == pytest.approx(56)
    assert [(s.activity.value, s.attempt) for s in summary.spans] == [
        ("training", 1),
        ("restarting", 1),
        ("training", 2),
        ("restarting", 2),
        ("training", 3),
    ]


def test_overlapping_losses_are_counted_once() -> None:
    """A second crash before the first is regained does not double-count the time."""
    journal = [
        *launch(0, 1, None),
        *crash(10, 1, step=8),
        *launch(11, 2, 0),
        *crash(15, 2, step=2),
        *launch(16, 3, 0),
    ]
    summary = account(journal, [p(20, 2, 3), p(30, 8, 3)], now=T0 + 40)
    assert [f.lost_seconds for f in summary.failures] == pytest.approx([20, 5])
    assert summary.lost_seconds == pytest.approx(20)
    assert summary.steps_lost == 10
    assert summary.result is RunResult.RUNNING
    assert summary.goodput == pytest.approx(0.5)


def test_a_hang_costs_from_its_last_heartbeat() -> None:
    """The loss of a hang starts when the heartbeat stopped, not when it was killed."""
    journal = [
        *launch(0, 1, None),
        e(100, "hang_detected", 1, kind="hang", heartbeat_age=60.0, timeout=60),
        *crash(105, 1, step=50, kind="hang"),
        *launch(106, 2, 40),
    ]
    summary = account(journal, [p(120, 50, 2)])
    (failure,) = summary.failures
    assert failure.kind == "hang"
    assert failure.began == pytest.approx(T0 + 40)
    assert failure.lost_seconds == pytest.approx(80)
    assert failure.steps_lost == 10


def test_unregained_failure_keeps_costing_until_now() -> None:
    """While the lost step is not reached again, the loss grows with the clock."""
    journal = [*launch(0, 1, None), *crash(50, 1, step=20), *launch(52, 2, 10)]
    ledger = Ledger()
    for entry in journal:
        ledger.add_entry(entry)
    ledger.add_progress(T0 + 60, 12, 2)
    assert ledger.summary(now=T0 + 70).lost_seconds == pytest.approx(20)
    assert ledger.summary(now=T0 + 80).lost_seconds == pytest.approx(30)
    ledger.add_progress(T0 + 84, 20, 2)
    regained = ledger.summary(now=T0 + 90)
    # Interpolated between step 12 at t=60 and step 20 at t=84: exactly t=84.
    assert regained.lost_seconds == pytest.approx(34)
    assert regained.failures[0].regained_at == pytest.approx(T0 + 84)


def test_give_up_names_the_reason() -> None:
    """A given-up run keeps the reason from the gave_up record."""
    journal = [
        *launch(0, 1, None),
        e(5, "failure", 1, kind="config", step=None, evidence="exit 78"),
        e(5, "gave_up", 1, kind="config", reason="configuration or data error: exit 78"),
    ]
    summary = account(journal, now=T0 + 100)
    assert summary.result is RunResult.GAVE_UP
    assert summary.reason == "configuration or data error: exit 78"
    assert summary.ended == T0 + 5  # a finished run does not grow with the clock
    assert summary.failures[0].steps_lost is None


def test_waiting_for_disk_is_not_goodput() -> None:
    """Time spent waiting for disk counts as waiting and against goodput."""
    journal = [
        *launch(0, 1, None),
        *crash(10, 1, step=10, kind="disk_full"),
        e(11, "waiting_for_disk", 1, need_bytes=10, free_bytes=1),
        *launch(31, 2, 10),
        e(40, "completed", 2, step=12),
    ]
    summary = account(journal, [p(35, 11, 2)])
    assert summary.seconds(Activity.WAITING) == pytest.approx(20)
    assert summary.seconds(Activity.RESTARTING) == pytest.approx(1)
    assert summary.lost_seconds == pytest.approx(25)
    assert summary.goodput == pytest.approx(15 / 40)


def test_a_dead_supervisor_leaves_a_down_span() -> None:
    """A launch of a new attempt over an open one means the supervisor died in between."""
    journal = [
        *launch(0, 1, None),
        e(10, "checkpoint_committed", 1, step=10),
        e(100, "orphan_found", 1, pid=101),
        e(105, "orphan_gone", 1),
        *launch(105, 2, 10),
        e(125, "completed", 2, step=20),
    ]
    summary = account(journal)
    assert [(s.activity.value, s.start - T0, s.end - T0) for s in summary.spans] == [
        ("training", 0, 10),
        ("down", 10, 100),
        ("waiting", 100, 105),
        ("training", 105, 125),
    ]
    assert summary.goodput == pytest.approx(30 / 35)
    assert summary.restarts == 1


def test_a_stop_and_a_later_start_are_down_time() -> None:
    """Between `stopped` and the next supervisor's launch nobody supervised the run."""
    journal = [
        *launch(0, 1, None),
        e(10, "preempt_requested", 1, kind="preempted", signal="SIGTERM"),
        e(12, "preempted", 1, kind="preempted", checkpoint=10),
        *launch(1000, 2, 10),
    ]
    stopped = account(journal[:4])
    assert stopped.result is RunResult.PREEMPTED
    summary = account(journal, now=T0 + 1010)
    assert summary.result is RunResult.RUNNING
    assert summary.preemptions == 1
    assert summary.seconds(Activity.DOWN) == pytest.approx(988)
    assert summary.goodput == 1.0


def test_rejected_resume_relaunch_is_one_attempt() -> None:
    """A relaunch after resume_rejected is the same attempt; its resume point wins."""
    journal = [
        *launch(0, 1, None),
        *crash(10, 1, step=14),
        e(11, "launch", 2, resume_step=12),
        e(11, "resume_rejected", 2, step=12, problems=["hash"]),
        *launch(11, 2, 8),
    ]
    summary = account(journal, now=T0 + 20)
    assert summary.attempts == 2
    assert summary.failures[0].resume_step == 8
    assert summary.failures[0].steps_lost == 6
    assert [s.activity for s in summary.spans] == [
        Activity.TRAINING,
        Activity.RESTARTING,
        Activity.TRAINING,
    ]


def test_preemption_restart_is_not_a_failure() -> None:
    """A child that was SIGTERMed by someone else is restarted but not counted as failed."""
    journal = [
        *launch(0, 1, None),
        e(10, "child_preempted", 1, kind="preempted", step=10),
        *launch(10.5, 2, 10),
    ]
    summary = account(journal, now=T0 + 20)
    assert summary.failures == ()
    assert summary.preemptions == 1
    assert summary.restarts == 1


def test_empty_journal() -> None:
    """No journal means not started and no goodput to speak of."""
    summary = account([])
    assert summary.result is RunResult.NOT_STARTED
    assert summary.goodput is None
    assert summary.wall_seconds == 0.0
