"""FileJournal: JSON lines, atomic state, rotation, and surviving a full disk."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from supervisor.core.model import FailureKind
from supervisor.shell import journal as journal_mod
from supervisor.shell.journal import FileJournal, Journal, read_events, read_state
from supervisor.shell.testing import FakeJournal
from tests.support.capabilities import require
from trainer_child.protocol import Layout, RunStateFile, atomic_write_model

REPO = Path(__file__).resolve().parents[2]


def test_append_writes_one_json_line_per_event(tmp_path: Path) -> None:
    """Each append is one JSON line with ts, event, attempt and the fields given."""
    layout = Layout(tmp_path)
    journal = FileJournal(layout, wall_clock=lambda: 1234.5)
    assert journal.append("launch", 1, resume_from=None)
    assert journal.append("failure", 1, kind=FailureKind.HOST_OOM, step=40, path=tmp_path)
    lines = layout.events.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"ts": 1234.5, "event": "launch", "attempt": 1, "resume_from": None},
        {
            "ts": 1234.5,
            "event": "failure",
            "attempt": 1,
            "kind": "host_oom",
            "step": 40,
            "path": str(tmp_path),  # not JSON-encodable: written as str
        },
    ]
    entries = read_events(layout)
    assert [(e.event, e.kind) for e in entries] == [("launch", None), ("failure", "host_oom")]
    assert entries[1].model_extra == {"step": 40, "path": str(tmp_path)}


def test_state_round_trips_and_missing_state_reads_none(tmp_path: Path) -> None:
    """write_state replaces state.json atomically; read_state returns it, or None if absent."""
    layout = Layout(tmp_path)
    assert read_state(layout) is None
    layout.ensure()
    journal = FileJournal(layout)
    assert journal.write_state(RunStateFile(attempts=2, status="running"))
    assert journal.write_state(RunStateFile(attempts=3, status="backoff"))
    state = read_state(layout)
    assert state is not None
    assert (state.attempts, state.status) == (3, "backoff")
    assert list(layout.warden.glob("*.tmp")) == []


def test_journal_rotates_past_its_cap(tmp_path: Path) -> None:
    """Past max_bytes events.jsonl moves to events.jsonl.1; reading returns both in order."""
    layout = Layout(tmp_path)
    journal = FileJournal(layout, max_bytes=2000)
    for i in range(40):
        assert journal.append("tick", 1, i=i, pad="x" * 40)
    rotated = layout.events.with_name("events.jsonl.1")
    assert rotated.exists()
    assert layout.events.stat().st_size <= 2000
    assert rotated.stat().st_size <= 2000
    numbers = [e.model_extra["i"] for e in read_events(layout) if e.model_extra]
    assert numbers == sorted(numbers)
    assert numbers[-1] == 39


def test_read_events_skips_torn_lines(tmp_path: Path) -> None:
    """A torn last line (a crash mid-write) is skipped, the rest is read."""
    layout = Layout(tmp_path)
    layout.ensure()
    layout.events.write_text('{"ts": 1, "event": "a", "attempt": 1}\n{"ts": 2, "ev')
    assert [e.event for e in read_events(layout)] == ["a"]


def test_enospc_is_held_in_backlog_and_flushed_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC never raises: entries wait in memory, are reported once, and land in order later."""
    layout = Layout(tmp_path)
    reports: list[OSError] = []
    journal = FileJournal(layout, on_full=reports.append)
    assert journal.append("launch", 1)
    full = True
    real_write = os.write
    real_atomic = atomic_write_model

    def write(fd: int, data: Any) -> int:
        # Fail only writes to the journal, like a disk that filled up.
        if full and os.readlink(f"/proc/self/fd/{fd}").endswith("events.jsonl"):
            half = real_write(fd, bytes(data)[:10])  # a short write, then the error
            assert half == 10
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    def atomic(path: Any, model: Any, **kwargs: Any) -> None:
        if full:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        real_atomic(path, model, **kwargs)

    # journal.py calls os.write through the os module: patch it there, filtered by fd.
    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(journal_mod, "atomic_write_model", atomic)
    assert not journal.append("failure", 1, kind="disk_full")
    assert not journal.append("backoff", 1)
    assert not journal.write_state(RunStateFile(attempts=1, status="waiting for disk"))
    assert journal.backlog == 2
    assert journal.full
    assert len(reports) == 1  # reported once per episode
    # The partial line was cut back: the file is still valid JSON lines.
    assert [e.event for e in read_events(layout)] == ["launch"]
    assert layout.events.read_text().count("\n") == 1

    full = False
    assert journal.append("launch", 2)
    assert [e.event for e in read_events(layout)] == ["launch", "failure", "backoff", "launch"]
    state = read_state(layout)
    assert state is not None
    assert state.status == "waiting for disk"
    assert journal.backlog == 0
    assert not journal.full


