"""The remote mirror's storage layer against real storage: SeaweedFS S3 on loopback and file://.

Nothing here mocks storage: the S3 tests talk to a real ``weed server -s3`` through
s3fs, the file:// tests to a real folder. Checkpoints come from
``tests.support.checkpoints`` (real formats, real commit records, no training).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from supervisor.core.model import Integrity
from supervisor.shell.mirror import (
    MirrorError,
    ProbeFailed,
    RemoteCorrupt,
    RemoteStatus,
    RemoteStore,
    restore,
)
from supervisor.shell.store import FileCheckpointStore
from supervisor.shell.verify import verify_checkpoint, verify_final
from tests.support.checkpoints import OPTIMIZER, make_checkpoint, make_final
from tests.support.processes import REPO_ROOT, wait_for
from tests.support.seaweed import BUCKET, SECRET_KEY, SeaweedS3
from trainer_child.protocol import (
    COMMIT_RECORD,
    EXIT_CONFIG,
    Layout,
    RunStateFile,
    atomic_write_model,
    file_digest,
    read_model,
)

T = TypeVar("T")

Factory = Callable[[], RemoteStore]


@pytest.fixture(autouse=True, scope="module")
def _server_first(seaweed: SeaweedS3) -> SeaweedS3:
    """Start the S3 server before any test's leak check takes its inventory of processes."""
    return seaweed


@pytest.fixture(params=["file", "s3"])
def new_remote(request: pytest.FixtureRequest, tmp_path: Path, seaweed: SeaweedS3) -> Factory:
    """Return a factory of RemoteStores on one fresh, empty prefix (file:// or S3)."""
    if request.param == "file":
        url = (tmp_path / "mirror").as_uri()
        options: dict[str, Any] = {}
    else:
        url = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
        options = seaweed.storage_options()
    return lambda: RemoteStore(url, options)


@pytest.fixture
def s3_remote(seaweed: SeaweedS3) -> RemoteStore:
    return RemoteStore(f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}", seaweed.storage_options())


def local_store(output_dir: Path) -> FileCheckpointStore:
    return FileCheckpointStore(output_dir, require_record=True)


def uploaded(remote: RemoteStore, output_dir: Path, *steps: int) -> None:
    """Make and upload ``checkpoint-<step>`` for each step."""
    for step in steps:
        folder = make_checkpoint(output_dir, step)
        remote.upload_checkpoint(folder, step)


def remote_object(remote: RemoteStore, *parts: str) -> str:
    return "/".join((remote.root, *parts))


def flip_remote_byte(remote: RemoteStore, path: str, offset: int) -> None:
    """Invert one byte of a remote object, keeping its size (bit rot, a bad copy)."""
    data = bytearray(remote.fs.cat_file(path))
    data[offset] ^= 0xFF
    remote.fs.pipe_file(path, bytes(data))


class RecordAbsentWhileFilesMove:
    """Transfers that check, before each file moves, that the remote record is absent."""

    def __init__(self, remote: RemoteStore, folder: str) -> None:
        self.remote = remote
        self.record = remote_object(remote, folder, COMMIT_RECORD)
        self.checked = 0

    def run(self, tasks: Sequence[Callable[[], T]]) -> list[T]:
        results = []
        for task in tasks:
            assert not self.remote.fs.exists(self.record), "record visible before its files"
            self.checked += 1
            results.append(task())
        return results


# --- round trip ----------------------------------------------------------------------------


def test_round_trip_is_verified_by_hash(new_remote: Factory, tmp_path: Path) -> None:
    """Checkpoints and final/ uploaded, then downloaded elsewhere, verify byte for byte."""
    remote = new_remote()
    remote.probe()
    source = tmp_path / "source"
    uploaded(remote, source, 2, 4)
    make_final(source)
    remote.upload_final(source / "final")

    inventory = remote.inventory()
    assert inventory.valid_steps() == [2, 4]
    assert inventory.final_complete
    again = remote.upload_checkpoint(source / "checkpoint-4", 4)
    assert again.already_remote
    assert again.bytes == 0

    target = Layout(tmp_path / "target")
    target.output_dir.mkdir()
    path = remote.download_checkpoint(4, target)
    assert path == target.checkpoint(4)
    entry = verify_checkpoint(path, require_record=True)
    assert entry.integrity is Integrity.COMPLETE, entry.problems
    for original in sorted((source / "checkpoint-4").rglob("*")):
        copy = path / original.relative_to(source / "checkpoint-4")
        assert file_digest(copy) == file_digest(original), copy
    remote.download_final(target)
    assert verify_final(target.final)
    assert not any((target.warden / "incoming").iterdir())


