"""The remote copy of a run: ``RemoteStore`` over any fsspec URL (s3://, gs://, file://).

The remote prefix mirrors ``output_dir``'s own layout, so a plain ``aws s3 sync``
of it is a usable output_dir::

    <prefix>/checkpoint-N/...          every file the commit record lists
    <prefix>/checkpoint-N/warden.json  the commit record, uploaded LAST
    <prefix>/final/...  + warden.json  the final save, record last too
    <prefix>/.warden/state.json        the supervisor's durable run state
    <prefix>/.warden/quarantine/checkpoint-N[-K]/ (+ .reason.json)  evidence
    <prefix>/.warden/probe-*           the start-up probe (deleted at once)

Validity rule, the same as on the local disk: a remote ``checkpoint-N`` counts only
when its ``warden.json`` parses, names step N, and every file it lists is present
with the listed size. The record goes up only after every file has been confirmed
remote with its size, so an upload cut short at any point (network loss, SIGKILL,
power cut) leaves a folder without a record, which nothing ever resumes from and
``prune`` deletes later. Sizes are judged from a listing; hashes are checked on
download, where every byte is read anyway (``download_checkpoint``).

Every mutation removes validity first: a re-upload of step N deletes the old
record before the first file is replaced, ``remove`` deletes the record before the
files, ``quarantine`` moves the record away before the files. A crash in between
leaves an invalid folder, never a record that describes other bytes.

Concurrency: one ``RemoteStore`` may be used from several threads (the worker's
transfer threads, the loop calling ``restore``). Steps being uploaded or
downloaded are pinned, so ``remove``/``prune`` refuse to delete them. One run per
prefix: two supervisors writing the same prefix are not detected.

Nothing here logs a credential: messages pass through ``Redactor``.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import shutil
import socket
import stat
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, TypeVar

import fsspec
import structlog
from pydantic import ValidationError

from supervisor.core.model import CheckpointEntry, Integrity, Inventory
from supervisor.core.retention import RetentionPlan, plan_retention
from supervisor.shell.mirror.errors import (
    LocalMismatch,
    MirrorError,
    Pinned,
    ProbeFailed,
    Redactor,
    RemoteCorrupt,
)
from supervisor.shell.verify import read_and_check, safe_relpath
from trainer_child.protocol import (
    COMMIT_RECORD,
    TRAINER_STATE,
    CommitRecord,
    FileEntry,
    Layout,
    RunStateFile,
    atomic_write_bytes,
    atomic_write_model,
    checkpoint_name,
    checkpoint_step,
    fsync_dir,
)

__all__ = [
    "INCOMING",
    "PruneResult",
    "RemoteCheckpoint",
    "RemoteInventory",
    "RemoteStatus",
    "RemoteStore",
    "Sequential",
    "Transfers",
    "UploadResult",
    "clear_incoming",
    "plan_remote_retention",
]

log = structlog.get_logger()

T = TypeVar("T")

#: Downloads are staged in ``.warden/incoming/restore-*``: inside output_dir (so the
#: final rename is atomic, same filesystem) but never named like a checkpoint.
INCOMING = "incoming"
_REASON_SUFFIX = ".reason.json"
_FINAL = "final"
_WARDEN = ".warden"
_STATE = "state.json"
_QUARANTINE = "quarantine"


# --- what the remote holds ------------------------------------------------------------


class RemoteStatus(enum.Enum):
    """What one remote ``checkpoint-N/`` (or ``final/``) proves, from a listing and its record.

    VALID: the record parses, names N, and every file it lists is present with
    its size (hashes are checked on download). NO_RECORD: files but no record: an
    upload cut short, or a delete under way; never used, pruned later. DAMAGED: a
    record is present but unreadable, names another step, or lists a file that is
    missing or has another size; quarantined by ``prune``.
    """

    VALID = "valid"
    NO_RECORD = "no_record"
    DAMAGED = "damaged"


@dataclass(frozen=True)
class RemoteCheckpoint:
    """One remote ``checkpoint-N/`` as the listing and its record show it."""

    step: int
    status: RemoteStatus
    size_bytes: int = 0
    problems: tuple[str, ...] = ()
    #: Step named by trainer_state's ``best_model_checkpoint``; read only by ``prune``.
    best_step: int | None = None


@dataclass(frozen=True)
class RemoteInventory:
    """Everything under the remote prefix that restore and retention decide on."""

    checkpoints: tuple[RemoteCheckpoint, ...] = ()
    #: None when there is no remote ``final/`` at all.
    final: RemoteStatus | None = None
    state_present: bool = False
    #: Slot names under ``.warden/quarantine/``.
    quarantined: tuple[str, ...] = ()

    @property
    def final_complete(self) -> bool:
        return self.final is RemoteStatus.VALID

    def get(self, step: int) -> RemoteCheckpoint | None:
        return next((entry for entry in self.checkpoints if entry.step == step), None)

    def valid_steps(self, exclude: Iterable[int] = ()) -> list[int]:
        """Steps of valid remote checkpoints, oldest first, minus ``exclude``."""
        excluded = frozenset(exclude)
        return [
            entry.step
            for entry in self.checkpoints
            if entry.status is RemoteStatus.VALID and entry.step not in excluded
        ]

    def newest_valid(self, exclude: Iterable[int] = ()) -> int | None:
        steps = self.valid_steps(exclude)
        return steps[-1] if steps else None

    def as_inventory(self) -> Inventory:
        """The same facts in the local inventory's terms, so local retention rules apply as-is."""
        integrity = {
            RemoteStatus.VALID: Integrity.COMPLETE,
            RemoteStatus.NO_RECORD: Integrity.INCOMPLETE,
            RemoteStatus.DAMAGED: Integrity.CORRUPT,
        }
        return Inventory(
            entries=tuple(
                CheckpointEntry(
                    entry.step,
                    integrity[entry.status],
                    size_bytes=entry.size_bytes,
                    problems=entry.problems,
                    has_record=entry.status is not RemoteStatus.NO_RECORD,
                    best_step=entry.best_step,
                )
                for entry in self.checkpoints
            ),
            final_complete=self.final_complete,
        )


