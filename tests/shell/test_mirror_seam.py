"""The ``Mirror`` seam and its fake, held to one contract: what the loop relies on.

The same assertions run against ``RemoteMirror`` on a real ``file://`` remote and
against ``FakeMirror``: restore on an empty disk brings nothing, submits return
at once, every outcome comes back through ``notify``, a drain lands what was
submitted and says so, the lag ends up to date, and close ends every thread.
"""

from __future__ import annotations

import queue
import time
from pathlib import Path

import pytest

from supervisor.config import MirrorConfig
from supervisor.shell.mirror import Job, JobKind, MirrorEvent, Outcome
from supervisor.shell.mirror.seam import Mirror, RemoteMirror
from supervisor.shell.store import CheckpointStore, FileCheckpointStore
from supervisor.shell.testing import FakeCheckpointStore, FakeMirror
from tests.support.checkpoints import make_checkpoint
from trainer_child.protocol import Layout, RunStateFile, atomic_write_model


@pytest.mark.parametrize("kind", ["real", "fake"])
def test_both_mirrors_upload_what_is_submitted_and_report_it(kind: str, tmp_path: Path) -> None:
    """probe, restore (nothing), start, submit, drain: DONE for each job, lag up to date."""
    layout = Layout(tmp_path / "out")
    layout.output_dir.mkdir()
    layout.ensure()
    make_checkpoint(layout.output_dir, 4)
    atomic_write_model(layout.state, RunStateFile())
    mirror: Mirror
    store: CheckpointStore
    if kind == "real":
        config = MirrorConfig(url=(tmp_path / "remote").as_uri())
        mirror = RemoteMirror(config, layout, keep_last=3, keep_best=True, keep_every=None)
        store = FileCheckpointStore(layout.output_dir, require_record=True)
    else:
        mirror = FakeMirror()
        store = FakeCheckpointStore()
    events: queue.SimpleQueue[MirrorEvent] = queue.SimpleQueue()

    mirror.probe()
    report = mirror.restore(store)
    assert (report.downloaded, report.remote_newest, report.final_restored) == (None, None, False)
    mirror.start(events.put)
    started = time.monotonic()
    mirror.submit_checkpoint(4)
    mirror.submit_state()
    assert time.monotonic() - started < 1.0, "a submit must not wait for storage"
    result = mirror.drain(time.monotonic() + 60)
    assert result.complete
    assert result.newest_uploaded == 4
    done = set()
    while not events.empty():
        event = events.get()
        if event.outcome is Outcome.DONE:
            done.add(event.job)
    assert {Job(JobKind.CHECKPOINT, 4), Job(JobKind.STATE)} <= done
    lag = mirror.lag()
    assert (lag.newest_uploaded, lag.behind) == (4, 0)
    assert lag.status_line() == "remote: checkpoint-4, up to date"
    assert mirror.uploading() == frozenset()
    assert mirror.close(10)
