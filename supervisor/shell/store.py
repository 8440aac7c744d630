"""The checkpoint store: list, re-verify, quarantine and delete ``checkpoint-N`` folders.

The supervisor loop reaches checkpoints only through ``CheckpointStore``;
``FileCheckpointStore`` is the real one over an output_dir, and
``supervisor.shell.testing.FakeCheckpointStore`` the in-memory one.

Every mutation is a ``rename`` first (atomic: ``.warden/`` lives inside
output_dir, so on the same filesystem), then the slow part. Whenever it is
interrupted, output_dir holds either the untouched checkpoint or nothing by that
name, never a half-deleted folder that a restart could mistake for a checkpoint.
Nothing here follows a symlink: a ``checkpoint-N`` that is a symlink is listed
and refused, and deletion uses ``lstat`` and ``shutil.rmtree`` on real
directories only (rmtree itself unlinks symlinks inside, never their targets).

Also here, for the ``trainwarden checkpoints`` and ``prune`` commands:
``describe_checkpoints`` and ``plan_prune``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from supervisor.core import checkpoints, retention
from supervisor.core.model import CheckpointEntry, Inventory
from supervisor.shell.lock import held_by_someone
from supervisor.shell.verify import VerdictCache, list_folder, verify_checkpoint
from trainer_child.protocol import (
    EntryKind,
    Layout,
    atomic_write_bytes,
    checkpoint_name,
    checkpoint_step,
    entry_kind,
    fsync_dir,
    is_real_dir,
)

__all__ = [
    "QUARANTINED",
    "CheckpointRow",
    "CheckpointStore",
    "FileCheckpointStore",
    "RefusedError",
    "child_alive",
    "describe_checkpoints",
    "dir_size",
    "plan_prune",
]

log = structlog.get_logger()

#: A slot in quarantine or trash: the original name, plus ``-K`` when it was taken.
_SLOT_RE = re.compile(r"^checkpoint-(\d+)(?:-(\d+))?$")
_REASON_SUFFIX = ".reason.json"


class RefusedError(OSError):
    """The store will not touch this path: a symlink, or not a real directory.

    Raised instead of acting, so a planted symlink can never redirect a delete.
    An OSError (as ``shutil.rmtree`` raises for a symlink), so a caller that
    survives a failed filesystem operation survives this refusal too.
    """


def dir_size(path: Path) -> int:
    """Return the bytes of regular files at or below ``path``, never following a symlink."""
    kind = entry_kind(path)
    if kind is EntryKind.DIRECTORY:
        return list_folder(path).total_bytes
    if kind is EntryKind.FILE:
        with contextlib.suppress(FileNotFoundError):
            return os.lstat(path).st_size
    return 0


def child_alive(layout: Layout) -> bool:
    """Say whether a supervisor or its child holds ``.warden/lock`` (for the CLI).

    A lock we may not even open is treated as held: mistaking a live run for a
    dead one would call its save in flight "partial".
    """
    try:
        return held_by_someone(layout.lock)
    except PermissionError:
        return True


class CheckpointStore(Protocol):
    """What the supervisor loop may do with checkpoints; one method per policy action."""

    def inventory(self) -> Inventory:
        """Scan output_dir and judge every ``checkpoint-N`` (cached between changes)."""
        ...

    def verify_for_resume(self, step: int) -> CheckpointEntry:
        """Re-verify ``checkpoint-N`` fully, bypassing the cache, right before resuming."""
        ...

    def quarantine(self, step: int, reason: str) -> Path | None:
        """Move ``checkpoint-N`` into quarantine; return where it went (None if absent)."""
        ...

    def remove(self, step: int, reason: str) -> int:
        """Delete ``checkpoint-N`` via the trash; return the bytes freed (0 if absent)."""
        ...

    def empty_trash(self) -> int:
        """Delete everything in the trash; return the bytes freed."""
        ...

    def purge_quarantine(self) -> int:
        """Delete every quarantined checkpoint; return the bytes freed."""
        ...


class FileCheckpointStore:
    """The real store over one output_dir."""

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        *,
        require_record: bool,
        deep: bool = True,
        cache: VerdictCache | None = None,
    ) -> None:
        self.layout = Layout(output_dir)
        self.require_record = require_record
        self.deep = deep
        self.cache = cache if cache is not None else VerdictCache()

    # --- reading ----------------------------------------------------------------------

    def inventory(self) -> Inventory:
        """Scan output_dir and judge every ``checkpoint-N`` directly under it.

        A newly committed checkpoint is verified fully here, while its bytes are
        still in the page cache; unchanged ones are answered from the cache.
        """
        entries: list[CheckpointEntry] = []
        seen: set[Path] = set()
        try:
            with os.scandir(self.layout.output_dir) as iterator:
                listing = list(iterator)
        except FileNotFoundError:
            listing = []
        for dir_entry in listing:
            step = checkpoint_step(dir_entry.name)
            if step is None:
                continue
            path = Path(dir_entry.path)
            if entry_kind(path) is EntryKind.SYMLINK:
                # Judged without the cache: verify_checkpoint only lstats a symlink.
                entries.append(verify_checkpoint(path, require_record=self.require_record))
                continue
            seen.add(path)
            entries.append(
                self.cache.checkpoint(path, require_record=self.require_record, deep=self.deep)
            )
        self.cache.keep_only(seen)
        entries.sort(key=lambda entry: entry.step)
        return Inventory(
            entries=tuple(entries),
            final_complete=self._final_complete(),
            trash_bytes=dir_size(self.layout.trash),
            quarantine_bytes=dir_size(self.layout.quarantine),
        )

    def verify_for_resume(self, step: int) -> CheckpointEntry:
        """Re-verify ``checkpoint-N`` fully, bypassing the cache, right before resuming.

        The cache trusts (size, mtime); a byte flipped in place within one
        timestamp tick, or bit rot on disk, changes neither. The fresh verdict
        replaces the cached one, so a scan after a failed check agrees with it.
        """
        path = self.layout.checkpoint(step)
        if entry_kind(path) is EntryKind.SYMLINK:
            return verify_checkpoint(path, require_record=self.require_record)
        return self.cache.checkpoint(
            path, require_record=self.require_record, deep=True, fresh=True
        )

    # --- mutations ----------------------------------------------------------------------

    def quarantine(self, step: int, reason: str) -> Path | None:
        """Move ``checkpoint-N`` into ``.warden/quarantine/`` as evidence; None if absent.

        The reason file is written beside the slot *after* the rename: written
        inside the checkpoint first, a crash between the two would leave a
        modified checkpoint-N in output_dir.
        """
        source = self._source(step)
        if source is None:
            return None
        slot = self._move_into(self.layout.quarantine, source)
        record = {"step": step, "reason": reason, "quarantined_wall_time": time.time()}
        atomic_write_bytes(
            slot.with_name(slot.name + _REASON_SUFFIX),
            json.dumps(record, indent=1).encode() + b"\n",
        )
        log.debug("checkpoint_quarantined", step=step, reason=reason, slot=str(slot))
        return slot

    def remove(self, step: int, reason: str) -> int:
        """Delete ``checkpoint-N``: rename into ``.warden/trash/``, then remove; 0 if absent.

        If the removal fails part way (EIO, a permission), the rest stays in the
        trash, is counted in ``trash_bytes`` and goes with the next empty_trash.
        """
        source = self._source(step)
        if source is None:
            return 0
        size = dir_size(source)
        slot = self._move_into(self.layout.trash, source)
        freed = size - _delete_slot(slot)
        log.debug("checkpoint_removed", step=step, reason=reason, bytes=freed)
        return freed

    def empty_trash(self) -> int:
        """Delete everything in ``.warden/trash/``; return the bytes freed."""
        return self._empty(self.layout.trash)

    def purge_quarantine(self) -> int:
        """Delete every quarantined checkpoint and its reason file; return the bytes freed."""
        return self._empty(self.layout.quarantine)

    # --- internals ----------------------------------------------------------------------

    def _source(self, step: int) -> Path | None:
        """Return ``checkpoint-N`` if it exists and may be moved; refuse a symlink."""
        path = self.layout.checkpoint(step)
        kind = entry_kind(path)
        if kind is EntryKind.MISSING:
            return None
        if kind is EntryKind.SYMLINK:
            raise RefusedError(f"{path} is a symlink: trainwarden never moves or deletes one")
        return path

    def _warden_subdir(self, path: Path) -> Path:
        """Create ``path`` under ``.warden/`` and make sure neither is a symlink.

        A planted ``.warden/trash -> /elsewhere`` would otherwise turn a delete
        of a checkpoint into a move (or rmtree) outside output_dir.
        """
        self.layout.ensure()
        self._refuse_unless_real_dirs(path)
        return path

    def _refuse_unless_real_dirs(self, path: Path) -> None:
        """Raise RefusedError unless ``.warden`` and ``path`` are real directories."""
        for part in (self.layout.warden, path):
            if not is_real_dir(part):
                raise RefusedError(f"{part} is not a real directory: refusing to use it")

    def _move_into(self, folder: Path, source: Path) -> Path:
        """Rename ``source`` into a free slot of ``folder`` and make both renames durable."""
        folder = self._warden_subdir(folder)
        slot = folder / source.name
        suffix = 0
        # A dangling symlink still occupies the name, and
        # rename() over an existing *empty* directory would silently replace it.
        while _taken(slot) or _taken(slot.with_name(slot.name + _REASON_SUFFIX)):
            suffix += 1
            slot = folder / f"{source.name}-{suffix}"
        os.rename(source, slot)
        self.cache.forget(source)
        # Durable before anything is deleted: after a power cut the folder must
        # be in the trash (or still intact), not back in output_dir half empty.
        fsync_dir(self.layout.output_dir)
        fsync_dir(folder)
        return slot

    def _empty(self, folder: Path) -> int:
        """Delete every slot in ``folder`` (trash or quarantine); return the bytes freed."""
        if entry_kind(folder) is EntryKind.MISSING:
            return 0
        self._refuse_unless_real_dirs(folder)
        with os.scandir(folder) as iterator:
            slots = [Path(entry.path) for entry in iterator]
        return sum(dir_size(slot) - _delete_slot(slot) for slot in slots)

    def _final_complete(self) -> bool:
        """Say whether ``final/`` is a real, complete final save (cached like checkpoints)."""
        if not is_real_dir(self.layout.final):
            return False
        return self.cache.final(self.layout.final)


def _taken(path: Path) -> bool:
    """Whether a name is in use: a dangling symlink occupies it as much as a folder."""
    return entry_kind(path) is not EntryKind.MISSING


def _delete_slot(slot: Path) -> int:
    """Delete one trash or quarantine slot; return the bytes that could not be deleted.

    A symlink is unlinked, never followed; a real directory goes with rmtree,
    which on Linux works through directory fds and unlinks symlinks inside.
    """
    kind = entry_kind(slot)
    if kind is EntryKind.MISSING:
        return 0
    try:
        if kind is EntryKind.DIRECTORY:
            shutil.rmtree(slot)
        else:
            os.unlink(slot)
    except OSError as exc:
        left = dir_size(slot)
        log.warning("delete_incomplete", path=str(slot), error=str(exc), bytes_left=left)
        return left
    return 0


# --- views for the CLI ----------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointRow:
    """One line of ``trainwarden checkpoints``."""

    step: int
    #: A CheckpointStatus value (valid, in_progress, partial, corrupt, symlink) or
    #: "quarantined" for folders under .warden/quarantine/.
    status: str
    size_bytes: int
    problems: tuple[str, ...]
    #: Where it is, relative to output_dir (quarantined ones live under .warden/).
    name: str


QUARANTINED = "quarantined"


def _infer_require_record(layout: Layout) -> bool:
    """Records are required where the built-in job ran: it leaves ``.warden/job.json``."""
    return os.path.isfile(layout.job)


def describe_checkpoints(
    output_dir: str | os.PathLike[str], deep: bool = False, *, require_record: bool | None = None
) -> list[CheckpointRow]:
    """List every checkpoint of a run, quarantined ones included, oldest first.

    ``require_record=None`` infers it: the built-in job's checkpoints must carry
    a record, a plain HF script's are judged by structure. A run whose lock is
    held counts as alive, so its newest incomplete folder reads "in_progress".
    """
    layout = Layout(output_dir)
    if require_record is None:
        require_record = _infer_require_record(layout)
    store = FileCheckpointStore(layout.output_dir, require_record=require_record, deep=deep)
    inventory = store.inventory()
    statuses = checkpoints.statuses_of(inventory, child_alive(layout))
    rows = [
        CheckpointRow(
            entry.step,
            statuses[entry.step].value,
            entry.size_bytes,
            entry.problems,
            checkpoint_name(entry.step),
        )
        for entry in inventory.entries
    ]
    rows += _quarantined_rows(layout)
    rows.sort(key=lambda row: (row.step, row.status == QUARANTINED, row.name))
    return rows


def _quarantined_rows(layout: Layout) -> list[CheckpointRow]:
    if not is_real_dir(layout.quarantine):
        return []
    rows: list[CheckpointRow] = []
    with os.scandir(layout.quarantine) as iterator:
        entries = list(iterator)
    for entry in entries:
        match = _SLOT_RE.match(entry.name)
        if match is None:
            continue
        reason = _read_reason(Path(entry.path + _REASON_SUFFIX))
        rows.append(
            CheckpointRow(
                int(match.group(1)),
                QUARANTINED,
                dir_size(Path(entry.path)),
                (reason,) if reason else (),
                f".warden/quarantine/{entry.name}",
            )
        )
    return rows


def _read_reason(path: Path) -> str | None:
    try:
        reason = json.loads(path.read_bytes()).get("reason")
    except (OSError, ValueError, AttributeError):
        return None
    return reason if isinstance(reason, str) else None


def plan_prune(
    output_dir: str | os.PathLike[str],
    keep_last: int,
    keep_best: bool = True,
    keep_every: int | None = None,
    *,
    require_record: bool | None = None,
) -> list[int]:
    """Return the steps ``trainwarden prune`` would delete, oldest first.

    Verifies deep: a checkpoint counted among the ``keep_last`` must really be
    resumable, or pruning could keep a damaged one and delete the last good one.
    The CLI cannot know which step a running child resumed from; with a child
    alive that step is protected only while it is the newest valid one.
    """
    layout = Layout(output_dir)
    if require_record is None:
        require_record = _infer_require_record(layout)
    inventory = FileCheckpointStore(layout.output_dir, require_record=require_record).inventory()
    return list(
        retention.select_for_removal(
            inventory, keep_last=keep_last, keep_best=keep_best, keep_every=keep_every
        )
    )