@dataclass(frozen=True)
class UploadResult:
    """What one upload moved; ``already_remote`` when an identical valid copy was there."""

    name: str
    step: int | None
    files: int
    bytes: int
    seconds: float
    already_remote: bool = False


@dataclass(frozen=True)
class PruneResult:
    """What ``RemoteStore.prune`` did, for the journal."""

    removed: tuple[int, ...] = ()
    partial_removed: tuple[int, ...] = ()
    quarantined: tuple[int, ...] = ()
    kept: tuple[tuple[int, str], ...] = ()
    bytes_freed: int = 0


def plan_remote_retention(
    inventory: RemoteInventory,
    *,
    keep_last: int,
    keep_best: bool = True,
    keep_every: int | None = None,
    pinned: Iterable[int] = (),
) -> RetentionPlan:
    """Decide which valid remote checkpoints to delete, by exactly the local rules.

    The local retention function keeps the newest valid checkpoint whatever the
    settings; ``pinned`` (being downloaded, or otherwise in use) is passed as its
    ``protected`` set. Only VALID remote checkpoints are ever candidates.
    """
    return plan_retention(
        inventory.as_inventory(),
        keep_last=keep_last,
        keep_best=keep_best,
        keep_every=keep_every,
        protected=frozenset(pinned),
    )


# --- how file transfers run -------------------------------------------------------------


class Transfers(Protocol):
    """Runs a batch of independent transfers; the worker's bounded pool implements it."""

    def run(self, tasks: Sequence[Callable[[], T]]) -> list[T]:
        """Run every task, wait for all of them, re-raise the first failure."""
        ...


class Sequential:
    """Run transfers one after another in the calling thread (the default)."""

    def run(self, tasks: Sequence[Callable[[], T]]) -> list[T]:
        return [task() for task in tasks]


# --- the store ------------------------------------------------------------------------------


def clear_incoming(layout: Layout) -> int:
    """Delete downloads a crash left in ``.warden/incoming/``; return how many.

    Call only while holding the run lock: a live download of this process
    would be deleted too.
    """
    incoming = layout.warden / INCOMING
    if not incoming.is_dir() or incoming.is_symlink():
        return 0
    count = 0
    for entry in incoming.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        count += 1
    return count


