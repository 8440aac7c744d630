"""How a checkpoint is judged (supervisor/shell/verify.py), on real files in tmp_path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from supervisor.core.model import Integrity
from supervisor.shell import verify
from supervisor.shell.verify import (
    VerdictCache,
    final_problems,
    read_and_check,
    verify_checkpoint,
    verify_final,
)
from tests.support.checkpoints import (
    ADAPTER,
    OPTIMIZER,
    flip_byte,
    largest_tensor_payload,
    make_checkpoint,
    make_final,
    safetensors_data_start,
    write_commit_record,
)
from trainer_child.protocol import COMMIT_RECORD, TRAINER_STATE, file_digest


def flip_optimizer_tensor_byte(folder: Path) -> None:
    """Flip one byte in the middle of the optimizer's largest tensor storage."""
    offset, length = largest_tensor_payload(folder / OPTIMIZER)
    flip_byte(folder / OPTIMIZER, offset + length // 2)


def problems_text(folder: Path, **kwargs: bool) -> str:
    return " | ".join(verify_checkpoint(folder, **kwargs).problems)


# --- complete ---------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["xxh3_128", "blake2b"])
def test_complete_checkpoint_is_complete(tmp_path: Path, algorithm: str) -> None:
    """A checkpoint with a matching record, state, headers and CRCs is COMPLETE."""
    folder = make_checkpoint(tmp_path, 6, best_step=4, hash_algorithm=algorithm)
    entry = verify_checkpoint(folder, require_record=True)
    assert entry.integrity is Integrity.COMPLETE, entry.problems
    assert entry.problems == ()
    assert entry.has_record
    assert entry.best_step == 4
    assert entry.size_bytes == sum(p.stat().st_size for p in folder.iterdir())


@pytest.mark.parametrize("algorithm", ["xxh3_128", "blake2b"])
def test_single_pass_digest_equals_protocol_file_digest(tmp_path: Path, algorithm: str) -> None:
    """The verifier's one-pass hash is byte-for-byte the child's file_digest."""
    folder = make_checkpoint(tmp_path, 2)
    path = folder / OPTIMIZER
    digest, bad, read = read_and_check(path, algorithm)
    assert digest == file_digest(path, algorithm)
    assert bad == []
    assert read == path.stat().st_size


def test_plain_hf_checkpoint_without_record_judged_structurally(tmp_path: Path) -> None:
    """A plain HF checkpoint (no warden.json) is COMPLETE by structure when records are optional."""
    folder = make_checkpoint(tmp_path, 8, record=False, best_step=8)
    entry = verify_checkpoint(folder, require_record=False)
    assert entry.integrity is Integrity.COMPLETE, entry.problems
    assert not entry.has_record
    assert entry.best_step == 8


def test_legacy_pickle_weights_have_no_crc_and_pass(tmp_path: Path) -> None:
    """A pre-zip torch.save file (no CRCs to check) is accepted as weights, not flagged."""
    folder = make_checkpoint(tmp_path, 2, record=False)
    (folder / ADAPTER).unlink()
    torch.save(
        {"w": torch.ones(3)}, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False
    )
    assert verify_checkpoint(folder, require_record=False).integrity is Integrity.COMPLETE


# --- byte damage --------------------------------------------------------------------------


def test_torch_load_silently_loads_optimizer_with_flipped_tensor_byte(tmp_path: Path) -> None:
    """torch.load ignores zip CRC-32s: a flipped tensor byte loads with no error (why we check)."""
    folder = make_checkpoint(tmp_path, 2, record=False)
    original = torch.load(folder / OPTIMIZER)
    flip_optimizer_tensor_byte(folder)
    damaged = torch.load(folder / OPTIMIZER)  # no exception: this is the hazard
    assert any(
        not torch.equal(original["state"][i][key], damaged["state"][i][key])
        for i in original["state"]
        for key in ("exp_avg", "exp_avg_sq")
    )


def test_optimizer_tensor_byte_flip_is_corrupt_by_record_hash(tmp_path: Path) -> None:
    """A same-size flip inside optimizer.pt tensor data contradicts the record: CORRUPT."""
    folder = make_checkpoint(tmp_path, 4)
    size = (folder / OPTIMIZER).stat().st_size
    flip_optimizer_tensor_byte(folder)
    assert (folder / OPTIMIZER).stat().st_size == size
    entry = verify_checkpoint(folder, require_record=True)
    assert entry.integrity is Integrity.CORRUPT
    assert f"{OPTIMIZER}: hash mismatch" in " | ".join(entry.problems)


def test_optimizer_tensor_byte_flip_without_record_caught_by_zip_crc_alone(tmp_path: Path) -> None:
    """With no record to compare, the zip CRC-32 check alone catches the flipped tensor byte."""
    folder = make_checkpoint(tmp_path, 4, record=False)
    assert verify_checkpoint(folder, require_record=False).integrity is Integrity.COMPLETE
    flip_optimizer_tensor_byte(folder)
    entry = verify_checkpoint(folder, require_record=False)
    assert entry.integrity is Integrity.CORRUPT
    text = " | ".join(entry.problems)
    assert f"{OPTIMIZER}: CRC-32 mismatch in zip member" in text
    assert "/data/" in text


def test_adapter_tensor_byte_flip_is_corrupt_by_hash(tmp_path: Path) -> None:
    """A same-size flip inside adapter_model.safetensors tensor data is CORRUPT via the hash."""
    folder = make_checkpoint(tmp_path, 4)
    flip_byte(folder / ADAPTER, safetensors_data_start(folder / ADAPTER) + 17)
    entry = verify_checkpoint(folder, require_record=True)
    assert entry.integrity is Integrity.CORRUPT
    assert f"{ADAPTER}: hash mismatch" in " | ".join(entry.problems)


def test_safetensors_data_flip_is_invisible_without_record(tmp_path: Path) -> None:
    """safetensors carries no checksum: without a record a data flip passes (why records exist)."""
    folder = make_checkpoint(tmp_path, 4, record=False)
    flip_byte(folder / ADAPTER, safetensors_data_start(folder / ADAPTER) + 17)
    assert verify_checkpoint(folder, require_record=False).integrity is Integrity.COMPLETE


def test_shallow_verify_skips_byte_checks_but_not_sizes(tmp_path: Path) -> None:
    """deep=False reads no tensor bytes: it misses a same-size flip, not a truncation."""
    folder = make_checkpoint(tmp_path, 4)
    flip_optimizer_tensor_byte(folder)
    shallow = verify_checkpoint(folder, require_record=True, deep=False)
    assert shallow.integrity is Integrity.COMPLETE
    with open(folder / ADAPTER, "r+b") as handle:
        handle.truncate(100)
    shallow = verify_checkpoint(folder, require_record=True, deep=False)
    assert shallow.integrity is Integrity.CORRUPT


# --- missing and truncated ----------------------------------------------------------------


def test_missing_record_is_incomplete_when_required(tmp_path: Path) -> None:
    """Without warden.json the built-in job's checkpoint is INCOMPLETE: maybe still saving."""
    folder = make_checkpoint(tmp_path, 4, record=False)
    entry = verify_checkpoint(folder, require_record=True)
    assert entry.integrity is Integrity.INCOMPLETE
    assert entry.problems == ("no commit record (warden.json)",)


def test_truncated_file_with_record_is_corrupt(tmp_path: Path) -> None:
    """A listed file shorter than the record says is CORRUPT."""
    folder = make_checkpoint(tmp_path, 4)
    size = (folder / OPTIMIZER).stat().st_size
    os.truncate(folder / OPTIMIZER, size - 10)
    entry = verify_checkpoint(folder, require_record=True)
    assert entry.integrity is Integrity.CORRUPT
    assert f"{OPTIMIZER}: {size - 10} bytes, the record says {size}" in entry.problems


@pytest.mark.parametrize(("name", "expected"), [(OPTIMIZER, "zip archive"), (ADAPTER, "tensors")])
def test_truncated_weights_without_record_are_corrupt(
    tmp_path: Path, name: str, expected: str
) -> None:
    """Truncation is caught by structure alone: a zip loses its directory, safetensors its data."""
    folder = make_checkpoint(tmp_path, 4, record=False)
    os.truncate(folder / name, (folder / name).stat().st_size - 64)
    entry = verify_checkpoint(folder, require_record=False)
    assert entry.integrity is Integrity.CORRUPT
    assert expected in " | ".join(entry.problems)


def test_missing_trainer_state_without_record_is_incomplete(tmp_path: Path) -> None:
    """HF writes trainer_state.json last: a folder without it is a save in flight (INCOMPLETE)."""
    folder = make_checkpoint(tmp_path, 4, record=False)
    (folder / TRAINER_STATE).unlink()
    assert verify_checkpoint(folder, require_record=False).integrity is Integrity.INCOMPLETE
    (folder / TRAINER_STATE).write_text('{"global_st')  # HF dumps without tmp+rename
    assert verify_checkpoint(folder, require_record=False).integrity is Integrity.INCOMPLETE


def test_missing_trainer_state_with_record_is_corrupt(tmp_path: Path) -> None:
    """A record vouches for a folder that lacks trainer_state.json: CORRUPT."""
    folder = make_checkpoint(tmp_path, 4)
    (folder / TRAINER_STATE).unlink()
    assert verify_checkpoint(folder, require_record=True).integrity is Integrity.CORRUPT


@pytest.mark.parametrize("record", [True, False])
def test_global_step_mismatch_is_corrupt(tmp_path: Path, record: bool) -> None:
    """A parseable trainer_state naming another step is CORRUPT: waiting cannot fix a wrong step.

    Without a record, too: HF writes the state last, so a complete-looking folder
    whose state says step 5 is another step's checkpoint copied or renamed here,
    and resuming it would continue from the wrong place.
    """
    folder = make_checkpoint(tmp_path, 4, record=False)
    state = json.loads((folder / TRAINER_STATE).read_text())
    (folder / TRAINER_STATE).write_text(json.dumps({**state, "global_step": 5}))
    if record:
        write_commit_record(folder, 4)
    entry = verify_checkpoint(folder, require_record=record)
    assert entry.integrity is Integrity.CORRUPT
    assert "trainer_state.json says global_step 5, not 4" in entry.problems


def test_record_naming_another_step_is_corrupt(tmp_path: Path) -> None:
    """warden.json must name the folder's own step."""
    folder = make_checkpoint(tmp_path, 4)
    write_commit_record(folder, 6)
    assert verify_checkpoint(folder, require_record=True).integrity is Integrity.CORRUPT


def test_unparsable_record_is_corrupt(tmp_path: Path) -> None:
    """The record is written by rename, so a garbled one is damage, not a write in flight."""
    folder = make_checkpoint(tmp_path, 4)
    (folder / COMMIT_RECORD).write_text("{not json")
    entry = verify_checkpoint(folder, require_record=True)
    assert entry.integrity is Integrity.CORRUPT
    assert entry.has_record


def test_no_weights_file_is_incomplete_without_record(tmp_path: Path) -> None:
    """A state file with no weights beside it is not a checkpoint yet: INCOMPLETE."""
    folder = make_checkpoint(tmp_path, 4, record=False)
    (folder / ADAPTER).unlink()
    entry = verify_checkpoint(folder, require_record=False)
    assert entry.integrity is Integrity.INCOMPLETE
    assert any("no weights file" in problem for problem in entry.problems)


def test_garbage_safetensors_header_is_corrupt(tmp_path: Path) -> None:
    """A safetensors header that is not JSON fails the structural check."""
    folder = make_checkpoint(tmp_path, 4, record=False)
    flip_byte(folder / ADAPTER, 9)
    assert verify_checkpoint(folder, require_record=False).integrity is Integrity.CORRUPT


# --- symlinks and hostile records --------------------------------------------------------


def test_symlinked_checkpoint_is_listed_as_symlink_never_complete(tmp_path: Path) -> None:
    """A checkpoint-N symlink to a perfect checkpoint is flagged symlink and not followed."""
    elsewhere = make_checkpoint(tmp_path / "elsewhere", 9)
    link = tmp_path / "run" / "checkpoint-9"
    link.parent.mkdir()
    link.symlink_to(elsewhere, target_is_directory=True)
    entry = verify_checkpoint(link, require_record=True)
    assert entry.symlink
    assert entry.integrity is not Integrity.COMPLETE
    assert entry.size_bytes == 0


def test_listed_file_replaced_by_symlink_is_corrupt(tmp_path: Path) -> None:
    """A listed file that became a symlink is not followed and counts as damage."""
    folder = make_checkpoint(tmp_path, 4)
    target = tmp_path / "real-optimizer.pt"
    (folder / OPTIMIZER).rename(target)
    (folder / OPTIMIZER).symlink_to(target)
    entry = verify_checkpoint(folder, require_record=True)
    assert entry.integrity is Integrity.CORRUPT
    assert f"{OPTIMIZER}: listed in the record but is not a regular file" in entry.problems


def test_record_with_path_escaping_the_folder_is_corrupt(tmp_path: Path) -> None:
    """A record listing ../ paths never makes the verifier read outside the checkpoint."""
    folder = make_checkpoint(tmp_path, 4)
    record = json.loads((folder / COMMIT_RECORD).read_text())
    record["files"].append({"path": "../../etc/passwd", "size": 1, "hash": "xxh3_128:0"})
    (folder / COMMIT_RECORD).write_text(json.dumps(record))
    entry = verify_checkpoint(folder, require_record=True)
    assert entry.integrity is Integrity.CORRUPT
    assert "record lists an unsafe path '../../etc/passwd'" in entry.problems


def test_non_checkpoint_name_is_rejected(tmp_path: Path) -> None:
    """Only folders named exactly checkpoint-N may be judged (no leading zeros)."""
    with pytest.raises(ValueError, match="checkpoint-N"):
        verify_checkpoint(tmp_path / "checkpoint-05", require_record=False)


# --- final --------------------------------------------------------------------------------


def test_final_with_its_own_final_record_is_complete(tmp_path: Path) -> None:
    """output_dir/final is complete when its record says final and every file matches."""
    final = make_final(tmp_path)
    assert verify_final(final)
    flip_byte(final / ADAPTER, safetensors_data_start(final / ADAPTER))
    assert not verify_final(final)


def test_final_needs_a_final_record(tmp_path: Path) -> None:
    """A final folder without a record, or with a periodic one, is not complete."""
    final = make_final(tmp_path)
    write_commit_record(final, 10, reason="periodic")
    assert final_problems(final) == ("warden.json reason is 'periodic', not 'final'",)
    (final / COMMIT_RECORD).unlink()
    assert not verify_final(final)
    assert not verify_final(tmp_path / "absent")


# --- the verdict cache --------------------------------------------------------------------


@pytest.fixture
def read_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every bulk read the verifier makes."""
    calls: list[Path] = []
    real = verify.read_and_check

    def counting(path: Path, *args: object, **kwargs: object) -> object:
        calls.append(path)
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(verify, "read_and_check", counting)
    return calls


def test_cache_answers_unchanged_folder_without_rehashing(
    tmp_path: Path, read_calls: list[Path]
) -> None:
    """A second verdict for an unchanged folder reads no bytes."""
    folder = make_checkpoint(tmp_path, 4)
    cache = VerdictCache()
    first = cache.checkpoint(folder, require_record=True)
    reads_after_first = len(read_calls)
    assert reads_after_first >= 7  # every listed file hashed once
    assert cache.checkpoint(folder, require_record=True) == first
    assert len(read_calls) == reads_after_first
    assert (cache.hits, cache.misses) == (1, 1)


def test_cache_invalidated_by_size_change(tmp_path: Path) -> None:
    """Appending to a file changes the fingerprint, so the cached COMPLETE is not reused."""
    folder = make_checkpoint(tmp_path, 4)
    cache = VerdictCache()
    assert cache.checkpoint(folder, require_record=True).integrity is Integrity.COMPLETE
    with open(folder / ADAPTER, "ab") as handle:
        handle.write(b"\0")
    assert cache.checkpoint(folder, require_record=True).integrity is Integrity.CORRUPT
    assert cache.misses == 2


def test_cache_invalidated_by_mtime_change(tmp_path: Path, read_calls: list[Path]) -> None:
    """Touching a file (same bytes, new mtime) forces a re-verify."""
    folder = make_checkpoint(tmp_path, 4)
    cache = VerdictCache()
    cache.checkpoint(folder, require_record=True)
    stat = (folder / OPTIMIZER).stat()
    os.utime(folder / OPTIMIZER, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    before = len(read_calls)
    assert cache.checkpoint(folder, require_record=True).integrity is Integrity.COMPLETE
    assert len(read_calls) > before
    assert cache.misses == 2


def test_cache_deep_verdict_answers_shallow_but_not_reverse(tmp_path: Path) -> None:
    """A deep verdict serves a shallow request; a shallow one never stands in for deep."""
    folder = make_checkpoint(tmp_path, 4)
    cache = VerdictCache()
    cache.checkpoint(folder, require_record=True, deep=False)
    cache.checkpoint(folder, require_record=True, deep=True)
    cache.checkpoint(folder, require_record=True, deep=False)
    assert (cache.hits, cache.misses) == (1, 2)


def test_cache_fresh_bypasses_and_replaces_cached_verdict(
    tmp_path: Path, read_calls: list[Path]
) -> None:
    """fresh=True re-reads every byte even when the cache holds a verdict."""
    folder = make_checkpoint(tmp_path, 4)
    cache = VerdictCache()
    cache.checkpoint(folder, require_record=True)
    before = len(read_calls)
    cache.checkpoint(folder, require_record=True, fresh=True)
    assert len(read_calls) == 2 * before


def test_cache_does_not_keep_verdict_of_folder_changing_during_verify(tmp_path: Path) -> None:
    """A folder written to while being verified is re-verified next time."""
    folder = make_checkpoint(tmp_path, 4)

    def verify_while_saving(path: Path, **kwargs: bool) -> object:
        entry = verify_checkpoint(path, **kwargs)
        (path / "late-file.json").write_text("{}")
        return entry

    cache = VerdictCache(verify=verify_while_saving)  # type: ignore[arg-type]
    cache.checkpoint(folder, require_record=True)
    (folder / "late-file.json").unlink()
    cache.checkpoint(folder, require_record=True)
    assert cache.misses == 2


def test_deflated_zip_member_is_crc_checked(tmp_path: Path) -> None:
    """A deflated member (torch.save writes none, other tools do) is CRC-checked too."""
    import random
    import zipfile

    folder = make_checkpoint(tmp_path, 2, record=False)
    optimizer = folder / "optimizer.pt"
    optimizer.unlink()
    payload = random.Random(0).randbytes(8192)  # incompressible: stored inside deflate
    with zipfile.ZipFile(optimizer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("optimizer/data/0", payload)
    assert verify_checkpoint(folder, require_record=False).integrity is Integrity.COMPLETE

    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optimizer.write_bytes(bytes(data))
    entry = verify_checkpoint(folder, require_record=False)
    assert entry.integrity is Integrity.CORRUPT
    assert any("damaged" in problem for problem in entry.problems), entry.problems
