"""How a checkpoint is judged: every rule that makes ``checkpoint-N`` COMPLETE lives here.

docs/architecture.md, "Which checkpoint is valid", is the spec. A folder is COMPLETE when:

1. it is a real directory (a symlink is listed, never followed, never complete)
   named ``checkpoint-N``;
2. ``warden.json`` parses and names step N, and every file it lists exists as a
   regular file with the listed size and hash;
3. ``trainer_state.json`` parses with ``global_step == N``;
4. some weights file is present, every ``*.safetensors`` header parses with
   offsets that tile the file exactly, and every ``*.pt``/``*.pth``/``*.bin``
   that is a zip archive (torch.save's format) has members whose CRC-32s match.

Rule 4's CRC check is not redundant with the record: ``torch.load`` never
verifies those CRCs (measured: a flipped byte inside tensor data loads without a
word), so for a plain HF checkpoint without a record it is the only thing that
catches silent damage to the optimizer state.

How a failure is graded (``Integrity``):

- with a commit record, any problem is CORRUPT: the child claimed the
  checkpoint complete and the bytes disagree, so waiting cannot fix it;
- without one and ``require_record`` (the built-in job): INCOMPLETE, judged no
  further (the child may be mid-save, and hashing files still being written
  wastes I/O);
- without one otherwise (a plain HF script): missing or unreadable
  ``trainer_state.json`` is INCOMPLETE (HF writes it last, without fsync or
  rename, so a kill mid-save leaves exactly that); with the state present every
  other problem is CORRUPT except "no weights file", which is INCOMPLETE.
  A ``global_step`` that parses but differs from N is CORRUPT in both modes: the
  folder holds another step's state (copied or renamed), and resuming from it
  would silently continue from the wrong place.

Checks are graded cheap (metadata, headers, zip directories, sizes) and deep
(hash and CRC of every byte). Deep checks read each file once: the hash and the
CRC-32s of its zip members are computed from the same 1 MiB chunks, so a cold
verify before a resume costs one read of the checkpoint, not two.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import xxhash
from pydantic import ValidationError

from supervisor.core.model import CheckpointEntry, Integrity
from trainer_child.protocol import (
    COMMIT_RECORD,
    TRAINER_STATE,
    CommitRecord,
    EntryKind,
    checkpoint_step,
    entry_kind,
    is_real_dir,
)

__all__ = [
    "FileStat",
    "FolderListing",
    "StoredZipMember",
    "VerdictCache",
    "final_problems",
    "folder_fingerprint",
    "list_folder",
    "read_and_check",
    "safe_relpath",
    "verify_checkpoint",
    "verify_final",
    "zip_layout",
]

#: Read size for hashing and CRCs: large enough that per-call overhead vanishes,
#: small enough to stay in L2/L3 while both the hash and the CRC consume it.
CHUNK_BYTES = 1 << 20
#: The safetensors library refuses headers above this size; so do we.
SAFETENSORS_MAX_HEADER = 100_000_000
#: Only the first few problems of one file are reported; a thousand bad tensors
#: in one file say nothing more than three.
MAX_PROBLEMS_PER_FILE = 3

_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length
_ZIP_LOCAL_MAGIC = b"PK\x03\x04"
_ZIP_SUFFIXES = frozenset({".pt", ".pth", ".bin"})
#: Files whose own structure is checked whether or not a record lists them.
_STRUCTURED_SUFFIXES = _ZIP_SUFFIXES | {".safetensors"}
_WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".distcp"})
#: Files HF saves beside the weights; they hold training state, not the model.
_TRAINING_STATE_FILES = frozenset(
    {"optimizer.pt", "scheduler.pt", "scaler.pt", "training_args.bin"}
)
#: Bits per element of every safetensors dtype (sub-byte float formats included).
_SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


# --- listing a folder without following symlinks ----------------------------------------


@dataclass(frozen=True)
class FileStat:
    """One regular file below a folder, as ``lstat`` saw it."""

    relpath: str  # POSIX-style, relative to the folder listed
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int


@dataclass(frozen=True)
class FolderListing:
    """Every regular file below a folder, plus what was seen but not followed."""

    files: tuple[FileStat, ...]
    #: Symlinks, sockets, fifos...: listed so a problem can name them, never opened.
    irregular: tuple[str, ...] = ()
    by_path: dict[str, FileStat] = field(
        init=False, default_factory=dict, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        self.by_path.update((entry.relpath, entry) for entry in self.files)

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)


def list_folder(root: Path) -> FolderListing:
    """List every regular file below ``root`` without ever following a symlink.

    Entries that vanish while listing are skipped: a folder being written or
    deleted concurrently is listed as it was, and the fingerprint check of the
    cache notices the difference.
    """
    files: list[FileStat] = []
    irregular: list[str] = []

    def walk(folder: Path, prefix: str) -> None:
        try:
            with os.scandir(folder) as iterator:
                entries = list(iterator)
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            relpath = f"{prefix}{entry.name}"
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(info.st_mode):
                walk(Path(entry.path), f"{relpath}/")
            elif stat.S_ISREG(info.st_mode):
                files.append(
                    FileStat(relpath, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)
                )
            else:
                irregular.append(relpath)

    walk(root, "")
    files.sort(key=lambda entry: entry.relpath)
    irregular.sort()
    return FolderListing(tuple(files), tuple(irregular))


# --- the single pass over a file's bytes ----------------------------------------------------


@dataclass(frozen=True)
class StoredZipMember:
    """A zip member stored uncompressed (torch.save's layout): its CRC covers its bytes."""

    name: str
    start: int
    length: int
    crc: int


def _new_hasher(algorithm: str) -> Any:
    """Create the hasher ``protocol.file_digest`` uses, to feed it chunks read for CRCs too.

    Duplicated rather than imported because file_digest owns its read loop; a
    test pins the two to identical output.
    """
    if algorithm == "xxh3_128":
        return xxhash.xxh3_128()
    if algorithm == "blake2b":
        return hashlib.blake2b(digest_size=16)
    raise ValueError(f"unknown hash algorithm {algorithm!r}: use xxh3_128 or blake2b")


def read_and_check(
    path: Path, algorithm: str | None, members: Sequence[StoredZipMember] = ()
) -> tuple[str | None, list[str], int]:
    """Read ``path`` once: hash it and CRC-check its stored zip members from the same chunks.

    Returns ``(digest or None, names of members whose CRC-32 mismatches, bytes read)``.
    This is the only place the verifier reads file contents in bulk, so it is the
    one to count in tests and to time in ``bench/bench_hash.py``.
    """
    hasher = _new_hasher(algorithm) if algorithm is not None else None
    ordered = sorted(members, key=lambda member: member.start)
    crcs = [0] * len(ordered)
    first_open = 0  # members before this index lie wholly behind the read position
    position = 0
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while read := handle.readinto(buffer):
            chunk = view[:read]
            if hasher is not None:
                hasher.update(chunk)
            end = position + read
            index = first_open
            while index < len(ordered) and ordered[index].start < end:
                member = ordered[index]
                low = max(member.start, position)
                high = min(member.start + member.length, end)
                if low < high:
                    crcs[index] = zlib.crc32(chunk[low - position : high - position], crcs[index])
                index += 1
            while (
                first_open < len(ordered)
                and ordered[first_open].start + ordered[first_open].length <= end
            ):
                first_open += 1
            position = end
    bad = [member.name for member, crc in zip(ordered, crcs, strict=True) if crc != member.crc]
    digest = f"{algorithm}:{hasher.hexdigest()}" if hasher is not None else None
    return digest, bad, position


# --- per-format structure checks ---------------------------------------------------------


def _safetensors_problems(path: Path, size: int) -> list[str]:
    """Parse a safetensors header by hand (no tensors loaded, no safetensors import).

    The supervisor installs without the training extras, so it cannot rely on the
    safetensors package. The rules mirror the library's own validation: the
    offsets must tile the data section exactly, so a truncated or padded file
    fails here instead of at resume time.
    """
    if size < 8:
        return [f"only {size} bytes: too short for a safetensors header"]
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return ["shorter than listed (changed while being read)"]
        (header_length,) = struct.unpack("<Q", head)
        if header_length > min(size - 8, SAFETENSORS_MAX_HEADER):
            return [f"header length {header_length} does not fit a {size}-byte file"]
        raw = handle.read(header_length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [f"header is not JSON ({exc})"]
    if not isinstance(header, dict):
        return ["header is not a JSON object"]
    data_length = size - 8 - header_length
    problems: list[str] = []
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        span = _tensor_span(name, info, problems)
        if span is not None:
            spans.append((span[0], span[1], name))
    spans.sort()
    expected_start = 0
    for start, end, name in spans:
        if start != expected_start:
            problems.append(f"tensor {name!r} starts at {start}, expected {expected_start}")
        expected_start = end
    if expected_start != data_length:
        problems.append(
            f"tensors end at byte {expected_start} of a {data_length}-byte data section"
            + (" (truncated)" if expected_start > data_length else "")
        )
    return problems


def _tensor_span(name: str, info: object, problems: list[str]) -> tuple[int, int] | None:
    """Return one header entry's ``(begin, end)`` if it is well formed, noting why not."""
    if not isinstance(info, dict):
        problems.append(f"tensor {name!r}: entry is not an object")
        return None
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if (
        not isinstance(shape, list)
        or not all(isinstance(dim, int) and dim >= 0 for dim in shape)
        or not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(offset, int) for offset in offsets)
    ):
        problems.append(f"tensor {name!r}: malformed shape or data_offsets")
        return None
    begin, end = offsets
    if not 0 <= begin <= end:
        problems.append(f"tensor {name!r}: invalid offsets {begin}..{end}")
        return None
    bits = _SAFETENSORS_DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
    if bits is not None:
        elements = 1
        for dim in shape:
            elements *= dim
        expected = (elements * bits + 7) // 8
        if end - begin != expected:
            problems.append(
                f"tensor {name!r}: {end - begin} bytes for {dtype}{shape}, expected {expected}"
            )
    return begin, end


def zip_layout(path: Path, size: int) -> tuple[list[StoredZipMember], list[str], list[str]]:
    """Map a zip archive's members: ``(stored members, compressed member names, problems)``.

    A file that does not start like a zip is a legacy pickle (torch.save with
    ``_use_new_zipfile_serialization=False``): it has no CRCs to check, so it
    yields nothing. One that does start like a zip must open as one: a truncated
    archive loses its central directory (at the end) and fails here.
    """
    with open(path, "rb") as handle:
        if handle.read(4) != _ZIP_LOCAL_MAGIC:
            return [], [], []
    stored: list[StoredZipMember] = []
    compressed: list[str] = []
    problems: list[str] = []
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
            for info in archive.infolist():
                if info.flag_bits & 0x1:
                    problems.append(f"zip member {info.filename!r} is encrypted")
                    continue
                if info.compress_type != zipfile.ZIP_STORED:
                    compressed.append(info.filename)
                    continue
                # The local header's extra field may differ from the central
                # directory's (torch pads it to align tensor data), so read it.
                handle.seek(info.header_offset)
                magic, name_length, extra_length = _ZIP_LOCAL_HEADER.unpack(
                    handle.read(_ZIP_LOCAL_HEADER.size)
                )
                if magic != _ZIP_LOCAL_MAGIC:
                    problems.append(f"zip member {info.filename!r}: bad local header")
                    continue
                start = info.header_offset + _ZIP_LOCAL_HEADER.size + name_length + extra_length
                if start + info.compress_size > size:
                    problems.append(f"zip member {info.filename!r} runs past the end of the file")
                    continue
                stored.append(StoredZipMember(info.filename, start, info.compress_size, info.CRC))
    except (zipfile.BadZipFile, struct.error, ValueError, EOFError) as exc:
        return [], [], [f"zip archive unreadable, truncated? ({exc})"]
    return stored, compressed, problems


def _compressed_member_problems(path: Path, names: Sequence[str]) -> list[str]:
    """CRC-check deflated members the slow way; torch.save never writes any."""
    problems: list[str] = []
    with zipfile.ZipFile(path) as archive:
        for name in names:
            try:
                with archive.open(name) as member:
                    while member.read(CHUNK_BYTES):
                        pass  # ZipExtFile raises on a CRC mismatch at the end
            except NotImplementedError:
                continue  # a compression this Python lacks: unknown, not damaged
            except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                problems.append(f"zip member {name!r} damaged ({exc})")
    return problems


def _is_weights_file(relpath: str) -> bool:
    """Return whether a file holds model weights (HF, PEFT, sharded, DeepSpeed, FSDP)."""
    name = PurePosixPath(relpath).name
    if name in _TRAINING_STATE_FILES or name.startswith("rng_state"):
        return False
    return PurePosixPath(name).suffix in _WEIGHT_SUFFIXES


# --- judging ------------------------------------------------------------------------------


@dataclass
class _Findings:
    """Problems found so far, split by what they mean for the verdict."""

    #: Not there yet, or not readable yet (could still be written).
    missing: list[str] = field(default_factory=list)
    #: Present and wrong: no amount of waiting fixes it.
    damaged: list[str] = field(default_factory=list)

    def all(self) -> tuple[str, ...]:
        return (*self.damaged, *self.missing)

    def add_file(self, relpath: str, problems: Sequence[str]) -> None:
        shown = [f"{relpath}: {problem}" for problem in problems[:MAX_PROBLEMS_PER_FILE]]
        if len(problems) > MAX_PROBLEMS_PER_FILE:
            shown.append(f"{relpath}: ... and {len(problems) - MAX_PROBLEMS_PER_FILE} more")
        self.damaged.extend(shown)


@dataclass(frozen=True)
class _TrainerState:
    global_step: int | None
    best_step: int | None
    max_steps: int | None = None


def _read_trainer_state(folder: Path, listing: FolderListing) -> _TrainerState | str | None:
    """Parse trainer_state.json: the state, a reason it is unreadable, or None when absent."""
    if TRAINER_STATE in listing.irregular:
        return f"{TRAINER_STATE} is not a regular file (symlinks are not followed)"
    if TRAINER_STATE not in listing.by_path:
        return None
    try:
        state = json.loads((folder / TRAINER_STATE).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{TRAINER_STATE} unreadable ({exc.__class__.__name__})"
    if not isinstance(state, dict):
        return f"{TRAINER_STATE} is not a JSON object"
    step = state.get("global_step")
    best = state.get("best_model_checkpoint")
    best_step = checkpoint_step(PurePosixPath(best).name) if isinstance(best, str) else None
    max_steps = state.get("max_steps")
    return _TrainerState(
        step if isinstance(step, int) else None,
        best_step,
        max_steps if isinstance(max_steps, int) and max_steps > 0 else None,
    )


def _read_record(folder: Path, listing: FolderListing) -> CommitRecord | str | None:
    """Parse warden.json: the record, why it is unreadable, or None when absent.

    The child writes it by tmp + fsync + rename, so a present but unparsable
    record is damage, never a write in progress.
    """
    if COMMIT_RECORD in listing.irregular:
        return f"{COMMIT_RECORD} is not a regular file (symlinks are not followed)"
    if COMMIT_RECORD not in listing.by_path:
        return None
    try:
        return CommitRecord.model_validate(json.loads((folder / COMMIT_RECORD).read_bytes()))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError, ValidationError) as exc:
        return f"{COMMIT_RECORD} unreadable ({exc.__class__.__name__})"


def safe_relpath(listed: str) -> str | None:
    """Normalise a path from a record; None if it could point outside the folder."""
    path = PurePosixPath(listed)
    if not listed or path.is_absolute() or ".." in path.parts or "\\" in listed:
        return None
    return path.as_posix()


def _check_files(
    folder: Path,
    listing: FolderListing,
    record: CommitRecord | None,
    findings: _Findings,
    *,
    deep: bool,
) -> None:
    """Check the listed files against the record, then every file's own structure.

    Cheap checks run for every file before any deep read, so a shallow verify
    costs a few small reads per file whatever the checkpoint's size.
    """
    expected = _expected_hashes(listing, record, findings) if record is not None else {}
    algorithm = record.hash_algorithm if record is not None else None
    for found in listing.files:
        suffix = PurePosixPath(found.relpath).suffix
        if suffix not in _STRUCTURED_SUFFIXES and found.relpath not in expected:
            continue
        try:
            problems = _file_problems(
                folder / found.relpath, found, expected.get(found.relpath), algorithm, deep=deep
            )
        except FileNotFoundError:
            problems = ["vanished while being checked"]
        except OSError as exc:
            # EIO and friends: unreadable bytes are as bad as wrong ones for a resume.
            problems = [f"unreadable ({exc.strerror or exc.__class__.__name__})"]
        findings.add_file(found.relpath, problems)


def _expected_hashes(
    listing: FolderListing, record: CommitRecord, findings: _Findings
) -> dict[str, str]:
    """Map each file the record lists to its hash, noting listed files absent or resized."""
    expected: dict[str, str] = {}
    for entry in record.files:
        relpath = safe_relpath(entry.path)
        if relpath is None:
            findings.damaged.append(f"record lists an unsafe path {entry.path!r}")
            continue
        found = listing.by_path.get(relpath)
        if found is None:
            what = "is not a regular file" if relpath in listing.irregular else "is missing"
            findings.damaged.append(f"{relpath}: listed in the record but {what}")
        elif found.size != entry.size:
            findings.damaged.append(f"{relpath}: {found.size} bytes, the record says {entry.size}")
        else:
            expected[relpath] = entry.hash
    return expected


def _file_problems(
    path: Path, found: FileStat, expected: str | None, algorithm: str | None, *, deep: bool
) -> list[str]:
    """One file's structure (safetensors header, zip directory) and, when deep, its bytes."""
    suffix = PurePosixPath(found.relpath).suffix
    problems: list[str] = []
    stored: list[StoredZipMember] = []
    compressed: list[str] = []
    if suffix in _STRUCTURED_SUFFIXES and found.size == 0:
        problems.append("empty file")
    elif suffix == ".safetensors":
        problems += _safetensors_problems(path, found.size)
    elif suffix in _ZIP_SUFFIXES:
        stored, compressed, zip_problems = zip_layout(path, found.size)
        problems += zip_problems
    if deep and (expected is not None or stored):
        digest, bad_members, bytes_read = read_and_check(
            path, algorithm if expected is not None else None, stored
        )
        if bytes_read != found.size:
            problems.append(f"changed while being read ({bytes_read} of {found.size} bytes)")
        elif digest is not None and digest != expected:
            problems.append("hash mismatch: the bytes differ from the record")
        problems += [
            f"CRC-32 mismatch in zip member {name!r} (torch.load would not notice)"
            for name in bad_members
        ]
    if deep and compressed:
        problems += _compressed_member_problems(path, compressed)
    return problems


def verify_checkpoint(path: Path, *, require_record: bool, deep: bool = True) -> CheckpointEntry:
    """Judge one ``checkpoint-N`` folder by the rules in this module's docstring.

    ``deep=False`` skips the hash and CRC pass (every byte read) but keeps every
    metadata check; the supervisor always verifies deep, the CLI offers both.
    The folder's name is trusted for N; the caller guarantees it sits directly
    under output_dir.
    """
    step = checkpoint_step(path.name)
    if step is None:
        raise ValueError(f"{path} is not named checkpoint-N")
    kind = entry_kind(path)
    if kind is EntryKind.MISSING:
        return CheckpointEntry(step, Integrity.INCOMPLETE, problems=("folder does not exist",))
    if kind is EntryKind.SYMLINK:
        return CheckpointEntry(
            step,
            Integrity.INCOMPLETE,
            symlink=True,
            problems=("is a symlink: never followed, never resumed from, never deleted",),
        )
    if kind is not EntryKind.DIRECTORY:
        size = os.lstat(path).st_size if kind is EntryKind.FILE else 0
        return CheckpointEntry(
            step, Integrity.INCOMPLETE, size_bytes=size, problems=("not a directory",)
        )
    return _judge_folder(path, step, require_record=require_record, deep=deep)


def _judge_folder(path: Path, step: int, *, require_record: bool, deep: bool) -> CheckpointEntry:
    """Judge a real ``checkpoint-N`` directory: record, trainer state, then every file."""
    listing = list_folder(path)
    findings = _Findings()
    record = _read_record(path, listing)
    has_record = record is not None
    if isinstance(record, str):
        findings.damaged.append(record)
        record = None
    elif record is not None and record.step != step:
        findings.damaged.append(f"{COMMIT_RECORD} names step {record.step}, not {step}")

    state = _read_trainer_state(path, listing)
    best_step = state.best_step if isinstance(state, _TrainerState) else None
    max_steps = state.max_steps if isinstance(state, _TrainerState) else None
    if record is not None and record.max_steps:
        max_steps = record.max_steps

    def verdict(integrity: Integrity) -> CheckpointEntry:
        return CheckpointEntry(
            step,
            integrity,
            size_bytes=listing.total_bytes,
            problems=findings.all(),
            has_record=has_record,
            best_step=best_step,
            max_steps=max_steps,
        )

    if not has_record and require_record:
        findings.missing.append(f"no commit record ({COMMIT_RECORD})")
        return verdict(Integrity.INCOMPLETE)

    if state is None:
        findings.missing.append(f"no {TRAINER_STATE}")
    elif isinstance(state, str):
        findings.missing.append(state)
    elif state.global_step != step:
        findings.damaged.append(f"{TRAINER_STATE} says global_step {state.global_step}, not {step}")
    if not has_record and not isinstance(state, _TrainerState):
        # HF writes trainer_state.json last: without it the save may still be
        # running, and its weights files may be half written. Judge no further.
        return verdict(Integrity.INCOMPLETE)

    if not any(_is_weights_file(found.relpath) for found in listing.files):
        findings.missing.append("no weights file (e.g. adapter_model.safetensors)")
    _check_files(path, listing, record, findings, deep=deep)

    if has_record:
        return verdict(Integrity.CORRUPT if findings.all() else Integrity.COMPLETE)
    if findings.damaged:
        return verdict(Integrity.CORRUPT)
    return verdict(Integrity.INCOMPLETE if findings.missing else Integrity.COMPLETE)


def final_problems(path: Path, *, deep: bool = True) -> tuple[str, ...]:
    """List what keeps ``output_dir/final`` from being a proven-complete final save."""
    kind = entry_kind(path)
    if kind is EntryKind.MISSING:
        return ("does not exist",)
    if kind is EntryKind.SYMLINK:
        return ("is a symlink: never followed",)
    if kind is not EntryKind.DIRECTORY:
        return ("not a directory",)
    listing = list_folder(path)
    findings = _Findings()
    record = _read_record(path, listing)
    if record is None:
        return (f"no commit record ({COMMIT_RECORD})",)
    if isinstance(record, str):
        return (record,)
    if record.reason != "final":
        findings.damaged.append(f"{COMMIT_RECORD} reason is {record.reason!r}, not 'final'")
    _check_files(path, listing, record, findings, deep=deep)
    return findings.all()


def verify_final(path: Path) -> bool:
    """Return whether ``output_dir/final`` is complete: its own record, every byte matching."""
    return not final_problems(path)


# --- the verdict cache --------------------------------------------------------------------

Fingerprint = tuple[object, ...]


def folder_fingerprint(path: Path) -> Fingerprint | None:
    """Summarise a folder's files so any write, truncation or swap changes it; None if absent.

    (name, size, mtime_ns) of every file, plus ctime and inode:
    ``os.utime`` can put an mtime back but not a ctime, and a different folder
    renamed into place has different inodes. It still cannot see an in-place
    rewrite within one timestamp tick, which is why a resume re-verifies fully.
    """
    if not is_real_dir(path):
        return None
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    listing = list_folder(path)
    return (
        info.st_dev,
        info.st_ino,
        tuple(
            (entry.relpath, entry.size, entry.mtime_ns, entry.ctime_ns, entry.inode)
            for entry in listing.files
        ),
        listing.irregular,
    )


@dataclass(frozen=True)
class _CachedVerdict:
    fingerprint: Fingerprint
    require_record: bool
    deep: bool
    entry: CheckpointEntry


class VerdictCache:
    """Remember verdicts per folder until any of its files changes.

    The supervisor re-scans output_dir on every watcher event; without the cache
    each scan would re-hash gigabytes of unchanged checkpoints. A deep verdict
    also answers a shallow question, never the other way round.
    """

    def __init__(
        self,
        verify: Callable[..., CheckpointEntry] = verify_checkpoint,
        verify_final_folder: Callable[[Path], bool] = verify_final,
    ) -> None:
        self._verify = verify
        self._verify_final = verify_final_folder
        self._verdicts: dict[Path, _CachedVerdict] = {}
        self._finals: dict[Path, tuple[Fingerprint, bool]] = {}
        #: Verdicts answered from the cache, and verifications actually run.
        self.hits = 0
        self.misses = 0

    def checkpoint(
        self, path: Path, *, require_record: bool, deep: bool = True, fresh: bool = False
    ) -> CheckpointEntry:
        """Verify ``path`` unless an equally strict verdict for the same files is cached.

        ``fresh=True`` always verifies (used right before resuming) and replaces
        the cached verdict, so a damage found then is what later scans see too.
        """
        before = folder_fingerprint(path)
        cached = self._verdicts.get(path)
        if (
            not fresh
            and before is not None
            and cached is not None
            and cached.fingerprint == before
            and cached.require_record == require_record
            and (cached.deep or not deep)
        ):
            self.hits += 1
            return cached.entry
        self.misses += 1
        entry = self._verify(path, require_record=require_record, deep=deep)
        # Fingerprint taken before verifying and compared after: a folder that
        # changed meanwhile (a save in flight) must not pin a verdict on files
        # that no longer exist as they were read.
        if before is not None and folder_fingerprint(path) == before:
            self._verdicts[path] = _CachedVerdict(before, require_record, deep, entry)
        else:
            self._verdicts.pop(path, None)
        return entry

    def final(self, path: Path) -> bool:
        """Return whether ``final/`` is complete, re-verifying only after it changed."""
        before = folder_fingerprint(path)
        cached = self._finals.get(path)
        if before is not None and cached is not None and cached[0] == before:
            self.hits += 1
            return cached[1]
        self.misses += 1
        complete = self._verify_final(path)
        if before is not None and folder_fingerprint(path) == before:
            self._finals[path] = (before, complete)
        else:
            self._finals.pop(path, None)
        return complete

    def forget(self, path: Path) -> None:
        """Drop what is cached for ``path`` (it was moved or deleted)."""
        self._verdicts.pop(path, None)
        self._finals.pop(path, None)

    def keep_only(self, paths: set[Path]) -> None:
        """Drop verdicts of folders no longer present, so the cache cannot grow without bound."""
        for stale in [path for path in self._verdicts if path not in paths]:
            del self._verdicts[stale]
