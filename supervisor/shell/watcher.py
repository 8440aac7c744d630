"""Notice checkpoint folders appearing, committing, moving and disappearing.

One recursive inotify watch (watchdog) on output_dir, asking the kernel only for
create/delete/move events: file *modifications* are left out of the inotify mask,
so a multi-GB save or a chatty attempt log costs no events at all. Events are
filtered to what changes the inventory (``checkpoint-N/`` itself, its
``warden.json`` and ``trainer_state.json``, ``final/``), and bursts are
coalesced: a save creates dozens of files, the loop needs one rescan.

The watcher is a hint, not the truth: the loop still rescans periodically, which
also covers inotify queue overflow and filesystems without inotify (NFS).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from trainer_child.protocol import COMMIT_RECORD, TRAINER_STATE, checkpoint_step

__all__ = ["CheckpointWatcher", "Coalescer", "Watcher", "WatcherFactory", "is_relevant", "observe"]

log = structlog.get_logger()

#: Events within this many seconds of the first one are folded into one call.
DEFAULT_COALESCE = 0.1
_FINAL = "final"
_MARKERS = frozenset({COMMIT_RECORD, TRAINER_STATE})
_EVENT_FILTER: list[type[FileSystemEvent]] = [
    DirCreatedEvent,
    FileCreatedEvent,
    DirDeletedEvent,
    FileDeletedEvent,
    DirMovedEvent,
    FileMovedEvent,
]


class Watcher(Protocol):
    """Calls its ``on_change`` callback (from its own thread) when checkpoints may have changed."""

    def start(self) -> None:
        """Begin watching."""
        ...

    def stop(self) -> None:
        """Stop watching and join every thread started by ``start``."""
        ...


#: How the loop makes its watcher: ``(output_dir, on_change) -> Watcher``.
WatcherFactory = Callable[[Path, Callable[[], None]], Watcher]


def _is_inventory_path(output_dir: str, path: str) -> bool:
    if not path:
        return False
    rel = os.path.relpath(path, output_dir)
    parts = rel.split(os.sep)
    if parts[0] == os.pardir or parts[0] == os.curdir:
        return False
    top = parts[0]
    if not (checkpoint_step(top) is not None or top == _FINAL):
        return False
    return len(parts) == 1 or (len(parts) == 2 and parts[1] in _MARKERS)


def is_relevant(output_dir: str, event: FileSystemEvent) -> bool:
    """Say whether ``event`` can change the checkpoint inventory under ``output_dir``.

    Moves count on either side: a checkpoint renamed into quarantine leaves, a
    ``tmp-checkpoint-N`` renamed to ``checkpoint-N`` arrives, a ``warden.json.tmp``
    renamed to ``warden.json`` commits.
    """
    src = os.fsdecode(event.src_path)
    dest = os.fsdecode(event.dest_path)
    return _is_inventory_path(output_dir, src) or _is_inventory_path(output_dir, dest)


class Coalescer:
    """Turn bursts of ``poke()`` into one callback per ``window`` seconds, trailing edge kept.

    A thread waits for a poke, lets the burst settle for ``window``, clears the
    flag and then calls back; a poke that lands during the callback starts
    another round, so the last change of a burst is never swallowed.
    """

    def __init__(self, callback: Callable[[], None], window: float) -> None:
        self._callback = callback
        self._window = window
        self._poked = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainwarden-watch-coalesce")
        self._thread.daemon = True

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        self._poked.set()

    def stop(self) -> None:
        self._stopping.set()
        self._poked.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            self._poked.wait()
            if self._stopping.wait(self._window):
                return
            self._poked.clear()
            try:
                self._callback()
            except Exception:
                log.exception("watcher_callback_failed")


class _Handler(FileSystemEventHandler):
    def __init__(self, output_dir: str, on_relevant: Callable[[FileSystemEvent], None]) -> None:
        self._output_dir = output_dir
        self._on_relevant = on_relevant

    def on_any_event(self, event: FileSystemEvent) -> None:
        if is_relevant(self._output_dir, event):
            self._on_relevant(event)


def observe(output_dir: str, on_relevant: Callable[[FileSystemEvent], None]) -> BaseObserver:
    """Start an inotify observer that calls ``on_relevant`` for each relevant event, in order.

    The kernel is asked for creations, deletions and moves only (see the module
    docstring). The callback runs on the observer's thread; stop and join the
    returned observer when done. Raises OSError if ``output_dir`` is missing.
    """
    observer = Observer()
    observer.start()
    try:
        observer.schedule(
            _Handler(output_dir, on_relevant),
            output_dir,
            recursive=True,
            event_filter=_EVENT_FILTER,
        )
    except BaseException:
        observer.stop()
        observer.join()
        raise
    return observer


class CheckpointWatcher:
    """Call ``on_change`` (coalesced, from a watcher thread) when checkpoint folders change.

    ``on_change`` must only enqueue; all work happens in the loop.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        on_change: Callable[[], None],
        *,
        coalesce: float = DEFAULT_COALESCE,
    ) -> None:
        # Absolute and resolved, so event paths (absolute) compare with it.
        self.output_dir = str(Path(output_dir).resolve())
        self._on_change = on_change
        self._coalesce = coalesce
        # Created in start(): watchdog's inotify observer starts a reader thread
        # in its constructor, which would leak if start() were never called.
        self._observer: BaseObserver | None = None
        self._coalescer: Coalescer | None = None

    def start(self) -> None:
        """Start the observer and the coalescing thread; raise OSError if output_dir is missing."""
        if self._observer is not None:
            return
        coalescer = Coalescer(self._on_change, self._coalesce)
        observer = observe(self.output_dir, lambda event: coalescer.poke())
        coalescer.start()
        self._observer, self._coalescer = observer, coalescer
        log.debug("watcher_started", output_dir=self.output_dir)

    def stop(self) -> None:
        """Stop and join the observer (with its emitter threads) and the coalescer."""
        observer, self._observer = self._observer, None
        coalescer, self._coalescer = self._coalescer, None
        if observer is not None:
            observer.stop()
            observer.join()
        if coalescer is not None:
            coalescer.stop()

    def __enter__(self) -> CheckpointWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
