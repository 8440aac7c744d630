"""CheckpointWatcher on a real directory: which changes notify, and how bursts coalesce."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from watchdog.events import DirCreatedEvent, FileCreatedEvent, FileMovedEvent, FileSystemEvent

from supervisor.shell.testing import FakeWatcher
from supervisor.shell.watcher import CheckpointWatcher, Coalescer, Watcher, is_relevant, observe
from trainer_child.protocol import Layout, atomic_write_bytes

#: A safety net for a hung test, not a latency claim: inotify on a loaded box is slow.
NOTIFY_TIMEOUT = 30.0


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


class Recorder:
    """Every relevant event, in the order the observer delivered it (no coalescing)."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.paths: list[str] = []
        self._cond = threading.Condition()

    def __call__(self, event: FileSystemEvent) -> None:
        with self._cond:
            dest = os.fsdecode(event.dest_path)
            self.paths.append(os.path.relpath(dest or os.fsdecode(event.src_path), self.output_dir))
            self._cond.notify_all()

    def wait_for(self, relpath: str, times: int = 1) -> list[str]:
        """Wait until ``relpath`` was reported ``times`` times; return everything up to then.

        The observer reports in the order the kernel queued the events, so
        anything done before ``relpath``'s change has been judged by then.
        """
        with self._cond:
            reported = self._cond.wait_for(
                lambda: self.paths.count(relpath) >= times, NOTIFY_TIMEOUT
            )
            assert reported, self.paths
            return list(self.paths)


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


@pytest.fixture
def observed(tmp_path: Path) -> Iterator[tuple[Layout, Recorder]]:
    """The watcher's own filter on tmp_path (with .warden/ and checkpoint-2/), each event kept."""
    layout = Layout(tmp_path)
    layout.ensure()
    layout.checkpoint(2).mkdir()
    recorder = Recorder(tmp_path)
    observer = observe(str(tmp_path.resolve()), recorder)
    try:
        yield layout, recorder
    finally:
        observer.stop()
        observer.join()


def test_new_checkpoint_folder_notifies(watched: tuple[Layout, Calls]) -> None:
    """Creating checkpoint-N/ calls on_change."""
    layout, calls = watched
    layout.checkpoint(4).mkdir()
    assert calls.wait_beyond(0)


def test_commit_record_rename_notifies(observed: tuple[Layout, Recorder]) -> None:
    """warden.json arriving by tmp + rename inside a checkpoint is a relevant change."""
    layout, recorder = observed
    atomic_write_bytes(layout.checkpoint(2) / "warden.json", b"{}")
    assert recorder.wait_for("checkpoint-2/warden.json") == ["checkpoint-2/warden.json"]


def test_move_to_quarantine_and_delete_notify(observed: tuple[Layout, Recorder]) -> None:
    """A checkpoint renamed into quarantine, or deleted, is a relevant change."""
    layout, recorder = observed
    layout.checkpoint(8).mkdir()
    recorder.wait_for("checkpoint-8")
    os.rename(layout.checkpoint(2), layout.quarantine / "checkpoint-2")
    assert recorder.wait_for(".warden/quarantine/checkpoint-2")[-1].endswith("checkpoint-2")
    layout.checkpoint(8).rmdir()
    assert recorder.wait_for("checkpoint-8", times=2)[-1] == "checkpoint-8"


def test_unrelated_activity_is_ignored(observed: tuple[Layout, Recorder]) -> None:
    """Heartbeats, logs, model shards and stray folders are not reported, only the sentinel."""
    layout, recorder = observed
    for i in range(5):
        atomic_write_bytes(layout.heartbeat, f'{{"step": {i}}}'.encode(), durable=False)
        with (layout.logs / "attempt-1.log").open("a") as handle:
            handle.write("loss 1.0\n")
    (layout.checkpoint(2) / "adapter_model.safetensors").write_bytes(b"x" * 4096)
    (layout.output_dir / "runs").mkdir()
    (layout.output_dir / "checkpoint-2-old").mkdir()
    (layout.output_dir / "checkpoint-05").mkdir()
    layout.checkpoint(99).mkdir()  # the sentinel: everything above was judged before it
    assert recorder.wait_for("checkpoint-99") == ["checkpoint-99"]


def test_a_save_notifies(watched: tuple[Layout, Calls]) -> None:
    """A whole checkpoint save (folder, many files, record) calls on_change."""
    layout, calls = watched
    ckpt = layout.checkpoint(10)
    ckpt.mkdir()
    for i in range(40):
        (ckpt / f"file-{i}.bin").write_bytes(b"y" * 100)
    (ckpt / "trainer_state.json").write_text("{}")
    atomic_write_bytes(ckpt / "warden.json", b"{}")
    assert calls.wait_beyond(0)


def test_a_burst_is_folded_into_one_call_while_a_call_runs() -> None:
    """Pokes that land while on_change runs (a save's dozens of files) give one more call."""
    entered, release = threading.Event(), threading.Event()
    calls = Calls()

    def on_change() -> None:
        calls()
        entered.set()
        assert release.wait(NOTIFY_TIMEOUT)

    coalescer = Coalescer(on_change, window=0.01)
    coalescer.start()
    try:
        coalescer.poke()
        assert entered.wait(NOTIFY_TIMEOUT)
        for _ in range(40):
            coalescer.poke()
        release.set()
        assert calls.wait_beyond(1)  # the trailing call: the burst's last change is not lost
    finally:
        release.set()
        coalescer.stop()  # joined: no call can come after this
    assert calls.count == 2


@pytest.mark.parametrize("kind", ["inotify", "fake"])
def test_both_watchers_call_back_only_between_start_and_stop(kind: str, tmp_path: Path) -> None:
    """CheckpointWatcher and FakeWatcher alike: a change counts only while started."""
    layout = Layout(tmp_path)
    calls = Calls()
    fake = FakeWatcher(calls)
    watcher: Watcher = fake if kind == "fake" else CheckpointWatcher(tmp_path, calls)
    step = iter(range(1, 100))

    def change() -> None:
        if kind == "fake":
            fake.trigger()
        else:
            layout.checkpoint(next(step)).mkdir()

    change()
    watcher.start()
    change()
    assert calls.wait_beyond(0)
    watcher.stop()  # joins the real watcher's threads
    change()
    assert calls.count == 1


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