def test_backlog_is_bounded_and_overflow_is_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond the backlog limit the oldest entries go, and a journal_overflow line says how many."""
    layout = Layout(tmp_path)
    journal = FileJournal(layout, backlog_limit=3)
    real_write = os.write
    full = True

    def write(fd: int, data: Any) -> int:
        if full and os.readlink(f"/proc/self/fd/{fd}").endswith("events.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    for i in range(5):
        assert not journal.append("tick", 1, i=i)
    assert journal.backlog == 3
    full = False
    assert journal.flush()
    entries = read_events(layout)
    assert entries[0].event == "journal_overflow"
    assert entries[0].model_extra == {"dropped": 2}
    assert [e.model_extra["i"] for e in entries[1:] if e.model_extra] == [2, 3, 4]


def test_other_oserrors_are_raised(tmp_path: Path) -> None:
    """A journal that cannot be written for a reason other than space raises."""
    layout = Layout(tmp_path)
    layout.ensure()
    layout.events.mkdir()  # opening a directory for append fails with EISDIR
    with pytest.raises(IsADirectoryError):
        FileJournal(layout).append("launch", 1)


@dataclass
class JournalUnderTest:
    """A journal, a switch that fills its disk, and what it has written so far."""

    journal: Journal
    fill: Callable[[bool], None]
    written: Callable[[], list[str]]
    reports: Callable[[], int]


@pytest.fixture(params=["file", "fake"])
def any_journal(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> JournalUnderTest:
    """FileJournal on a disk made full by failing its writes with ENOSPC, or FakeJournal."""
    if request.param == "fake":
        fake = FakeJournal(wall_clock=lambda: 1.0)

        def fill_fake(full: bool) -> None:
            fake.full = full

        return JournalUnderTest(fake, fill_fake, fake.events, lambda: fake.full_reports)
    layout = Layout(tmp_path)
    reports: list[OSError] = []
    journal = FileJournal(layout, on_full=reports.append)
    full = [False]
    real_write, real_atomic = os.write, atomic_write_model

    def write(fd: int, data: Any) -> int:
        if full[0] and os.readlink(f"/proc/self/fd/{fd}").endswith("events.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    def atomic(path: Any, model: Any, **kwargs: Any) -> None:
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_atomic(path, model, **kwargs)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(journal_mod, "atomic_write_model", atomic)

    def fill_file(value: bool) -> None:
        full[0] = value

    def written() -> list[str]:
        return [e.event for e in read_events(layout)]

    return JournalUnderTest(journal, fill_file, written, lambda: len(reports))


def test_both_journals_hold_entries_on_a_full_disk_and_release_them_in_order(
    any_journal: JournalUnderTest,
) -> None:
    """FileJournal and its fake alike: held back while full, reported once, written in order."""
    under_test = any_journal
    journal = under_test.journal
    assert journal.append("launch", 1)
    under_test.fill(True)
    assert not journal.append("failure", 1, kind="disk_full")
    assert not journal.write_state(RunStateFile(attempts=1, status="waiting for disk"))
    assert journal.backlog == 1
    assert under_test.reports() == 1
    assert under_test.written() == ["launch"]
    under_test.fill(False)
    assert journal.append("launch", 2)
    assert journal.backlog == 0
    assert under_test.written() == ["launch", "failure", "launch"]
    state = journal.read_state()
    assert state is not None
    assert state.status == "waiting for disk"


ENOSPC_SCRIPT = """
import errno, json, os, sys
from pathlib import Path
from supervisor.shell.disk import StatvfsDisk
from supervisor.shell.journal import FileJournal, read_events, read_state
from trainer_child.protocol import Layout, RunStateFile

root = Path(sys.argv[1])
layout = Layout(root / "out")
layout.ensure()
reports = []
journal = FileJournal(layout, on_full=reports.append)
assert journal.append("launch", 1)

# Fill the filesystem to the last page.
filler = root / "filler"
with open(filler, "wb", buffering=0) as handle:
    for size in (4096, 1):
        while True:
            try:
                handle.write(b"x" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break

free_when_full = StatvfsDisk(root).usage().free
results = []
for i in range(20):
    results.append(journal.append("failure", 1, kind="disk_full", i=i, pad="y" * 600))
results.append(journal.write_state(RunStateFile(attempts=1, status="waiting for disk")))
held = journal.backlog
os.unlink(filler)
after = journal.append("launch", 2)
events = read_events(layout)
lines = layout.events.read_bytes().splitlines()
summary = {
    "results": results,
    "held": held,
    "reports": len(reports),
    "after": after,
    "events": [e.event for e in events],
    "numbers": [e.model_extra.get("i") for e in events if e.event == "failure"],
    "lines_parse": all(json.loads(line) for line in lines),
    "state": read_state(layout).status,
    "backlog": journal.backlog,
    "free_when_full": free_when_full,
}
Path(sys.argv[2]).write_text(json.dumps(summary))
"""


@pytest.mark.system
def test_real_enospc_on_a_tiny_tmpfs(tmp_path: Path) -> None:
    """On a really full tmpfs the journal raises nothing, reports once, flushes once freed."""
    require("root", "unshare")
    script = tmp_path / "fill.py"
    script.write_text(textwrap.dedent(ENOSPC_SCRIPT))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = tmp_path / "result.json"
    shell = (
        f"mount -t tmpfs -o size=64k tmpfs {mnt} && exec {sys.executable} {script} {mnt} {result}"
    )
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", shell],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(result.read_text())
    assert False in out["results"]  # the disk really was full
    assert out["held"] > 0, out
    assert out["reports"] == 1
    assert out["after"] is True
    assert out["backlog"] == 0
    assert out["numbers"] == list(range(20))  # nothing lost, order kept
    assert out["events"][0] == "launch"
    assert out["events"][-1] == "launch"
    assert out["lines_parse"]
    assert out["state"] == "waiting for disk"
    assert out["free_when_full"] == 0  # StatvfsDisk sees the same full disk
