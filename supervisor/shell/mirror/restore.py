"""``restore``: on start, bring back from the mirror what this machine lacks.

A spot VM's disk often goes with the VM; the next machine starts with an empty
(or stale) output_dir. ``restore`` runs once at start, holding the run lock and
before the policy's first inventory, in this order:

1. ``.warden/state.json``, when missing locally: overrides in force (the OOM
   micro-batch), the restart budget and poisoned steps survive the machine. The
   pids in it are cleared: they name processes of the lost machine.
2. ``final/``, when complete remotely and not locally: a run complete remotely is
   complete everywhere, and nothing else is downloaded (the policy will see
   final/ and exit 0).
3. The newest valid remote checkpoint, when it is newer than the newest valid
   local one (the newest valid of either wins). It is downloaded through
   ``.warden/incoming/``, every hash checked, renamed into place, then judged by
   the local verifier like any checkpoint. A remote copy whose bytes disagree
   with its record is quarantined remotely and the next older one is tried.
   Steps the state calls poisoned are never chosen.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import structlog

from supervisor.core.checkpoints import is_valid, newest_valid
from supervisor.core.model import Inventory
from supervisor.shell.mirror.errors import RemoteCorrupt
from supervisor.shell.mirror.remote import RemoteInventory, RemoteStore, Transfers, clear_incoming
from supervisor.shell.mirror.worker import TransferPool
from supervisor.shell.store import CheckpointStore, RefusedError
from trainer_child.protocol import Layout, RunStateFile, fsync_dir, read_model

__all__ = ["RestoreReport", "restore"]

log = structlog.get_logger()


@dataclass(frozen=True)
class RestoreReport:
    """What ``restore`` found and did (the journal's ``mirror_restore`` entry)."""

    #: Newest valid local checkpoint before restoring.
    local_newest: int | None
    #: Newest valid remote checkpoint once corrupt ones were set aside: seeds
    #: ``MirrorWorker(newest_uploaded=...)``.
    remote_newest: int | None
    #: The step downloaded into output_dir, if any.
    downloaded: int | None = None
    #: ``(step, why)`` of remote checkpoints found corrupt and quarantined remotely.
    rejected: tuple[tuple[int, str], ...] = ()
    state_restored: bool = False
    final_restored: bool = False
    remote_final_complete: bool = False
    seconds: float = 0.0

    @property
    def resume_step(self) -> int | None:
        """The newest valid checkpoint of either side, now on the local disk."""
        steps = [step for step in (self.local_newest, self.downloaded) if step is not None]
        return max(steps, default=None)


@contextlib.contextmanager
def _pool(concurrency: int) -> Iterator[Transfers]:
    pool = TransferPool(concurrency, "mirror-restore")
    pool.start()
    try:
        yield pool
    finally:
        pool.cancel()
        pool.close(time.monotonic() + 60.0)


def restore(
    layout: Layout,
    remote: RemoteStore,
    store: CheckpointStore,
    *,
    exclude: Iterable[int] = (),
    concurrency: int = 2,
) -> RestoreReport:
    """Download what the remote has newer than output_dir (see the module docstring).

    ``store`` is the supervisor's local checkpoint store (its inventory, its
    verifier, its quarantine). ``exclude`` adds steps never to restore, on top
    of the state's poisoned ones. Corrupt remote objects are handled here;
    storage failures (unreachable, refused) raise, and the caller may carry on
    with what is local. Call only while holding the run lock, with no orphan
    child alive: it replaces folders such a child could be writing.
    """
    started = time.monotonic()
    layout.output_dir.mkdir(parents=True, exist_ok=True)
    layout.ensure()
    cleared = clear_incoming(layout)
    if cleared:
        log.info("mirror_incoming_cleared", entries=cleared)

    remote_inventory = remote.inventory()
    state_restored = False
    if not os.path.lexists(layout.state) and remote_inventory.state_present:
        state_restored = remote.download_state(layout) is not None
    state = read_model(layout.state, RunStateFile)
    excluded = frozenset(exclude) | frozenset(state.poisoned_steps if state else ())

    local = store.inventory()
    local_newest = newest_valid(local, exclude=excluded)
    with _pool(concurrency) as transfers:
        final_restored, downloaded, rejected = _download_what_is_newer(
            layout,
            remote,
            store,
            transfers,
            remote_inventory=remote_inventory,
            local=local,
            excluded=excluded,
        )

    bad = {step for step, _ in rejected}
    report = RestoreReport(
        local_newest=local_newest,
        remote_newest=max(
            (s for s in remote_inventory.valid_steps() if s not in bad), default=None
        ),
        downloaded=downloaded,
        rejected=tuple(rejected),
        state_restored=state_restored,
        final_restored=final_restored,
        remote_final_complete=remote_inventory.final_complete,
        seconds=time.monotonic() - started,
    )
    log.info("mirror_restore", url=remote.url, **_log_fields(report))
    return report


def _log_fields(report: RestoreReport) -> dict[str, object]:
    return {
        "local_newest": report.local_newest,
        "remote_newest": report.remote_newest,
        "downloaded": report.downloaded,
        "rejected": [step for step, _ in report.rejected],
        "state_restored": report.state_restored,
        "final_restored": report.final_restored,
        "seconds": round(report.seconds, 3),
    }


def _download_what_is_newer(
    layout: Layout,
    remote: RemoteStore,
    store: CheckpointStore,
    transfers: Transfers,
    *,
    remote_inventory: RemoteInventory,
    local: Inventory,
    excluded: frozenset[int],
) -> tuple[bool, int | None, list[tuple[int, str]]]:
    """Bring final/, else the newest valid remote checkpoint newer than the local one.

    Returns (final restored, step downloaded, remote steps rejected with why).
    """
    rejected: list[tuple[int, str]] = []
    final_restored = False
    if remote_inventory.final_complete and not local.final_complete:
        final_restored = _restore_final(layout, remote, transfers)
    if final_restored or local.final_complete:
        return final_restored, None, rejected
    local_newest = newest_valid(local, exclude=excluded)
    for step in reversed(remote_inventory.valid_steps(exclude=excluded)):
        if local_newest is not None and step <= local_newest:
            break
        why = _restore_checkpoint(step, layout, remote, store, transfers)
        if why is None:
            return final_restored, step, rejected
        rejected.append((step, why))
    return final_restored, None, rejected


def _restore_checkpoint(
    step: int, layout: Layout, remote: RemoteStore, store: CheckpointStore, transfers: Transfers
) -> str | None:
    """Download and judge one remote checkpoint; None once it is in place and valid, else why."""
    try:
        # An invalid local folder by that name (partial, corrupt) goes to quarantine, as
        # the policy would send it, so the verified copy can take its name.
        store.quarantine(step, "replaced by the verified remote copy")
    except RefusedError as exc:
        return f"local checkpoint-{step} cannot be replaced: {exc}"
    try:
        remote.download_checkpoint(step, layout, transfers=transfers)
    except RemoteCorrupt as exc:
        why = remote.describe(exc)
        remote.quarantine(step, why)
        return why
    entry = store.verify_for_resume(step)
    if is_valid(entry):
        return None
    why = "; ".join(entry.problems) or entry.integrity.value
    store.quarantine(step, f"downloaded copy failed verification: {why}")
    remote.quarantine(step, f"failed local verification after download: {why}")
    return why


def _restore_final(layout: Layout, remote: RemoteStore, transfers: Transfers) -> bool:
    """Replace a missing or incomplete local ``final/`` with the verified remote one."""
    final = layout.final
    if os.path.islink(final):
        log.warning("mirror_final_not_restored", reason=f"{final} is a symlink")
        return False
    if os.path.lexists(final):
        # Incomplete (the store said so): out of the way through the trash, as the
        # store deletes, so a crash never leaves a half-deleted final/.
        slot = layout.trash / f"final-{uuid.uuid4().hex[:8]}"
        os.rename(final, slot)
        fsync_dir(layout.output_dir)
        shutil.rmtree(slot, ignore_errors=True)
    try:
        remote.download_final(layout, transfers=transfers)
    except RemoteCorrupt as exc:
        log.warning("mirror_final_corrupt", url=remote.url, error=remote.describe(exc))
        return False
    return True
