"""CheckpointWatcher on a real directory: which changes notify, and how bursts coalesce."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from watchdog.events import DirCreatedEvent, FileCreatedEvent, FileMovedEvent

from supervisor.shell.watcher import CheckpointWatcher, FakeWatcher, Watcher, is_relevant
from trainer_child.protocol import Layout, atomic_write_bytes

#: Long enough for inotify + the 0.1 s coalescing window on a loaded 2-core box.
NOTIFY_TIMEOUT = 5.0
#: How long we listen to be sure nothing arrives.
QUIET = 0.4


class Calls:
    """Counts on_change calls and lets a test wait for the next one."""

    def __init__(self) -> None:
        self.count = 0
        self._cond = threading.Condition()

    def __call__(self) -> None:
        with self._cond:
            self.count += 1
            self._cond.notify_all()

    def wait_beyond(self, seen: int, timeout: float = NOTIFY_TIMEOUT) -> bool:
        """Wait until more than ``seen`` calls happened."""
        with self._cond:
            return self._cond.wait_for(lambda: self.count > seen, timeout)

    def settle(self) -> int:
        """Wait for a quiet spell and return the count."""
        time.sleep(QUIET)
        return self.count


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Layout, Calls]]:
    """A started watcher on tmp_path (with .warden/), stopped and joined at teardown."""
    layout = Layout(tmp_path)
    layout.ensure()
    calls = Calls()
    watcher = CheckpointWatcher(tmp_path, calls)
    watcher.start()
    try:
        yield layout, calls
    finally:
        watcher.stop()


def test_new_checkpoint_folder_notifies(watched: tuple[Layout, Calls]) -> None:
    """Creating checkpoint-N/ calls on_change."""
    layout, calls = watched
    layout.checkpoint(2).mkdir()
    assert calls.wait_beyond(0)


def test_commit_record_rename_notifies(watched: tuple[Layout, Calls]) -> None:
    """warden.json arriving by tmp + rename inside a checkpoint calls on_change."""
    layout, calls = watched
    layout.checkpoint(4).mkdir()
    assert calls.wait_beyond(0)
    seen = calls.settle()
    atomic_write_bytes(layout.checkpoint(4) / "warden.json", b"{}")
    assert calls.wait_beyond(seen)


def test_move_to_quarantine_and_delete_notify(watched: tuple[Layout, Calls]) -> None:
    """A checkpoint renamed into quarantine, or deleted, calls on_change."""
    layout, calls = watched
    layout.checkpoint(6).mkdir()
    layout.checkpoint(8).mkdir()
    assert calls.wait_beyond(0)
    seen = calls.settle()
    os.rename(layout.checkpoint(6), layout.quarantine / "checkpoint-6")
    assert calls.wait_beyond(seen)
    seen = calls.settle()
    layout.checkpoint(8).rmdir()
    assert calls.wait_beyond(seen)


def test_unrelated_activity_is_ignored(watched: tuple[Layout, Calls]) -> None:
    """Heartbeats, logs, model shards and stray folders do not call on_change."""
    layout, calls = watched
    layout.checkpoint(2).mkdir()
    assert calls.wait_beyond(0)
    seen = calls.settle()
    for i in range(5):
        atomic_write_bytes(layout.heartbeat, f'{{"step": {i}}}'.encode(), durable=False)
        with (layout.logs / "attempt-1.log").open("a") as handle:
            handle.write("loss 1.0\n")
    (layout.checkpoint(2) / "adapter_model.safetensors").write_bytes(b"x" * 4096)
    (layout.output_dir / "runs").mkdir()
    (layout.output_dir / "checkpoint-2-old").mkdir()
    assert calls.settle() == seen


def test_save_burst_is_coalesced(watched: tuple[Layout, Calls]) -> None:
    """A whole checkpoint save (folder, many files, record) gives a few calls, not dozens."""
    layout, calls = watched
    ckpt = layout.checkpoint(10)
    ckpt.mkdir()
    for i in range(40):
        (ckpt / f"file-{i}.bin").write_bytes(b"y" * 100)
    (ckpt / "trainer_state.json").write_text("{}")
    atomic_write_bytes(ckpt / "warden.json", b"{}")
    assert calls.wait_beyond(0)
    assert 1 <= calls.settle() <= 3


def test_start_on_missing_dir_raises_and_leaks_nothing(tmp_path: Path) -> None:
    """Starting on a folder that does not exist raises OSError and leaves no thread behind."""
    watcher = CheckpointWatcher(tmp_path / "missing", lambda: None)
    with pytest.raises(OSError):
        watcher.start()
    watcher.stop()  # harmless after a failed start


def test_is_relevant_classifies_paths(tmp_path: Path) -> None:
    """Only checkpoint-N/, final/ and their commit markers matter; moves count on either side."""
    out = str(tmp_path)
    assert is_relevant(out, DirCreatedEvent(f"{out}/checkpoint-3"))
    assert is_relevant(out, FileCreatedEvent(f"{out}/checkpoint-3/trainer_state.json"))
    assert is_relevant(out, FileMovedEvent(f"{out}/final/.w.tmp", f"{out}/final/warden.json"))
    assert is_relevant(
        out, FileMovedEvent(f"{out}/checkpoint-3", f"{out}/.warden/quarantine/checkpoint-3")
    )
    assert not is_relevant(out, FileCreatedEvent(f"{out}/checkpoint-3/model.safetensors"))
    assert not is_relevant(out, FileCreatedEvent(f"{out}/.warden/heartbeat.json"))
    assert not is_relevant(out, DirCreatedEvent(f"{out}/checkpoint-3/sub/warden.json"))
    assert not is_relevant(out, DirCreatedEvent(f"{out}-other/checkpoint-3"))
    assert not is_relevant(out, DirCreatedEvent(out))


def test_fake_watcher_triggers_only_while_running() -> None:
    """FakeWatcher calls on_change on trigger() between start() and stop()."""
    calls = Calls()
    fake: Watcher = FakeWatcher(calls)
    assert isinstance(fake, FakeWatcher)
    fake.trigger()
    fake.start()
    fake.trigger()
    fake.stop()
    fake.trigger()
    assert calls.count == 1
