"""HeartbeatMonitor: age on the supervisor's monotonic clock, stale files ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.core.model import HeartbeatView
from supervisor.shell.heartbeat import HeartbeatMonitor
from trainer_child.protocol import Heartbeat, Layout, Phase, atomic_write_model


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    """An output_dir with .warden/ created."""
    result = Layout(tmp_path)
    result.ensure()
    return result


def beat(
    layout: Layout,
    *,
    step: int,
    pid: int,
    attempt: int | None,
    phase: Phase = Phase.TRAIN,
    wall: float = 1.7e9,
) -> None:
    """Write a heartbeat the way the child does (atomic replace)."""
    atomic_write_model(
        layout.heartbeat,
        Heartbeat(
            step=step,
            max_steps=100,
            phase=phase,
            pid=pid,
            attempt=attempt,
            wall_time=wall,
            last_step_seconds=0.5,
        ),
        durable=False,
    )


def test_no_child_no_view(layout: Layout) -> None:
    """Before any reset there is no child to report on."""
    assert HeartbeatMonitor(layout, clock=FakeClock()).poll(0.0) is None


def test_before_first_beat_reports_load_aged_from_spawn(layout: Layout) -> None:
    """Until the new child writes, the view is phase load, step 0, aged from the spawn time."""
    clock = FakeClock()
    monitor = HeartbeatMonitor(layout, clock=clock)
    monitor.reset(attempt=1, pid=10)
    clock.now = 530.0
    assert monitor.poll(child_started_at=500.0) == HeartbeatView(
        step=0, max_steps=None, phase=Phase.LOAD, age=30.0
    )


def test_stale_heartbeat_of_an_earlier_attempt_is_ignored(layout: Layout) -> None:
    """A heartbeat left by the previous attempt does not count as the new child's."""
    clock = FakeClock()
    beat(layout, step=40, pid=9, attempt=1)
    monitor = HeartbeatMonitor(layout, clock=clock)
    monitor.reset(attempt=2, pid=10)
    clock.now = 560.0
    view = monitor.poll(child_started_at=500.0)
    assert view is not None
    assert (view.phase, view.step, view.age) == (Phase.LOAD, 0, 60.0)


def test_age_counts_from_the_last_change_seen(layout: Layout) -> None:
    """Age is zero when content changes and grows while it stays the same."""
    clock = FakeClock()
    monitor = HeartbeatMonitor(layout, clock=clock)
    monitor.reset(attempt=1, pid=10)
    clock.now = 510.0
    beat(layout, step=1, pid=10, attempt=1)
    assert monitor.poll(500.0) == HeartbeatView(
        step=1, max_steps=100, phase=Phase.TRAIN, age=0.0, last_step_seconds=0.5
    )
    clock.now = 525.0
    view = monitor.poll(500.0)
    assert view is not None
    assert (view.step, view.age) == (1, 15.0)
    beat(layout, step=2, pid=10, attempt=1, phase=Phase.SAVE)
    clock.now = 526.0
    view = monitor.poll(500.0)
    assert view is not None
    assert (view.step, view.phase, view.age) == (2, Phase.SAVE, 0.0)


def test_wall_clock_in_the_file_is_not_trusted(layout: Layout) -> None:
    """A heartbeat whose wall time is far in the past is still fresh when it just changed."""
    clock = FakeClock()
    monitor = HeartbeatMonitor(layout, clock=clock)
    monitor.reset(attempt=1, pid=10)
    beat(layout, step=3, pid=10, attempt=1, wall=0.0)  # e.g. the RTC was wrong at boot
    view = monitor.poll(500.0)
    assert view is not None
    assert view.age == 0.0


def test_torn_or_missing_file_keeps_the_last_reading(layout: Layout) -> None:
    """A partial or vanished heartbeat keeps the last good view, whose age keeps growing."""
    clock = FakeClock()
    monitor = HeartbeatMonitor(layout, clock=clock)
    monitor.reset(attempt=1, pid=10)
    beat(layout, step=5, pid=10, attempt=1)
    monitor.poll(500.0)
    layout.heartbeat.write_text('{"step": 6, "pha')
    clock.now = 504.0
    view = monitor.poll(500.0)
    assert view is not None
    assert (view.step, view.age) == (5, 4.0)
    layout.heartbeat.unlink()
    clock.now = 509.0
    view = monitor.poll(500.0)
    assert view is not None
    assert (view.step, view.age) == (5, 9.0)
    beat(layout, step=5, pid=10, attempt=1)  # the same heartbeat again is not news
    clock.now = 510.0
    view = monitor.poll(500.0)
    assert view is not None
    assert view.age == 10.0


def test_writer_identity_by_attempt_or_by_pid(layout: Layout) -> None:
    """A beat naming our attempt counts from any pid (torchrun ranks); else only from our pid."""
    clock = FakeClock()
    monitor = HeartbeatMonitor(layout, clock=clock)
    monitor.reset(attempt=3, pid=10)
    beat(layout, step=1, pid=999, attempt=None)  # a stranger's, without attempt
    view = monitor.poll(500.0)
    assert view is not None
    assert view.phase is Phase.LOAD
    beat(layout, step=1, pid=999, attempt=2)  # an earlier attempt's
    view = monitor.poll(500.0)
    assert view is not None
    assert view.phase is Phase.LOAD
    beat(layout, step=2, pid=1234, attempt=3)  # a rank of our attempt
    view = monitor.poll(500.0)
    assert view is not None
    assert (view.phase, view.step) == (Phase.TRAIN, 2)
    monitor.reset(attempt=4, pid=11)
    beat(layout, step=3, pid=11, attempt=None)  # our pid, no attempt field
    view = monitor.poll(500.0)
    assert view is not None
    assert view.step == 3