class RemoteStore:
    """Upload, list, verify-on-download, quarantine and delete checkpoints under one URL.

    ``url`` is any fsspec URL (``s3://bucket/prefix``, ``gs://bucket/prefix``,
    ``file:///mnt/nfs/runs/demo``); ``storage_options`` go to the backend as they
    are (``key``/``secret``, ``client_kwargs={"endpoint_url": ...}``, ``token``...).
    Without them s3fs and gcsfs find credentials in the environment and instance
    roles, which is the recommended way.

    Construction raises ``ProbeFailed`` (exit 78) when the backend is missing or
    rejects the options. Methods raise ``MirrorError`` subclasses for what they
    judged (see errors.py) and let a backend's own exceptions through for
    "unreachable or refusing"; ``describe`` turns any of them into a secret-free line.
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        options = dict(storage_options or {})
        self.redactor = Redactor(url, options)
        #: The URL as it may be shown: no password, no query.
        self.url = self.redactor.url
        # Listings must be fresh: a cached listing could call a deleted file present.
        options.setdefault("use_listings_cache", False)
        try:
            protocol = fsspec.core.split_protocol(url)[0] or "file"
            if protocol in ("file", "local"):
                # Object stores have no folders; a local mirror needs them created.
                options.setdefault("auto_mkdir", True)
            fs, root = fsspec.core.url_to_fs(url, **options)
        except ImportError as exc:
            extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(protocol)
            hint = f": pip install 'trainwarden[{extra}]'" if extra else ""
            raise ProbeFailed(
                f"mirror {self.url}: the {protocol}:// backend is not installed{hint} "
                f"({self.redactor.describe(exc)})"
            ) from None
        except Exception as exc:
            raise ProbeFailed(
                f"mirror {self.url}: cannot open ({self.redactor.describe(exc)})"
            ) from None
        self.fs: Any = fs
        self.root: str = str(root).rstrip("/")
        self.local = "file" in _protocols(fs)
        self._pins_lock = threading.Lock()
        self._uploading: Counter[int] = Counter()
        self._downloading: Counter[int] = Counter()

    # --- paths and small helpers -------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def describe(self, exc: BaseException) -> str:
        """A one-line, secret-free description of a failure (for logs and status lines)."""
        return self.redactor.describe(exc)

    def _list(self, prefix: str) -> dict[str, int]:
        """Map every object below ``prefix`` (relative path) to its size; {} when none."""
        try:
            found = self.fs.find(prefix, detail=True)
        except FileNotFoundError:
            if self.local:
                return {}
            raise
        start = len(prefix) + 1
        listing: dict[str, int] = {}
        for path, info in found.items():
            if info.get("type", "file") != "file" or len(path) <= start:
                continue
            listing[path[start:]] = int(info.get("size") or 0)
        return listing

    def _cat(self, path: str) -> bytes | None:
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        return bytes(data)

    def _rm_file(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    def _put_file(self, source: Path, dest: str) -> None:
        self.fs.put_file(str(source), dest)
        if self.local:
            # A file:// mirror (an NFS mount, a second disk) gets the local
            # durability rule: bytes durable before the record that vouches for them.
            _fsync_file(Path(dest))

    def _put_bytes(self, dest: str, data: bytes) -> None:
        """Write a small object so a reader sees the old or the new one, never half."""
        if self.local:
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(dest, data)
        else:
            # One PUT is atomic on every object store.
            self.fs.pipe_file(dest, data)

    def _sync_local_dirs(self, folder: str) -> None:
        if not self.local:
            return
        for dirpath, _dirs, _files in os.walk(folder, topdown=False):
            fsync_dir(dirpath)
        fsync_dir(Path(folder).parent)

    @contextlib.contextmanager
    def _pin(self, counter: Counter[int], step: int | None) -> Iterator[None]:
        if step is None:
            yield
            return
        with self._pins_lock:
            counter[step] += 1
        try:
            yield
        finally:
            with self._pins_lock:
                counter[step] -= 1
                if counter[step] <= 0:
                    del counter[step]

    def pinned(self) -> frozenset[int]:
        """Steps being uploaded or downloaded right now: never deleted remotely."""
        with self._pins_lock:
            return frozenset(self._uploading) | frozenset(self._downloading)

    # --- probe ----------------------------------------------------------------------------

    def probe(self) -> float:
        """Write, list, read back and delete a probe object; return the seconds it took.

        Run at start so a wrong bucket or bad credentials stop the run at once
        (``ProbeFailed``, exit 78) instead of surfacing hours later as a lag.
        Each step needs a permission the mirror needs later: PUT for uploads,
        LIST for the inventory, GET for restore, DELETE for retention.
        """
        started = time.monotonic()
        name = f"probe-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path = self._path(_WARDEN, name)
        payload = f"trainwarden probe {name}\n".encode()

        def step(what: str, action: Callable[[], object]) -> object:
            try:
                return action()
            except Exception as exc:
                raise ProbeFailed(
                    f"mirror {self.url}: cannot {what} ({self.describe(exc)}); "
                    "check mirror.url, that the bucket exists, and the credentials"
                ) from None

        step("write a probe object", lambda: self._put_bytes(path, payload))
        try:
            listed = step("list the prefix", lambda: self._list(self._path(_WARDEN)))
            read = step("read the probe object back", lambda: self._cat(path))
        except ProbeFailed:
            with contextlib.suppress(Exception):
                self._rm_file(path)
            raise
        step("delete the probe object", lambda: self._rm_file(path))
        if not isinstance(listed, dict) or name not in listed:
            raise ProbeFailed(f"mirror {self.url}: a probe object written is not listed")
        if read != payload:
            raise ProbeFailed(f"mirror {self.url}: the probe object read back differs")
        seconds = time.monotonic() - started
        log.info("mirror_probe_ok", url=self.url, seconds=round(seconds, 3))
        return seconds

    # --- inventory ------------------------------------------------------------------------

    def inventory(self, *, read_best: bool = False) -> RemoteInventory:
        """List the prefix once and judge every ``checkpoint-N/`` and ``final/`` in it.

        Reads each record (small GETs); sizes come from the listing. With
        ``read_best`` the newest valid checkpoint's ``trainer_state.json`` is read
        too, for ``keep_best``.
        """
        listing = self._list(self.root)
        folders: dict[str, dict[str, int]] = {}
        quarantined: set[str] = set()
        state_present = False
        for relpath, size in listing.items():
            head, _, rest = relpath.partition("/")
            if not rest:
                continue
            if head == _WARDEN:
                if rest == _STATE:
                    state_present = True
                elif rest.startswith(_QUARANTINE + "/"):
                    slot = rest.split("/")[1]
                    if not slot.endswith(_REASON_SUFFIX):
                        quarantined.add(slot)
                continue
            folders.setdefault(head, {})[rest] = size

        checkpoints: list[RemoteCheckpoint] = []
        final: RemoteStatus | None = None
        for name, files in folders.items():
            step = checkpoint_step(name)
            if name == _FINAL:
                final = self._judge(name, None, files).status
            elif step is not None and name == checkpoint_name(step):
                checkpoints.append(self._judge(name, step, files))
        checkpoints.sort(key=lambda entry: entry.step)
        if read_best:
            checkpoints = self._with_best_step(checkpoints)
        return RemoteInventory(
            checkpoints=tuple(checkpoints),
            final=final,
            state_present=state_present,
            quarantined=tuple(sorted(quarantined)),
        )

    def _judge(self, name: str, step: int | None, files: Mapping[str, int]) -> RemoteCheckpoint:
        size = sum(files.values())
        number = step if step is not None else -1
        if COMMIT_RECORD not in files:
            return RemoteCheckpoint(number, RemoteStatus.NO_RECORD, size)
        raw = self._cat(self._path(name, COMMIT_RECORD))
        if raw is None:  # deleted between the listing and the read
            return RemoteCheckpoint(number, RemoteStatus.NO_RECORD, size)
        record, problems = _parse_record(raw, step, final=step is None)
        if record is not None:
            for entry in record.files:
                relpath = safe_relpath(entry.path)
                found = files.get(relpath) if relpath is not None else None
                if relpath is None:
                    problems.append(f"record lists an unsafe path {entry.path!r}")
                elif found is None:
                    problems.append(f"{relpath}: listed in the record but not remote")
                elif found != entry.size:
                    problems.append(
                        f"{relpath}: {found} bytes remote, the record says {entry.size}"
                    )
        status = RemoteStatus.DAMAGED if problems else RemoteStatus.VALID
        return RemoteCheckpoint(number, status, size, tuple(problems))

    def _with_best_step(self, checkpoints: list[RemoteCheckpoint]) -> list[RemoteCheckpoint]:
        valid = [entry for entry in checkpoints if entry.status is RemoteStatus.VALID]
        if not valid:
            return checkpoints
        newest = valid[-1]
        raw = self._cat(self._path(f"checkpoint-{newest.step}", TRAINER_STATE))
        best_step = None
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            best = json.loads(raw or b"{}").get("best_model_checkpoint")
            best_step = checkpoint_step(PurePosixPath(best).name) if isinstance(best, str) else None
        if best_step is None:
            return checkpoints
        return [
            RemoteCheckpoint(e.step, e.status, e.size_bytes, e.problems, best_step)
            if e is newest
            else e
            for e in checkpoints
        ]

    # --- uploads --------------------------------------------------------------------------

    def upload_checkpoint(
        self, local_dir: Path, step: int, *, transfers: Transfers | None = None
    ) -> UploadResult:
        """Upload ``local_dir`` (a committed ``checkpoint-N``) so that it becomes remote-valid.

        Every file the local record lists is hashed (it must still match the
        record: damaged local bytes are never made valid remotely), uploaded and
        then confirmed remote with its size by one listing; only then does
        ``warden.json`` go up. An identical valid remote copy is left alone.
        Raises ``LocalMismatch`` (not worth retrying) when the folder vanished or
        disagrees with its record; backend errors pass through (retry later).
        """
        with self._pin(self._uploading, step):
            return self._upload_folder(
                Path(local_dir), checkpoint_name(step), step, transfers or Sequential()
            )

    def upload_final(self, final_dir: Path, *, transfers: Transfers | None = None) -> UploadResult:
        """Upload ``output_dir/final`` by the same rule (record last, reason ``final``)."""
        return self._upload_folder(Path(final_dir), _FINAL, None, transfers or Sequential())

    def upload_state(self, state_path: Path) -> UploadResult:
        """Upload ``.warden/state.json`` (overrides, restart budget, completion), atomically.

        The file is read and parsed first: a half-written or foreign file is
        never mirrored over a good remote copy.
        """
        started = time.monotonic()
        try:
            data = Path(state_path).read_bytes()
            RunStateFile.model_validate_json(data)
        except FileNotFoundError:
            raise LocalMismatch(f"{state_path} does not exist") from None
        except (ValueError, ValidationError) as exc:
            raise LocalMismatch(f"{state_path} is not a valid state file ({exc})") from None
        self._put_bytes(self._path(_WARDEN, _STATE), data)
        return UploadResult(_STATE, None, 1, len(data), time.monotonic() - started)

    def _upload_folder(
        self, local_dir: Path, name: str, step: int | None, transfers: Transfers
    ) -> UploadResult:
        started = time.monotonic()
        record_bytes, record = _read_local_record(local_dir, step)
        remote_dir = self._path(name)
        record_path = self._path(name, COMMIT_RECORD)
        entries = [(_checked_relpath(local_dir, e.path), e.size, e.hash) for e in record.files]
        total = sum(size for _, size, _ in entries)

        if self._cat(record_path) == record_bytes:
            listing = self._list(remote_dir)
            if all(listing.get(relpath) == size for relpath, size, _ in entries):
                return UploadResult(name, step, len(entries), 0, 0.0, already_remote=True)
        # Whatever is there now stops being valid before the first byte changes.
        self._rm_file(record_path)

        def upload(relpath: str, size: int, digest: str) -> None:
            source = local_dir / relpath
            try:
                found, _, read = read_and_check(source, record.hash_algorithm)
            except FileNotFoundError:
                raise LocalMismatch(
                    f"{local_dir.name}/{relpath} vanished locally before upload"
                ) from None
            if read != size or found != digest:
                raise LocalMismatch(
                    f"{local_dir.name}/{relpath} no longer matches its commit record locally"
                )
            self._put_file(source, self._path(name, relpath))

        transfers.run([_bind(upload, *entry) for entry in entries])

        listing = self._list(remote_dir)
        missing = [
            f"{relpath} ({listing.get(relpath)} of {size} bytes)"
            for relpath, size, _ in entries
            if listing.get(relpath) != size
        ]
        if missing:
            raise MirrorError(f"mirror {self.url}: {name} not confirmed remote: {missing[:3]}")
        listed = {relpath for relpath, _, _ in entries}
        for extra in sorted(set(listing) - listed - {COMMIT_RECORD}):
            # Left by an older upload of the same step; the record will not list it.
            self._rm_file(self._path(name, extra))
        self._sync_local_dirs(remote_dir)
        self._put_bytes(record_path, record_bytes)
        seconds = time.monotonic() - started
        log.info(
            "mirror_uploaded",
            url=self.url,
            name=name,
            files=len(entries),
            bytes=total,
            seconds=round(seconds, 3),
        )
        return UploadResult(name, step, len(entries), total, seconds)

    # --- downloads ------------------------------------------------------------------------

    def download_checkpoint(
        self, step: int, layout: Layout, *, transfers: Transfers | None = None
    ) -> Path:
        """Download remote ``checkpoint-N`` into ``output_dir/checkpoint-N``, verified.

        Files land in ``.warden/incoming/restore-*`` first; every size and hash
        is checked against the remote record, every file and folder fsynced, and
        only then is the folder renamed into place (atomic: a crash leaves no
        partial ``checkpoint-N``). Raises ``RemoteCorrupt`` naming the bad files
        (quarantine the remote copy and try an older one), ``MirrorError`` when
        the remote copy has no valid record or the target already exists.
        """
        target = layout.checkpoint(step)
        with self._pin(self._downloading, step):
            return self._download_folder(checkpoint_name(step), step, layout, target, transfers)

    def download_final(self, layout: Layout, *, transfers: Transfers | None = None) -> Path:
        """Download remote ``final/`` into ``output_dir/final`` by the same rules."""
        return self._download_folder(_FINAL, None, layout, layout.final, transfers)

    def download_state(self, layout: Layout) -> RunStateFile | None:
        """Write the remote ``state.json`` to ``.warden/state.json``; None when there is none.

        The pids in it belong to the lost machine; they are cleared so no
        process here is ever taken for the old supervisor or its child.
        """
        raw = self._cat(self._path(_WARDEN, _STATE))
        if raw is None:
            return None
        try:
            state = RunStateFile.model_validate_json(raw)
        except (ValueError, ValidationError):
            log.warning("mirror_state_unreadable", url=self.url)
            return None
        state = state.model_copy(
            update={"supervisor_pid": None, "child_pid": None, "child_create_time": None}
        )
        layout.ensure()
        atomic_write_model(layout.state, state)
        return state

    def _download_folder(
        self,
        name: str,
        step: int | None,
        layout: Layout,
        target: Path,
        transfers: Transfers | None,
    ) -> Path:
        if os.path.lexists(target):
            raise MirrorError(f"{target} exists: move it aside before downloading {name}")
        raw, record, entries = self._remote_record(name, step)
        started = time.monotonic()
        layout.ensure()
        incoming = layout.warden / INCOMING
        incoming.mkdir(exist_ok=True)
        label = f"step-{step}" if step is not None else _FINAL
        staging = incoming / f"restore-{label}-{uuid.uuid4().hex[:8]}"

        def fetch(relpath: str, size: int, digest: str) -> str | None:
            dest = staging / relpath
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.fs.get_file(self._path(name, relpath), str(dest))
            except FileNotFoundError:
                return f"{relpath}: listed in the record but not remote"
            found, _, read = read_and_check(dest, record.hash_algorithm)
            if read != size:
                return f"{relpath}: {read} bytes downloaded, the record says {size}"
            if found != digest:
                return f"{relpath}: hash mismatch, the remote bytes differ from the record"
            _fsync_file(dest)
            return None

        with _removed_on_error(staging):
            tasks = [_bind(fetch, rel, e.size, e.hash) for rel, e in entries if rel is not None]
            bad = [problem for problem in (transfers or Sequential()).run(tasks) if problem]
            if bad:
                raise RemoteCorrupt(
                    f"mirror {self.url}: {name} is corrupt: {'; '.join(bad[:3])}"
                    + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""),
                    step=step,
                    files=[problem.split(":", 1)[0] for problem in bad],
                )
            atomic_write_bytes(staging / COMMIT_RECORD, raw)
            for dirpath, _dirs, _files in os.walk(staging, topdown=False):
                fsync_dir(dirpath)
            os.rename(staging, target)
        fsync_dir(incoming)
        fsync_dir(layout.output_dir)
        total = sum(entry.size for _, entry in entries)
        seconds = time.monotonic() - started
        log.info(
            "mirror_downloaded",
            url=self.url,
            name=name,
            files=len(entries),
            bytes=total,
            seconds=round(seconds, 3),
        )
        return target

    def _remote_record(
        self, name: str, step: int | None
    ) -> tuple[bytes, CommitRecord, list[tuple[str | None, FileEntry]]]:
        """Read and check the remote record of ``name``; its files with their safe paths."""
        raw = self._cat(self._path(name, COMMIT_RECORD))
        if raw is None:
            raise MirrorError(f"mirror {self.url}: {name} has no commit record remote")
        record, problems = _parse_record(raw, step, final=step is None)
        if record is None or problems:
            raise RemoteCorrupt(
                f"mirror {self.url}: {name}/{COMMIT_RECORD} is unusable: {'; '.join(problems)}",
                step=step,
                files=(COMMIT_RECORD,),
            )
        entries = [(safe_relpath(e.path), e) for e in record.files]
        unsafe = [entry.path for relpath, entry in entries if relpath is None]
        if unsafe:
            raise RemoteCorrupt(
                f"mirror {self.url}: {name}/{COMMIT_RECORD} lists unsafe paths {unsafe[:3]}",
                step=step,
                files=(COMMIT_RECORD,),
            )
        return raw, record, entries

    # --- removal --------------------------------------------------------------------------

    def quarantine(self, step: int, reason: str) -> str | None:
        """Move remote ``checkpoint-N`` into ``.warden/quarantine/``; return where (None if absent).

        The record moves first, so the copy stops being valid before anything
        else changes; the reason goes beside the slot, as on the local disk.
        """
        name = checkpoint_name(step)
        files = self._list(self._path(name))
        if not files:
            return None
        if step in self.pinned():
            raise Pinned(f"mirror {self.url}: {name} is being transferred; not quarantined")
        taken = set(self._list(self._path(_WARDEN, _QUARANTINE)))
        slot = name
        suffix = 0
        while any(path == slot + _REASON_SUFFIX or path.startswith(slot + "/") for path in taken):
            suffix += 1
            slot = f"{name}-{suffix}"
        ordered = sorted(files, key=lambda relpath: relpath != COMMIT_RECORD)
        for relpath in ordered:
            self.fs.mv(self._path(name, relpath), self._path(_WARDEN, _QUARANTINE, slot, relpath))
        note = {"step": step, "reason": reason, "quarantined_wall_time": time.time()}
        self._put_bytes(
            self._path(_WARDEN, _QUARANTINE, slot + _REASON_SUFFIX),
            json.dumps(note, indent=1).encode() + b"\n",
        )
        if self.local:
            shutil.rmtree(self._path(name), ignore_errors=True)
        log.warning("mirror_quarantined", url=self.url, step=step, reason=reason, slot=slot)
        return f"{self.url}/{_WARDEN}/{_QUARANTINE}/{slot}"

    def remove(self, step: int) -> int:
        """Delete remote ``checkpoint-N``: the record first, then the files; return bytes freed."""
        name = checkpoint_name(step)
        if step in self.pinned():
            raise Pinned(f"mirror {self.url}: {name} is being transferred; not removed")
        files = self._list(self._path(name))
        if not files:
            return 0
        self._rm_file(self._path(name, COMMIT_RECORD))
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(name), recursive=True)
        return sum(files.values())

    def prune(
        self,
        *,
        keep_last: int | None,
        keep_best: bool = True,
        keep_every: int | None = None,
        pinned: Iterable[int] = (),
    ) -> PruneResult:
        """Apply the local retention rules remotely and clean up what is not valid.

        Valid checkpoints go by ``plan_remote_retention`` (never the newest valid
        one, never a pinned one, never one being transferred). Record-less
        leftovers of uploads cut short are deleted; damaged ones are quarantined.
        ``keep_last=None`` keeps every valid checkpoint and only cleans up.
        """
        busy = self.pinned() | frozenset(pinned)
        inventory = self.inventory(read_best=keep_best and keep_last is not None)
        plan = plan_remote_retention(
            inventory,
            keep_last=len(inventory.checkpoints) if keep_last is None else keep_last,
            keep_best=keep_best,
            keep_every=keep_every,
            pinned=busy,
        )
        removed: list[int] = []
        partial: list[int] = []
        quarantined: list[int] = []
        freed = 0
        for step in plan.delete:
            with contextlib.suppress(Pinned):
                freed += self.remove(step)
                removed.append(step)
        for entry in inventory.checkpoints:
            if entry.step in busy:
                continue
            if entry.status is RemoteStatus.NO_RECORD:
                with contextlib.suppress(Pinned):
                    freed += self.remove(entry.step)
                    partial.append(entry.step)
            elif entry.status is RemoteStatus.DAMAGED:
                with contextlib.suppress(Pinned):
                    self.quarantine(entry.step, "; ".join(entry.problems) or "damaged")
                    quarantined.append(entry.step)
        result = PruneResult(tuple(removed), tuple(partial), tuple(quarantined), plan.kept, freed)
        if removed or partial or quarantined:
            log.info(
                "mirror_pruned",
                url=self.url,
                removed=list(removed),
                partial=list(partial),
                quarantined=list(quarantined),
                bytes=freed,
            )
        return result


# --- helpers ------------------------------------------------------------------------------


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = getattr(fs, "protocol", ())
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _bind(fn: Callable[..., T], *args: Any) -> Callable[[], T]:
    return lambda: fn(*args)


@contextlib.contextmanager
def _removed_on_error(staging: Path) -> Iterator[None]:
    """Create ``staging``; delete it again if the block fails, whatever the failure."""
    staging.mkdir()
    try:
        yield
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse_record(
    raw: bytes, step: int | None, *, final: bool
) -> tuple[CommitRecord | None, list[str]]:
    """Parse a remote record and check it names ``step`` (or reason final); list problems."""
    try:
        record = CommitRecord.model_validate_json(raw)
    except (ValueError, ValidationError) as exc:
        return None, [f"{COMMIT_RECORD} unreadable ({exc.__class__.__name__})"]
    problems: list[str] = []
    if final and record.reason != "final":
        problems.append(f"{COMMIT_RECORD} reason is {record.reason!r}, not 'final'")
    if step is not None and record.step != step:
        problems.append(f"{COMMIT_RECORD} names step {record.step}, not {step}")
    return record, problems


def _read_local_record(local_dir: Path, step: int | None) -> tuple[bytes, CommitRecord]:
    """Read the local record to upload, verbatim; LocalMismatch when it cannot be used."""
    try:
        info = os.lstat(local_dir)
    except FileNotFoundError:
        raise LocalMismatch(f"{local_dir} does not exist (pruned or quarantined?)") from None
    if not stat.S_ISDIR(info.st_mode):
        raise LocalMismatch(f"{local_dir} is not a real directory (symlinks are never followed)")
    try:
        raw = (local_dir / COMMIT_RECORD).read_bytes()
    except FileNotFoundError:
        raise LocalMismatch(f"{local_dir} has no {COMMIT_RECORD}: only committed folders") from None
    record, problems = _parse_record(raw, step, final=step is None)
    if record is None or problems:
        raise LocalMismatch(f"{local_dir}/{COMMIT_RECORD}: {'; '.join(problems)}")
    return raw, record


def _checked_relpath(local_dir: Path, listed: str) -> str:
    relpath = safe_relpath(listed)
    if relpath is None:
        raise LocalMismatch(f"{local_dir}/{COMMIT_RECORD} lists an unsafe path {listed!r}")
    return relpath
