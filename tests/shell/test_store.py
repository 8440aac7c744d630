"""The checkpoint store (supervisor/shell/store.py) on real folders in tmp_path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from supervisor.core.model import CheckpointEntry, Integrity
from supervisor.shell import store as store_module
from supervisor.shell import verify
from supervisor.shell.lock import RunLock
from supervisor.shell.store import (
    CheckpointStore,
    FileCheckpointStore,
    RefusedError,
    describe_checkpoints,
    dir_size,
    plan_prune,
)
from supervisor.shell.testing import FakeCheckpointStore
from tests.support.checkpoints import (
    ADAPTER,
    OPTIMIZER,
    flip_byte,
    largest_tensor_payload,
    make_checkpoint,
    make_final,
)
from trainer_child.protocol import TRAINER_STATE, Layout, atomic_write_bytes, file_digest


def snapshot(root: Path) -> dict[str, str]:
    """Hash every file below ``root`` (to prove something was left untouched)."""
    return {
        str(path.relative_to(root)): file_digest(path)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def names_in(folder: Path) -> set[str]:
    return {entry.name for entry in folder.iterdir()}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    return output_dir


@pytest.fixture
def planted_symlink(tmp_path: Path, run_dir: Path) -> Path:
    """A checkpoint-99 symlink in the run pointing at a perfect checkpoint elsewhere."""
    target = make_checkpoint(tmp_path / "precious", 99)
    (run_dir / "checkpoint-99").symlink_to(target, target_is_directory=True)
    return target


# --- inventory ------------------------------------------------------------------------------


def test_inventory_lists_checkpoints_directly_under_output_dir_only(run_dir: Path) -> None:
    """Only exact checkpoint-N names count; look-alikes and nested folders are ignored."""
    for step in (4, 2):
        make_checkpoint(run_dir, step)
    for name in ("checkpoint-05", "checkpoint-x", "notes", "checkpoint-7.tmp"):
        (run_dir / name).mkdir()
    make_checkpoint(run_dir / "nested", 8)
    inventory = FileCheckpointStore(run_dir, require_record=True).inventory()
    assert [entry.step for entry in inventory.entries] == [2, 4]
    assert all(entry.integrity is Integrity.COMPLETE for entry in inventory.entries)


def test_inventory_reports_final_trash_and_quarantine(run_dir: Path) -> None:
    """The inventory carries final's completeness and what trash and quarantine hold."""
    make_checkpoint(run_dir, 2)
    make_checkpoint(run_dir, 4)
    make_final(run_dir)
    store = FileCheckpointStore(run_dir, require_record=True)
    size_2 = dir_size(run_dir / "checkpoint-2")
    store.quarantine(2, "test")
    layout = Layout(run_dir)
    (layout.trash / "leftover").mkdir()
    (layout.trash / "leftover" / "blob").write_bytes(b"x" * 1000)
    inventory = store.inventory()
    assert inventory.final_complete
    assert inventory.trash_bytes == 1000
    assert inventory.quarantine_bytes >= size_2  # plus the small reason file
    assert [entry.step for entry in inventory.entries] == [4]


def test_planted_symlink_is_listed_as_symlink_and_never_followed(
    run_dir: Path, planted_symlink: Path
) -> None:
    """A symlinked checkpoint-N shows up as symlink, size 0, never COMPLETE."""
    make_checkpoint(run_dir, 2)
    entry = FileCheckpointStore(run_dir, require_record=True).inventory().get(99)
    assert entry is not None
    assert entry.symlink
    assert entry.integrity is not Integrity.COMPLETE
    assert entry.size_bytes == 0


def test_planted_symlink_is_never_removed_or_quarantined(
    run_dir: Path, planted_symlink: Path
) -> None:
    """remove() and quarantine() refuse a symlink; the link and its target survive untouched."""
    before = snapshot(planted_symlink)
    store = FileCheckpointStore(run_dir, require_record=True)
    with pytest.raises(RefusedError, match="symlink"):
        store.remove(99, "retention")
    with pytest.raises(RefusedError, match="symlink"):
        store.quarantine(99, "partial")
    store.empty_trash()
    store.purge_quarantine()
    assert (run_dir / "checkpoint-99").is_symlink()
    assert snapshot(planted_symlink) == before


