"""The mirror as the supervisor loop reaches it: one narrow seam over store, worker and restore.

``Mirror`` is what the loop may ask of the remote copy; ``RemoteMirror`` is the
real one (``RemoteStore`` + ``MirrorWorker`` + ``restore``), and
``supervisor.shell.testing.FakeMirror`` the scripted one. Only ``probe``,
``restore``, ``start``, ``drain`` and ``close`` may wait on storage, and the loop
calls them only at start and on the way out; everything it calls while the
child trains returns at once (the worker's threads do the transfers).

Every message that leaves here about storage is secret-free: backend errors are
re-raised as ``MirrorError`` with the redacted description.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import structlog

from supervisor.config import MirrorConfig
from supervisor.shell.mirror.errors import MirrorError, redact_url
from supervisor.shell.mirror.remote import RemoteStore
from supervisor.shell.mirror.restore import RestoreReport, restore
from supervisor.shell.mirror.worker import DrainResult, MirrorEvent, MirrorLag, MirrorWorker
from supervisor.shell.store import CheckpointStore
from trainer_child.protocol import Layout

__all__ = ["Mirror", "RemoteMirror"]

log = structlog.get_logger()


class Mirror(Protocol):
    """The remote copy of one run, as the loop uses it (docs/mirror.md)."""

    #: The URL as it may be shown: no password, no query.
    url: str

    def probe(self) -> None:
        """Write, list, read and delete a probe object; ``ProbeFailed`` (exit 78) if not."""
        ...

    def restore(self, store: CheckpointStore) -> RestoreReport:
        """Bring back what the remote has newer than the local disk; ``MirrorError`` if unreachable.

        Only while holding the run lock with no orphan child alive.
        """
        ...

    def start(self, notify: Callable[[MirrorEvent], None]) -> None:
        """Start uploading in the background; ``notify`` (it only enqueues) hears each outcome."""
        ...

    def submit_checkpoint(self, step: int) -> None:
        """Queue the upload of committed ``checkpoint-N``."""
        ...

    def submit_state(self) -> None:
        """Queue the upload of ``.warden/state.json`` (coalesced with one already queued)."""
        ...

    def submit_final(self) -> None:
        """Queue the upload of a complete ``final/``."""
        ...

    def submit_prune(self) -> None:
        """Queue remote retention and the cleanup of uploads cut short."""
        ...

    def lag(self) -> MirrorLag:
        """How far the remote trails: ``remote: checkpoint-400, 2 behind``."""
        ...

    def uploading(self) -> frozenset[int]:
        """The checkpoint step being uploaded right now (local retention spares it)."""
        ...

    def drain(self, deadline: float) -> DrainResult:
        """Wait, until ``deadline`` (monotonic seconds) at most, for every upload to land."""
        ...

    def close(self, timeout: float) -> bool:
        """Stop the worker and join its threads; return whether they all ended in time."""
        ...


class RemoteMirror:
    """The real mirror of one output_dir under ``config.url``.

    The store is opened by ``probe`` (a backend that is missing or rejects the
    options is a ``ProbeFailed`` there too), so building this object touches
    nothing and cannot fail.
    """

    def __init__(
        self,
        config: MirrorConfig,
        layout: Layout,
        *,
        keep_last: int | None,
        keep_best: bool,
        keep_every: int | None,
    ) -> None:
        self.url = redact_url(config.url)
        self._config = config
        self._layout = layout
        self._retention = (keep_last, keep_best, keep_every)
        self._remote: RemoteStore | None = None
        self._worker: MirrorWorker | None = None
        #: Newest valid remote checkpoint restore saw (seeds the lag); None = not known.
        self._remote_newest: int | None = None
        self._restored = False

    def _store(self) -> RemoteStore:
        if self._remote is None:
            self._remote = RemoteStore(self._config.url, self._config.storage_options)
        return self._remote

    def probe(self) -> None:
        self._store().probe()

    def restore(self, store: CheckpointStore) -> RestoreReport:
        remote = self._store()
        try:
            report = restore(
                self._layout, remote, store, concurrency=self._config.upload_concurrency
            )
        except MirrorError:
            raise
        except Exception as exc:  # unreachable or refusing: said without secrets
            why = remote.describe(exc)
            raise MirrorError(f"mirror {self.url}: restore failed ({why})") from None
        self._remote_newest = report.remote_newest
        self._restored = True
        return report

    def start(self, notify: Callable[[MirrorEvent], None]) -> None:
        remote = self._store()
        keep_last, keep_best, keep_every = self._retention
        self._worker = MirrorWorker(
            remote,
            self._layout,
            notify,
            concurrency=self._config.upload_concurrency,
            keep_last=keep_last,
            keep_best=keep_best,
            keep_every=keep_every,
            newest_uploaded=self._remote_newest if self._restored else self._listed_newest(),
        ).start()

    def _listed_newest(self) -> int | None:
        """The newest valid remote checkpoint, when restore did not run (an orphan was found)."""
        remote = self._store()
        try:
            return remote.inventory().newest_valid()
        except Exception as exc:  # the lag starts unknown; uploads will retry
            log.warning("mirror_inventory_failed", url=self.url, error=remote.describe(exc))
            return None

    def _running(self) -> MirrorWorker:
        if self._worker is None:
            raise RuntimeError("the mirror worker was not started")
        return self._worker

    def submit_checkpoint(self, step: int) -> None:
        self._running().submit_checkpoint(step)

    def submit_state(self) -> None:
        self._running().submit_state()

    def submit_final(self) -> None:
        self._running().submit_final()

    def submit_prune(self) -> None:
        self._running().submit_prune()

    def lag(self) -> MirrorLag:
        if self._worker is None:
            return MirrorLag(None, self._remote_newest, 0, 0)
        return self._worker.lag()

    def uploading(self) -> frozenset[int]:
        return self._worker.uploading() if self._worker is not None else frozenset()

    def drain(self, deadline: float) -> DrainResult:
        if self._worker is None:
            return DrainResult(True, 0.0, self._remote_newest)
        return self._worker.drain(deadline)

    def close(self, timeout: float) -> bool:
        # The worker stays referenced: its lag is still read after it stopped.
        if self._worker is None:
            return True
        started = time.monotonic()
        done = self._worker.close(timeout)
        if not done:
            log.warning("mirror_close_timed_out", seconds=round(time.monotonic() - started, 3))
        return done
