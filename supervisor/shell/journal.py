"""The incident journal (``.warden/events.jsonl``) and the durable run state (``state.json``).

The journal is written exactly when things go wrong, and one of those things is
a full disk. So a write that fails with ENOSPC (or EDQUOT) never raises into the
loop: the entries wait in a bounded in-memory backlog, the condition is reported
once, and the backlog is written, in order, on the next write that succeeds.
Other OSErrors (EIO, EROFS, EACCES) still raise: they are not transient and
hiding them would hide a broken machine.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import structlog
from pydantic import ValidationError

from trainer_child.protocol import (
    JournalEntry,
    Layout,
    MetricsLine,
    RunStateFile,
    atomic_write_model,
    read_model,
)

__all__ = [
    "DEFAULT_BACKLOG",
    "DEFAULT_MAX_BYTES",
    "FileJournal",
    "Journal",
    "read_events",
    "read_loss_log",
    "read_state",
]

log = structlog.get_logger()

#: events.jsonl is rotated to events.jsonl.1 past this size; two generations kept.
DEFAULT_MAX_BYTES = 16 << 20
#: Entries held in memory while the disk is full; the oldest go first beyond it.
DEFAULT_BACKLOG = 10_000

_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class Journal(Protocol):
    """Where the loop records incidents and persists its state."""

    def append(self, event: str, attempt: int, **fields: object) -> bool:
        """Record one event; return False if it is only held in memory (disk full)."""
        ...

    def write_state(self, state: RunStateFile) -> bool:
        """Replace state.json; return False if it is only held in memory (disk full)."""
        ...

    def flush(self) -> bool:
        """Retry whatever the disk refused; return True once nothing is pending."""
        ...

    @property
    def backlog(self) -> int:
        """Count the journal lines not yet on disk."""
        ...

    def read_state(self) -> RunStateFile | None:
        """Return the state.json an earlier supervisor left (None when there is none)."""
        ...


def _is_space_error(exc: OSError) -> bool:
    return exc.errno in _SPACE_ERRNOS


def journal_entry(
    ts: float, event: str, attempt: int, fields: dict[str, object]
) -> dict[str, object]:
    return {"ts": ts, "event": event, "attempt": attempt, **fields}


class FileJournal:
    """Append-only JSON-lines journal plus atomic state.json, both surviving ENOSPC."""

    def __init__(
        self,
        layout: Layout,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backlog_limit: int = DEFAULT_BACKLOG,
        wall_clock: Callable[[], float] = time.time,
        on_full: Callable[[OSError], None] | None = None,
    ) -> None:
        """``on_full`` is called once per disk-full episode (it must only enqueue)."""
        self._layout = layout
        self._max_bytes = max_bytes
        self._wall = wall_clock
        self._on_full = on_full
        self._lines: collections.deque[bytes] = collections.deque(maxlen=backlog_limit)
        self._dropped = 0
        self._last_attempt = 0
        self._pending_state: RunStateFile | None = None
        self._full = False

    @property
    def backlog(self) -> int:
        """Count the journal lines not yet on disk."""
        return len(self._lines)

    @property
    def full(self) -> bool:
        """Say whether the last write attempt hit a full disk."""
        return self._full

    def read_state(self) -> RunStateFile | None:
        """Read state.json (see the module function ``read_state``)."""
        return read_state(self._layout)

    def append(self, event: str, attempt: int, **fields: object) -> bool:
        """Record one event with ``ts`` (wall time: it is for humans), ``event``, ``attempt``.

        Values that JSON cannot encode are written as ``str(value)`` rather than
        raising in the middle of handling a failure.
        """
        self._last_attempt = attempt
        line = json.dumps(
            journal_entry(self._wall(), event, attempt, fields), default=str, separators=(",", ":")
        )
        if len(self._lines) == self._lines.maxlen:
            self._dropped += 1  # the deque drops the oldest line
        self._lines.append(line.encode() + b"\n")
        return self.flush()

    def write_state(self, state: RunStateFile) -> bool:
        """Replace state.json atomically; under ENOSPC keep only the newest state to retry."""
        self._pending_state = state
        return self.flush()

    def flush(self) -> bool:
        """Write the backlog and any pending state; return True once nothing is pending."""
        ok = True
        try:
            if self._lines:
                self._write_lines()
        except OSError as exc:
            if not _is_space_error(exc):
                raise
            self._report_full(exc, self._layout.events)
            ok = False
        try:
            if self._pending_state is not None:
                atomic_write_model(self._layout.state, self._pending_state)
                self._pending_state = None
        except OSError as exc:
            if not _is_space_error(exc):
                raise
            self._report_full(exc, self._layout.state)
            ok = False
        if ok and self._full:
            self._full = False
            log.info("journal_recovered")
        return ok

    def _report_full(self, exc: OSError, path: Path) -> None:
        if self._full:
            return
        self._full = True
        log.warning("journal_disk_full", errno=exc.errno, backlog=len(self._lines), path=str(path))
        if self._on_full is not None:
            self._on_full(exc)

    def _write_lines(self) -> None:
        lines = list(self._lines)
        if self._dropped:
            note = journal_entry(
                self._wall(), "journal_overflow", self._last_attempt, {"dropped": self._dropped}
            )
            lines.insert(0, json.dumps(note, separators=(",", ":")).encode() + b"\n")
        data = b"".join(lines)
        path = self._layout.events
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            size = path.stat().st_size
            if size and size + len(data) > self._max_bytes:
                # A rename needs no free space, so rotation works on a full disk too.
                os.replace(path, path.with_name(path.name + ".1"))
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            before = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    # write() may stop short at the last free block, then raise on the next call.
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            except OSError:
                # Cut back the partial line so the file stays valid JSON lines and
                # the retry does not duplicate entries; truncating needs no space.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, before)
                raise
        finally:
            os.close(fd)
        self._lines.clear()
        self._dropped = 0


def read_events(layout: Layout) -> list[JournalEntry]:
    """Read the journal, oldest first (the rotated file, then the live one).

    Lines that do not parse are skipped: the last one may be torn by a crash
    of a supervisor older than the truncate-on-failure rule above.
    """
    entries: list[JournalEntry] = []
    for path in (layout.events.with_name(layout.events.name + ".1"), layout.events):
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            continue
        for line in raw.splitlines():
            if not line.strip():
                continue
            try:
                entries.append(JournalEntry.model_validate(json.loads(line)))
            except (ValueError, ValidationError):
                continue
    return entries


def read_loss_log(layout: Layout) -> list[MetricsLine]:
    """Read the child's loss log (``metrics.jsonl``); lines that do not parse are skipped."""
    try:
        raw = layout.metrics.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return []
    lines: list[MetricsLine] = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            lines.append(MetricsLine.model_validate(json.loads(line)))
        except (ValueError, ValidationError):
            continue
    return lines


def read_state(layout: Layout) -> RunStateFile | None:
    """Read state.json; None when it is missing or unreadable."""
    return read_model(layout.state, RunStateFile)