def test_record_goes_up_only_after_every_file(new_remote: Factory, tmp_path: Path) -> None:
    """No file moves while the record is visible, also when a changed step N is re-uploaded."""
    remote = new_remote()
    source = tmp_path / "source"
    folder = make_checkpoint(source, 6)
    watcher = RecordAbsentWhileFilesMove(remote, "checkpoint-6")
    remote.upload_checkpoint(folder, 6, transfers=watcher)
    assert watcher.checked == 7
    assert remote.fs.exists(watcher.record)

    # The run resumed from an older checkpoint and committed a different checkpoint-6:
    # the old record must vanish before the first new byte lands.
    other = tmp_path / "other"
    replacement = make_checkpoint(other, 6, width=32)
    watcher = RecordAbsentWhileFilesMove(remote, "checkpoint-6")
    remote.upload_checkpoint(replacement, 6, transfers=watcher)
    assert watcher.checked == 7
    target = Layout(tmp_path / "target")
    target.output_dir.mkdir()
    remote.download_checkpoint(6, target)
    assert file_digest(target.checkpoint(6) / OPTIMIZER) == file_digest(replacement / OPTIMIZER)


def test_checkpoint_without_record_is_never_used(new_remote: Factory, tmp_path: Path) -> None:
    """A remote folder missing its record is ignored by restore and deleted by prune."""
    remote = new_remote()
    source = tmp_path / "source"
    uploaded(remote, source, 2, 4)
    remote.fs.rm_file(remote_object(remote, "checkpoint-4", COMMIT_RECORD))

    inventory = remote.inventory()
    assert inventory.get(4) is not None
    assert inventory.get(4).status is RemoteStatus.NO_RECORD  # type: ignore[union-attr]
    assert inventory.newest_valid() == 2
    with pytest.raises(MirrorError, match="no commit record"):
        remote.download_checkpoint(4, Layout(tmp_path / "elsewhere"))

    layout = Layout(tmp_path / "machine-2")
    report = restore(layout, remote, local_store(layout.output_dir))
    assert report.downloaded == 2
    assert not layout.checkpoint(4).exists()

    pruned = remote.prune(keep_last=3)
    assert pruned.partial_removed == (4,)
    assert [entry.step for entry in remote.inventory().checkpoints] == [2]


# --- corruption and restore ------------------------------------------------------------------


def test_flipped_remote_byte_is_caught_and_older_checkpoint_used(
    new_remote: Factory, tmp_path: Path
) -> None:
    """One flipped byte in a remote object: restore quarantines that copy, uses the older."""
    remote = new_remote()
    uploaded(remote, tmp_path / "source", 2, 4)
    flip_remote_byte(remote, remote_object(remote, "checkpoint-4", OPTIMIZER), 200)

    layout = Layout(tmp_path / "machine-2")
    report = restore(layout, remote, local_store(layout.output_dir))

    assert report.downloaded == 2
    assert report.resume_step == 2
    assert [step for step, _ in report.rejected] == [4]
    assert OPTIMIZER in report.rejected[0][1]
    assert report.remote_newest == 2
    assert not layout.checkpoint(4).exists()
    assert verify_checkpoint(layout.checkpoint(2), require_record=True).integrity is (
        Integrity.COMPLETE
    )
    inventory = remote.inventory()
    assert inventory.valid_steps() == [2]
    assert inventory.quarantined == ("checkpoint-4",)
    assert list((layout.warden / "incoming").iterdir()) == []


