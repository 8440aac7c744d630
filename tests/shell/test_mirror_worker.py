"""MirrorWorker with real storage: ordering, retries through a real outage, drain, close.

Every wait is for an event the worker reports (or a state it reaches), never a
sleep followed by an assertion. The outage test stops a real SeaweedFS server by
PID and starts it again on the same data dir and ports.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from supervisor.shell.mirror import (
    Job,
    JobKind,
    MirrorEvent,
    MirrorWorker,
    Outcome,
    RemoteStore,
)
from tests.support.checkpoints import make_checkpoint, make_final
from tests.support.seaweed import BUCKET, running_seaweed
from trainer_child.protocol import Layout, RunStateFile, atomic_write_model

Events = queue.SimpleQueue[MirrorEvent]


def events_until(
    events: Events, done: Callable[[list[MirrorEvent]], bool], timeout: float = 60.0
) -> list[MirrorEvent]:
    """Collect reported events until ``done(collected)``; fail after ``timeout`` seconds."""
    collected: list[MirrorEvent] = []
    deadline = time.monotonic() + timeout
    while not done(collected):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out; events so far: {collected}")
        try:
            collected.append(events.get(timeout=remaining))
        except queue.Empty:
            continue
    return collected


def finished(job: Job, outcome: Outcome = Outcome.DONE) -> Callable[[list[MirrorEvent]], bool]:
    return lambda seen: any(e.job == job and e.outcome is outcome for e in seen)


def ckpt(step: int) -> Job:
    return Job(JobKind.CHECKPOINT, step)


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path / "out")
    layout.output_dir.mkdir()
    layout.ensure()
    return layout


def file_remote(tmp_path: Path) -> RemoteStore:
    return RemoteStore((tmp_path / "mirror").as_uri())


def unreachable_remote(tmp_path: Path) -> RemoteStore:
    """A file:// mirror below a regular file: every operation fails, as with storage down."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    return RemoteStore((blocker / "mirror").as_uri())


def test_jobs_run_most_urgent_first_and_report_done(tmp_path: Path, layout: Layout) -> None:
    """final, then checkpoints newest first, then state, then prune; lag reads up to date."""
    remote = file_remote(tmp_path)
    for step in (2, 4, 6):
        make_checkpoint(layout.output_dir, step)
    make_final(layout.output_dir)
    atomic_write_model(layout.state, RunStateFile(attempts=1))
    events: Events = queue.SimpleQueue()
    worker = MirrorWorker(remote, layout, events.put, concurrency=2)
    for step in (2, 4, 6):
        worker.submit_checkpoint(step)
        worker.submit_checkpoint(step)  # coalesces
    worker.submit_prune()
    worker.submit_state()
    worker.submit_final()
    assert worker.lag().pending == 6
    assert worker.steps_in_transfer() == {2, 4, 6}
    with worker.start():
        seen = events_until(events, lambda seen: len(seen) == 6)
        lag = worker.lag()
    order = [str(event.job) for event in seen]
    assert order == [
        "upload final",
        "upload checkpoint 6",
        "upload checkpoint 4",
        "upload checkpoint 2",
        "upload state",
        "prune",
    ]
    assert all(event.outcome is Outcome.DONE for event in seen)
    checkpoint_events = [e for e in seen if e.job.kind is JobKind.CHECKPOINT]
    assert all(e.bytes > 0 for e in checkpoint_events)
    assert all(e.latency is not None and e.latency >= e.seconds for e in checkpoint_events)
    assert (lag.newest_uploaded, lag.behind, lag.pending) == (6, 0, 0)
    assert lag.status_line() == "remote: checkpoint-6, up to date"
    inventory = remote.inventory()
    assert inventory.valid_steps() == [2, 4, 6]
    assert inventory.final_complete
    assert inventory.state_present


def test_keep_last_drops_superseded_uploads_and_prunes(tmp_path: Path, layout: Layout) -> None:
    """keep_last=1: of three queued checkpoints only the newest goes up; the remote keeps one."""
    remote = file_remote(tmp_path)
    old = make_checkpoint(tmp_path / "earlier", 1)
    remote.upload_checkpoint(old, 1)
    for step in (2, 4, 6):
        make_checkpoint(layout.output_dir, step)
    events: Events = queue.SimpleQueue()
    worker = MirrorWorker(remote, layout, events.put, keep_last=1, newest_uploaded=1)
    assert worker.lag().status_line() == "remote: checkpoint-1, up to date"
    for step in (2, 4, 6):
        worker.submit_checkpoint(step)
    assert worker.lag().status_line() == "remote: checkpoint-1, 3 behind"
    with worker.start():
        seen = events_until(events, finished(Job(JobKind.PRUNE)))
    outcomes = {str(e.job): e.outcome for e in seen}
    assert outcomes == {
        "upload checkpoint 2": Outcome.DROPPED,
        "upload checkpoint 4": Outcome.DROPPED,
        "upload checkpoint 6": Outcome.DONE,
        "prune": Outcome.DONE,
    }
    prune = next(e for e in seen if e.job.kind is JobKind.PRUNE)
    assert prune.pruned is not None
    assert prune.pruned.removed == (1,)
    assert remote.inventory().valid_steps() == [6]