def test_inventory_uses_the_cache_between_changes(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second scan of unchanged checkpoints reads no file contents."""
    make_checkpoint(run_dir, 2)
    make_checkpoint(run_dir, 4)
    reads: list[Path] = []
    real = verify.read_and_check

    def counting(path: Path, *args: object) -> object:
        reads.append(path)
        return real(path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(verify, "read_and_check", counting)
    store = FileCheckpointStore(run_dir, require_record=True)
    store.inventory()
    first_scan = len(reads)
    assert first_scan > 0
    store.inventory()
    assert len(reads) == first_scan


def test_verify_for_resume_rereads_and_sees_damage_the_cache_cannot(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flip invisible to the fingerprint is caught by the resume check, and scans agree after."""
    make_checkpoint(run_dir, 4)
    store = FileCheckpointStore(run_dir, require_record=True)
    # Simulate an in-place rewrite within one timestamp tick: metadata unchanged.
    monkeypatch.setattr(verify, "folder_fingerprint", lambda path: ("unchanged", str(path)))
    assert store.inventory().entries[0].integrity is Integrity.COMPLETE
    offset, length = largest_tensor_payload(run_dir / "checkpoint-4" / OPTIMIZER)
    flip_byte(run_dir / "checkpoint-4" / OPTIMIZER, offset + length // 2)
    assert store.inventory().entries[0].integrity is Integrity.COMPLETE  # stale, by design
    assert store.verify_for_resume(4).integrity is Integrity.CORRUPT
    assert store.inventory().entries[0].integrity is Integrity.CORRUPT


def test_verify_for_resume_of_symlink_or_absent_step_is_not_complete(
    run_dir: Path, planted_symlink: Path
) -> None:
    """Resume checks never bless a symlink or a folder that is not there."""
    store = FileCheckpointStore(run_dir, require_record=True)
    assert store.verify_for_resume(99).symlink
    assert store.verify_for_resume(7).integrity is Integrity.INCOMPLETE


# --- remove ---------------------------------------------------------------------------------


def test_remove_goes_through_trash_before_deleting(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """remove() renames into .warden/trash first: by the time rmtree runs, checkpoint-N is gone."""
    folder = make_checkpoint(run_dir, 2)
    make_checkpoint(run_dir, 4)
    size = dir_size(folder)
    deleted: list[Path] = []
    real_rmtree = shutil.rmtree

    def watching_rmtree(path: Path) -> None:
        assert not os.path.lexists(folder)
        deleted.append(Path(path))
        real_rmtree(path)

    monkeypatch.setattr(shutil, "rmtree", watching_rmtree)
    assert FileCheckpointStore(run_dir, require_record=True).remove(2, "retention") == size
    assert deleted == [Layout(run_dir).trash / "checkpoint-2"]
    assert names_in(run_dir) == {"checkpoint-4", ".warden"}
    assert names_in(Layout(run_dir).trash) == set()


def test_interrupted_remove_leaves_the_folder_in_trash_not_output_dir(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If deleting fails part way the rest waits in the trash; empty_trash finishes the job."""
    folder = make_checkpoint(run_dir, 2)
    size = dir_size(folder)

    def failing_rmtree(path: Path) -> None:
        os.unlink(Path(path) / ADAPTER)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(shutil, "rmtree", failing_rmtree)
    store = FileCheckpointStore(run_dir, require_record=True)
    freed = store.remove(2, "retention")
    assert 0 < freed < size
    assert not os.path.lexists(folder)
    inventory = store.inventory()
    assert inventory.entries == ()
    assert inventory.trash_bytes == size - freed
    monkeypatch.undo()
    assert store.empty_trash() == size - freed
    assert store.inventory().trash_bytes == 0


def test_remove_deletes_symlinks_inside_a_checkpoint_not_their_targets(
    tmp_path: Path, run_dir: Path
) -> None:
    """A symlink inside a removed checkpoint is unlinked; the file it points at survives."""
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"keep me")
    folder = make_checkpoint(run_dir, 2)
    (folder / "link.bin").symlink_to(outside)
    FileCheckpointStore(run_dir, require_record=True).remove(2, "retention")
    assert outside.read_bytes() == b"keep me"


def test_remove_refuses_a_symlinked_trash(tmp_path: Path, run_dir: Path) -> None:
    """A planted .warden/trash symlink cannot redirect a delete outside output_dir."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Layout(run_dir).warden.mkdir()
    Layout(run_dir).trash.symlink_to(elsewhere, target_is_directory=True)
    make_checkpoint(run_dir, 2)
    with pytest.raises(RefusedError, match="not a real directory"):
        FileCheckpointStore(run_dir, require_record=True).remove(2, "retention")
    assert (run_dir / "checkpoint-2" / TRAINER_STATE).is_file()
    assert list(elsewhere.iterdir()) == []


def test_remove_and_quarantine_of_absent_step_do_nothing(run_dir: Path) -> None:
    """Acting on a step that is already gone is not an error."""
    store = FileCheckpointStore(run_dir, require_record=True)
    assert store.remove(6, "retention") == 0
    assert store.quarantine(6, "partial") is None


# --- quarantine -----------------------------------------------------------------------------


def test_quarantine_leaves_nothing_named_checkpoint_n_in_output_dir(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """quarantine() moves the folder out first, then writes the reason beside its slot."""
    folder = make_checkpoint(run_dir, 6, record=False)
    real_write = atomic_write_bytes

    def write_after_rename(path: Path, data: bytes) -> None:
        assert not os.path.lexists(folder)  # the reason is written after the rename
        real_write(path, data)

    monkeypatch.setattr(store_module, "atomic_write_bytes", write_after_rename)
    store = FileCheckpointStore(run_dir, require_record=True)
    slot = store.quarantine(6, "partial: no commit record")
    layout = Layout(run_dir)
    assert slot == layout.quarantine / "checkpoint-6"
    assert names_in(run_dir) == {".warden"}
    assert (slot / TRAINER_STATE).is_file()  # kept whole, as evidence
    reason = json.loads((layout.quarantine / "checkpoint-6.reason.json").read_text())
    assert reason["reason"] == "partial: no commit record"
    assert reason["step"] == 6


def test_quarantine_same_step_twice_gets_a_new_slot(run_dir: Path) -> None:
    """A second checkpoint-N quarantined later lands in checkpoint-N-1, keeping the first."""
    store = FileCheckpointStore(run_dir, require_record=True)
    make_checkpoint(run_dir, 6, record=False)
    first = store.quarantine(6, "partial")
    make_checkpoint(run_dir, 6, record=False)
    second = store.quarantine(6, "corrupt")
    assert first is not None
    assert second is not None
    assert (first.name, second.name) == ("checkpoint-6", "checkpoint-6-1")
    assert (second.parent / "checkpoint-6-1.reason.json").is_file()


def test_purge_quarantine_frees_everything_in_it(run_dir: Path) -> None:
    """purge_quarantine() deletes slots and reason files and says how many bytes it freed."""
    store = FileCheckpointStore(run_dir, require_record=True)
    make_checkpoint(run_dir, 6)
    store.quarantine(6, "resume failed")
    held = store.inventory().quarantine_bytes
    assert store.purge_quarantine() == held
    assert list(Layout(run_dir).quarantine.iterdir()) == []


# --- CLI views ------------------------------------------------------------------------------


def test_describe_checkpoints_shows_every_status(run_dir: Path, planted_symlink: Path) -> None:
    """The checkpoints view lists valid, partial, corrupt, quarantined and symlink rows."""
    make_checkpoint(run_dir, 2)
    make_checkpoint(run_dir, 4)
    offset, length = largest_tensor_payload(run_dir / "checkpoint-4" / OPTIMIZER)
    flip_byte(run_dir / "checkpoint-4" / OPTIMIZER, offset + length // 2)
    make_checkpoint(run_dir, 6, record=False)
    make_checkpoint(run_dir, 1)
    FileCheckpointStore(run_dir, require_record=True).quarantine(1, "resume failed")
    rows = describe_checkpoints(run_dir, deep=True, require_record=True)
    assert [(row.step, row.status) for row in rows] == [
        (1, "quarantined"),
        (2, "valid"),
        (4, "corrupt"),
        (6, "partial"),
        (99, "symlink"),
    ]
    assert rows[0].problems == ("resume failed",)
    assert rows[0].name == ".warden/quarantine/checkpoint-1"
    assert any("CRC-32" in problem for problem in rows[2].problems)


def test_describe_sees_a_live_run_through_its_lock(run_dir: Path) -> None:
    """While .warden/lock is held, the newest incomplete folder reads in_progress."""
    make_checkpoint(run_dir, 2)
    make_checkpoint(run_dir, 4, record=False)
    with RunLock(Layout(run_dir).lock) as lock:
        assert lock.acquire()
        live = describe_checkpoints(run_dir, require_record=True)
    dead = describe_checkpoints(run_dir, require_record=True)
    assert [row.status for row in live] == ["valid", "in_progress"]
    assert [row.status for row in dead] == ["valid", "partial"]


def test_describe_infers_require_record_from_the_builtin_job_file(run_dir: Path) -> None:
    """A plain HF run is judged by structure; where the built-in job ran, records are required."""
    make_checkpoint(run_dir, 2, record=False)
    assert [row.status for row in describe_checkpoints(run_dir)] == ["valid"]
    Layout(run_dir).warden.mkdir()
    Layout(run_dir).job.write_text("{}")
    assert [row.status for row in describe_checkpoints(run_dir)] == ["partial"]


def test_plan_prune_applies_retention_to_valid_checkpoints(run_dir: Path) -> None:
    """prune keeps the newest keep_last and the best one, and never counts damaged ones."""
    for step in (2, 4, 6, 8, 10):
        make_checkpoint(run_dir, step, best_step=4)
    (run_dir / "checkpoint-10" / ADAPTER).unlink()
    assert plan_prune(run_dir, keep_last=2) == [2]
    assert plan_prune(run_dir, keep_last=2, keep_best=False) == [2, 4]
    assert plan_prune(run_dir, keep_last=1, keep_best=False, keep_every=4) == [2, 6]


# --- the fake -------------------------------------------------------------------------------


@pytest.fixture(params=["file", "fake"])
def stores(
    request: pytest.FixtureRequest, tmp_path: Path, run_dir: Path
) -> tuple[CheckpointStore, Path]:
    """checkpoint-2 and -4 valid, -4 damaged where only a fresh verify sees it, -9 a symlink.

    The real store sees them on disk; the fake is scripted with the same verdicts
    and sizes. Returns the store and where its trash would be.
    """
    two, four = make_checkpoint(run_dir, 2), make_checkpoint(run_dir, 4)
    (run_dir / "checkpoint-9").symlink_to(make_checkpoint(tmp_path / "elsewhere", 9))
    store: CheckpointStore
    if request.param == "file":
        store = FileCheckpointStore(run_dir, require_record=True)
        store.inventory()  # verdicts cached, as in a running supervisor
        flip_byte(four / OPTIMIZER, largest_tensor_payload(four / OPTIMIZER)[0], keep_mtime=True)
    else:
        fake = FakeCheckpointStore(
            (
                CheckpointEntry(2, Integrity.COMPLETE, size_bytes=dir_size(two)),
                CheckpointEntry(4, Integrity.COMPLETE, size_bytes=dir_size(four)),
                CheckpointEntry(9, Integrity.INCOMPLETE, symlink=True),
            )
        )
        fake.resume_verdicts[4] = CheckpointEntry(4, Integrity.CORRUPT, problems=("bit rot",))
        store = fake
    return store, run_dir


def test_both_stores_keep_the_loops_contract(stores: tuple[CheckpointStore, Path]) -> None:
    """Real and fake alike: a fresh verify sees damage, moves free bytes, symlinks are refused."""
    store, run_dir = stores
    sizes = {step: dir_size(run_dir / f"checkpoint-{step}") for step in (2, 4)}
    assert [e.step for e in store.inventory().entries] == [2, 4, 9]
    assert store.verify_for_resume(4).integrity is Integrity.CORRUPT
    assert store.quarantine(4, "resume failed") is not None
    held = store.inventory().quarantine_bytes
    assert held >= sizes[4]  # the real one also keeps a small reason file beside it
    assert store.remove(2, "retention") == sizes[2]
    with pytest.raises(RefusedError):
        store.remove(9, "retention")
    with pytest.raises(RefusedError):
        store.quarantine(9, "never")
    assert store.quarantine(7, "absent") is None
    assert store.remove(7, "absent") == 0
    assert [e.step for e in store.inventory().entries] == [9]
    assert store.purge_quarantine() == held
    assert store.inventory().quarantine_bytes == 0