def test_download_names_the_corrupt_files(s3_remote: RemoteStore, tmp_path: Path) -> None:
    """RemoteCorrupt lists the damaged file and leaves no folder behind."""
    uploaded(s3_remote, tmp_path / "source", 8)
    flip_remote_byte(s3_remote, remote_object(s3_remote, "checkpoint-8", "scheduler.pt"), 40)
    layout = Layout(tmp_path / "target")
    with pytest.raises(RemoteCorrupt) as caught:
        s3_remote.download_checkpoint(8, layout)
    assert caught.value.files == ("scheduler.pt",)
    assert caught.value.step == 8
    assert "scheduler.pt" in str(caught.value)
    assert not layout.checkpoint(8).exists()
    assert list((layout.warden / "incoming").iterdir()) == []


def test_restore_keeps_the_newest_valid_of_either_side(new_remote: Factory, tmp_path: Path) -> None:
    """Local newer than remote: nothing is downloaded; remote newer: it is, and wins."""
    remote = new_remote()
    layout = Layout(tmp_path / "out")
    uploaded(remote, tmp_path / "source", 2, 4)
    make_checkpoint(layout.output_dir, 6)
    report = restore(layout, remote, local_store(layout.output_dir))
    assert (report.local_newest, report.downloaded, report.resume_step) == (6, None, 6)

    # A partial local checkpoint-8 (killed mid-save) and a valid remote one.
    uploaded(remote, tmp_path / "source", 8)
    partial = make_checkpoint(layout.output_dir, 8, record=False)
    (partial / OPTIMIZER).unlink()
    report = restore(layout, remote, local_store(layout.output_dir))
    assert report.downloaded == 8
    assert verify_checkpoint(layout.checkpoint(8), require_record=True).integrity is (
        Integrity.COMPLETE
    )
    assert list(layout.quarantine.glob("checkpoint-8*"))


def test_restore_brings_back_state_and_final(new_remote: Factory, tmp_path: Path) -> None:
    """A run complete remotely is complete here: final/ and state.json come back, pids cleared."""
    remote = new_remote()
    source = Layout(tmp_path / "source")
    uploaded(remote, source.output_dir, 4)
    make_final(source.output_dir)
    remote.upload_final(source.final)
    source.ensure()
    state = RunStateFile(attempts=3, completed=True, poisoned_steps=(2,), supervisor_pid=4242)
    state = state.model_copy(update={"child_pid": 4343, "child_create_time": 12.5})
    atomic_write_model(source.state, state)
    remote.upload_state(source.state)

    layout = Layout(tmp_path / "machine-2")
    report = restore(layout, remote, local_store(layout.output_dir))

    assert report.state_restored
    assert report.final_restored
    assert report.remote_final_complete
    assert report.downloaded is None  # complete: the policy exits 0 on final/ alone
    assert verify_final(layout.final)
    restored = read_model(layout.state, RunStateFile)
    assert restored is not None
    assert (restored.attempts, restored.completed, restored.poisoned_steps) == (3, True, (2,))
    assert (restored.supervisor_pid, restored.child_pid, restored.child_create_time) == (
        None,
        None,
        None,
    )


def test_restore_skips_poisoned_steps(new_remote: Factory, tmp_path: Path) -> None:
    """A step the restored state calls poisoned is never downloaded to resume from."""
    remote = new_remote()
    source = Layout(tmp_path / "source")
    uploaded(remote, source.output_dir, 2, 4)
    source.ensure()
    atomic_write_model(source.state, RunStateFile(poisoned_steps=(4,)))
    remote.upload_state(source.state)
    layout = Layout(tmp_path / "machine-2")
    report = restore(layout, remote, local_store(layout.output_dir))
    assert report.downloaded == 2


# --- retention --------------------------------------------------------------------------------


def test_retention_never_deletes_the_newest_valid_remote(
    new_remote: Factory, tmp_path: Path
) -> None:
    """keep_last=1 with the newest remote folders broken: the newest *valid* one survives."""
    remote = new_remote()
    source = tmp_path / "source"
    uploaded(remote, source, 2, 4, 6, 8, 10)
    # 10: an upload cut short (no record). 8: a listed file lost bytes (damaged).
    remote.fs.rm_file(remote_object(remote, "checkpoint-10", COMMIT_RECORD))
    remote.fs.pipe_file(remote_object(remote, "checkpoint-8", "scheduler.pt"), b"short")

    result = remote.prune(keep_last=1, pinned=(2,))

    assert result.removed == (4,)
    assert result.partial_removed == (10,)
    assert result.quarantined == (8,)
    assert dict(result.kept) == {6: "newest valid", 2: "protected"}
    inventory = remote.inventory()
    assert inventory.valid_steps() == [2, 6]
    assert "checkpoint-8" in inventory.quarantined