def test_a_queued_checkpoint_that_keep_every_keeps_is_never_dropped(
    tmp_path: Path, layout: Layout
) -> None:
    """keep_last=1, keep_every=4: checkpoint-4 is older than 6 but the remote must hold it."""
    remote = file_remote(tmp_path)
    for step in (2, 4, 6):
        make_checkpoint(layout.output_dir, step)
    events: Events = queue.SimpleQueue()
    worker = MirrorWorker(remote, layout, events.put, keep_last=1, keep_every=4)
    for step in (2, 4, 6):
        worker.submit_checkpoint(step)
    with worker.start():
        seen = events_until(events, finished(Job(JobKind.PRUNE)))
    outcomes = {str(e.job): e.outcome for e in seen}
    assert outcomes["upload checkpoint 2"] is Outcome.DROPPED
    assert outcomes["upload checkpoint 4"] is Outcome.DONE
    assert outcomes["upload checkpoint 6"] is Outcome.DONE
    assert remote.inventory().valid_steps() == [4, 6]


def test_outage_is_retried_with_backoff_and_the_worker_catches_up(
    tmp_path: Path, layout: Layout
) -> None:
    """S3 killed mid-run: uploads back off, the lag shows it, and all land once it is back."""
    with running_seaweed(tmp_path / "server") as server:
        remote = RemoteStore(f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}", server.storage_options())
        events: Events = queue.SimpleQueue()
        worker = MirrorWorker(
            remote, layout, events.put, backoff_initial=0.05, backoff_max=0.4
        ).start()
        try:
            make_checkpoint(layout.output_dir, 2)
            worker.submit_checkpoint(2)
            events_until(events, finished(ckpt(2)))

            server.kill()
            for step in (4, 6):
                make_checkpoint(layout.output_dir, step)
                worker.submit_checkpoint(step)
            failures = events_until(
                events, lambda seen: sum(e.outcome is Outcome.RETRYING for e in seen) >= 4
            )
            lag = worker.lag()
            assert (lag.newest_uploaded, lag.behind) == (2, 2)
            assert lag.last_error is not None
            assert lag.status_line().startswith("remote: checkpoint-2, 2 behind, retrying in")
            delays = [e.retry_in for e in failures if e.retry_in is not None]
            assert delays[0] < delays[-1] <= 0.4  # exponential, capped
            assert [e.attempt for e in failures if e.job == ckpt(6)][:2] == [1, 2]

            server.start()
            seen = events_until(events, finished(ckpt(4)))
            done = [e.job for e in seen if e.outcome is Outcome.DONE]
            assert done.index(ckpt(6)) < done.index(ckpt(4))  # newest first
            lag = worker.lag()
            assert (lag.newest_uploaded, lag.behind, lag.last_error) == (6, 0, None)
            assert remote.inventory().valid_steps() == [2, 4, 6]
        finally:
            assert worker.close(timeout=30)


def test_drain_drops_prunes_and_reports_what_is_left(tmp_path: Path, layout: Layout) -> None:
    """drain: prunes are skipped, the deadline is honoured, and a later drain completes."""
    remote = file_remote(tmp_path)
    make_checkpoint(layout.output_dir, 8)
    events: Events = queue.SimpleQueue()
    worker = MirrorWorker(remote, layout, events.put)
    worker.submit_prune()
    worker.submit_checkpoint(8)
    try:
        # Not started yet: nothing can finish before the deadline.
        early = worker.drain(deadline=time.monotonic() + 0.2)
        assert not early.complete
        assert early.left == (ckpt(8),)
        assert events.get(timeout=5).outcome is Outcome.DROPPED

        worker.start()
        result = worker.drain(deadline=time.monotonic() + 60)
        assert result.complete
        assert result.newest_uploaded == 8
        assert result.left == ()
        assert remote.inventory().valid_steps() == [8]
    finally:
        assert worker.close(timeout=30)


