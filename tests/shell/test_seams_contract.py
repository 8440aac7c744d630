"""The remaining seams and their fakes, held to one contract: what the loop relies on.

Each test runs the same assertions against the real implementation (on real
files, the real lock, real signals) and its fake from ``supervisor/shell/testing.py``.
"""

from __future__ import annotations

import os
import queue
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.core.model import Evidence
from supervisor.shell import signals
from supervisor.shell.evidence import EvidenceSource, FileEvidence
from supervisor.shell.heartbeat import HeartbeatMonitor, HeartbeatSource
from supervisor.shell.lock import Lock, RunLock
from supervisor.shell.procs import Peers, ProcPeers
from supervisor.shell.rundir import FileRunDir, RunDir
from supervisor.shell.testing import (
    FakeEvidence,
    FakeHeartbeat,
    FakeLock,
    FakePeers,
    FakeRunDir,
    FakeSignals,
)
from trainer_child.protocol import JobFile, Layout, Phase, read_model

KINDS = ["real", "fake"]


class ManualClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("kind", KINDS)
def test_both_locks_are_taken_handed_on_and_let_go(kind: str, tmp_path: Path) -> None:
    """acquire when free; held with a descriptor to pass on; release; no descriptor then."""
    lock: Lock = RunLock(tmp_path / "lock") if kind == "real" else FakeLock()
    held = [lock.held]
    assert lock.acquire()
    assert lock.acquire()  # idempotent
    held.append(lock.held)
    assert isinstance(lock.fd, int)
    lock.release()
    held.append(lock.held)
    assert held == [False, True, False]
    with pytest.raises(RuntimeError):
        _ = lock.fd


@pytest.mark.parametrize("kind", KINDS)
def test_both_run_dirs_put_the_job_file_where_the_child_reads_it(kind: str, tmp_path: Path) -> None:
    """write_job returns .warden/job.json of the output_dir; prepare and note never fail."""
    layout = Layout(tmp_path / "out")
    run_dir: RunDir = FileRunDir(layout) if kind == "real" else FakeRunDir(layout.output_dir)
    run_dir.prepare()
    run_dir.prepare()
    job = JobFile.model_validate({"output_dir": str(layout.output_dir), "train": {}})
    assert run_dir.write_job(job) == layout.job
    run_dir.note(1, "attempt 1: resume_from=- argv=[]")
    if kind == "real":
        assert read_model(layout.job, JobFile) == job
        assert (
            layout.attempt_log(1).read_text() == "# trainwarden attempt 1: resume_from=- argv=[]\n"
        )


@pytest.mark.parametrize("kind", KINDS)
def test_both_evidence_sources_know_nothing_of_a_child_that_left_nothing(
    kind: str, tmp_path: Path
) -> None:
    """No error.json, no log, no OOM: the evidence is empty, for the real source and the fake."""
    layout = Layout(tmp_path / "out")
    FileRunDir(layout).prepare()
    source: EvidenceSource = FileEvidence(layout) if kind == "real" else FakeEvidence()
    source.forget()
    source.watch(os.getpid())
    assert source.gather(os.getpid(), 1, None) == Evidence()


@pytest.mark.parametrize("kind", KINDS)
def test_both_heartbeats_report_loading_until_the_child_writes(kind: str, tmp_path: Path) -> None:
    """Nothing before reset; after it, phase load at step 0, aged from the child's start."""
    clock = ManualClock()
    layout = Layout(tmp_path)
    layout.ensure()
    source: HeartbeatSource = (
        HeartbeatMonitor(layout, clock=clock) if kind == "real" else FakeHeartbeat(clock=clock)
    )
    assert source.poll(90.0) is None
    source.reset(1, os.getpid())
    clock.now = 130.0
    view = source.poll(100.0)
    assert view is not None
    assert (view.phase, view.step, view.age) == (Phase.LOAD, 0, 30.0)


@pytest.mark.parametrize("kind", KINDS)
def test_both_peers_see_no_one_without_a_state_file(kind: str, tmp_path: Path) -> None:
    """Without state.json there is no peer supervisor and no orphan to wait for."""
    peers: Peers = ProcPeers(Layout(tmp_path)) if kind == "real" else FakePeers()
    assert not peers.supervisor_alive(None)
    assert peers.find_orphan(None) is None


@pytest.fixture
def restore_handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in signals.HANDLED}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.usefixtures("restore_handlers")
@pytest.mark.parametrize("kind", KINDS)
def test_both_signal_installers_turn_a_stop_signal_into_one_queued_event(kind: str) -> None:
    """SIGINT becomes make_event("SIGINT") on the queue; restore() undoes the installation."""
    events: queue.SimpleQueue[object] = queue.SimpleQueue()
    fake = FakeSignals()
    install = signals.install if kind == "real" else fake
    restore = install(events.put, lambda name: ("stop", name))
    if kind == "real":
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next bytecode
    else:
        fake.deliver("SIGINT")
    assert events.get(timeout=30) == ("stop", "SIGINT")
    assert events.empty()
    restore()
    if kind == "real":
        assert signal.getsignal(signal.SIGINT) is not None
    else:
        with pytest.raises(RuntimeError):
            fake.deliver("SIGINT")