def test_prune_during_download_spares_the_checkpoint_being_downloaded(
    new_remote: Factory, tmp_path: Path
) -> None:
    """A prune that runs mid-download cannot delete the step being downloaded."""
    remote = new_remote()
    uploaded(remote, tmp_path / "source", 2, 4)
    outcome: list[object] = []

    class PruneMidway:
        def run(self, tasks: Sequence[Callable[[], T]]) -> list[T]:
            results = [tasks[0]()]
            outcome.append(remote.prune(keep_last=1))
            return results + [task() for task in tasks[1:]]

    layout = Layout(tmp_path / "target")
    remote.download_checkpoint(2, layout, transfers=PruneMidway())
    assert verify_checkpoint(layout.checkpoint(2), require_record=True).integrity is (
        Integrity.COMPLETE
    )
    assert remote.inventory().valid_steps() == [2, 4]
    assert remote.prune(keep_last=1).removed == (2,)


# --- probe --------------------------------------------------------------------------------------


def test_probe_wrong_bucket_names_the_url(seaweed: SeaweedS3) -> None:
    """Credentials that may not write the named bucket fail the probe, exit 78, URL named."""
    url = "s3://not-our-bucket/runs/demo"
    with pytest.raises(ProbeFailed) as caught:
        RemoteStore(url, seaweed.storage_options()).probe()
    message = str(caught.value)
    assert url in message
    assert "cannot write" in message
    assert caught.value.exit_code == EXIT_CONFIG
    assert SECRET_KEY not in message


def test_probe_bad_credentials_never_shows_the_secret(seaweed: SeaweedS3) -> None:
    """A wrong secret fails the probe with the backend's reason, and the secret is not in it."""
    secret = "wrong-secret-do-not-print-me"
    url = f"s3://{BUCKET}/runs/demo"
    store = RemoteStore(url, seaweed.storage_options(secret=secret))
    with pytest.raises(ProbeFailed) as caught:
        store.probe()
    message = str(caught.value)
    assert url in message
    assert "PermissionError" in message
    assert secret not in message
    assert secret not in repr(caught.value.args)


def test_probe_of_an_unwritable_folder_fails(tmp_path: Path) -> None:
    """A file:// mirror whose folder cannot be created is refused at start."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    url = (blocker / "mirror").as_uri()
    with pytest.raises(ProbeFailed, match="cannot write a probe object"):
        RemoteStore(url).probe()


def test_probe_leaves_nothing_behind(new_remote: Factory) -> None:
    """The probe object is deleted again."""
    remote = new_remote()
    remote.probe()
    assert remote.inventory().checkpoints == ()
    found = remote.fs.find(remote.root, detail=True)
    assert [path for path, info in found.items() if info["type"] == "file"] == []


# --- a supervisor killed mid-upload ------------------------------------------------------------


def test_sigkill_mid_upload_leaves_nothing_restore_would_use(
    seaweed: SeaweedS3, tmp_path: Path
) -> None:
    """A process SIGKILLed after uploading part of checkpoint-4: restore uses checkpoint-2."""
    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
    remote = RemoteStore(url, seaweed.storage_options())
    source = tmp_path / "source"
    uploaded(remote, source, 2)
    folder = make_checkpoint(source, 4)
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "url": url,
                "storage_options": seaweed.storage_options(),
                "checkpoint": str(folder),
                "step": 4,
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.mirror_upload_child", str(spec)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == b"first-file-uploaded", line + proc.stdout.read()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()

    inventory = remote.inventory()
    partial = inventory.get(4)
    assert partial is not None
    assert partial.status is RemoteStatus.NO_RECORD
    assert partial.size_bytes > 0  # something did land: this is a real partial
    layout = Layout(tmp_path / "machine-2")
    report = restore(layout, remote, local_store(layout.output_dir))
    assert report.downloaded == 2
    assert not layout.checkpoint(4).exists()
    assert remote.prune(keep_last=3).partial_removed == (4,)
    wait_for(lambda: remote.inventory().valid_steps() == [2], timeout=10, what="listing settles")