class GatedRemote(RemoteStore):
    """A real file:// store whose uploads of one folder wait at a gate, file by file."""

    def __init__(self, url: str, gated: str) -> None:
        super().__init__(url)
        self.gated = gated
        self.entered = threading.Event()
        self.gate = threading.Event()

    def _put_file(self, source: Path, dest: str) -> None:
        if f"/{self.gated}/" in dest:
            self.entered.set()
            assert self.gate.wait(timeout=60), "gate never opened"
        super()._put_file(source, dest)


def test_drain_sets_an_older_upload_aside_for_the_emergency_checkpoint(
    tmp_path: Path, layout: Layout
) -> None:
    """SIGTERM path: checkpoint-2 mid-upload yields to emergency checkpoint-4, then resumes."""
    remote = GatedRemote((tmp_path / "mirror").as_uri(), gated="checkpoint-2")
    for step in (2, 4):
        make_checkpoint(layout.output_dir, step)
    events: Events = queue.SimpleQueue()
    results: list[Any] = []
    with MirrorWorker(remote, layout, events.put, concurrency=1) as worker:
        worker.submit_checkpoint(2)
        assert remote.entered.wait(timeout=30)
        worker.submit_checkpoint(4)  # the emergency checkpoint
        worker.submit_prune()
        drainer = threading.Thread(
            target=lambda: results.append(worker.drain(deadline=time.monotonic() + 60))
        )
        drainer.start()
        # drain drops the prune after setting checkpoint-2 aside: then open the gate.
        events_until(events, finished(Job(JobKind.PRUNE), Outcome.DROPPED))
        remote.gate.set()
        drainer.join(timeout=60)
    done = [e.job for e in events_until(events, finished(ckpt(2))) if e.outcome is Outcome.DONE]
    assert done == [ckpt(4), ckpt(2)]
    assert results[0].complete
    assert remote.inventory().valid_steps() == [2, 4]


def test_drain_against_unreachable_storage_ends_at_the_deadline(
    tmp_path: Path, layout: Layout
) -> None:
    """Storage down during the grace: retries come fast, drain returns at its deadline."""
    make_checkpoint(layout.output_dir, 8)
    events: Events = queue.SimpleQueue()
    worker = MirrorWorker(
        unreachable_remote(tmp_path), layout, events.put, backoff_initial=30, backoff_max=60
    ).start()
    try:
        worker.submit_checkpoint(8)
        first = events_until(events, finished(ckpt(8), Outcome.RETRYING))[-1]
        assert first.retry_in is not None
        assert first.retry_in >= 30
        result = worker.drain(deadline=time.monotonic() + 1.0)
        assert not result.complete
        assert result.left == (ckpt(8),)
        retried = events_until(events, finished(ckpt(8), Outcome.RETRYING))
        assert all(e.retry_in is not None and e.retry_in <= 0.5 for e in retried)
    finally:
        assert worker.close(timeout=30)


def test_local_checkpoint_gone_fails_without_retry(tmp_path: Path, layout: Layout) -> None:
    """A checkpoint pruned locally before upload is reported FAILED once, never retried."""
    events: Events = queue.SimpleQueue()
    with MirrorWorker(file_remote(tmp_path), layout, events.put) as worker:
        worker.submit_checkpoint(99)
        seen = events_until(events, finished(ckpt(99), Outcome.FAILED))
        lag = worker.lag()
    assert [e.outcome for e in seen] == [Outcome.FAILED]
    assert "does not exist" in (seen[0].error or "")
    assert lag.retry_in is None
    assert lag.behind == 1


def test_a_failing_handler_does_not_stop_uploads(tmp_path: Path, layout: Layout) -> None:
    """notify raising is logged; the next job still runs and reports."""
    make_checkpoint(layout.output_dir, 2)
    atomic_write_model(layout.state, RunStateFile())
    events: Events = queue.SimpleQueue()

    def notify(event: MirrorEvent) -> None:
        events.put(event)
        if event.job.kind is JobKind.CHECKPOINT:
            raise RuntimeError("handler bug")

    with MirrorWorker(file_remote(tmp_path), layout, notify) as worker:
        worker.submit_checkpoint(2)
        worker.submit_state()
        events_until(events, finished(Job(JobKind.STATE)))


def test_close_while_backing_off_joins_every_thread(tmp_path: Path, layout: Layout) -> None:
    """close() does not wait out a long backoff; the leak check sees no thread left."""
    make_checkpoint(layout.output_dir, 2)
    events: Events = queue.SimpleQueue()
    worker = MirrorWorker(
        unreachable_remote(tmp_path), layout, events.put, backoff_initial=300, backoff_max=600
    ).start()
    worker.submit_checkpoint(2)
    events_until(events, finished(ckpt(2), Outcome.RETRYING))
    assert worker.lag().retry_in is not None
    assert worker.close(timeout=10)
