"""What the main loop does with the remote mirror: restore, upload on commit, journal, drain.

The mirror is not a decision of the pure policy: training never waits for it and
no mode depends on it, so ``core/policy.py`` knows only one fact about it (a
checkpoint being uploaded is spared by retention, ``Inventory.uploading``). The
loop calls ``MirrorSync`` at fixed points, and with no ``mirror:`` section every
call does nothing:

- start: ``probe`` before anything is created (``ProbeFailed``: exit 78), then,
  holding the lock with no orphan child, ``restore`` (journal ``mirror_restored``);
  ``start`` the worker and queue one prune (a killed predecessor's partial upload);
- every decision: ``note`` hands a newer newest-valid checkpoint to the worker;
  every ``Persist``: ``persisted`` queues state.json (coalesced);
- every ``MirrorEvent`` (the worker only enqueues it): ``on_event`` journals it
  (``mirror_uploaded``, ``mirror_retrying``, ``mirror_recovered``, ``mirror_failed``,
  ``mirror_skipped``, ``mirror_pruned``) and says whether the lag line changed;
- on the way out: ``drain`` uploads final/ when complete and waits, up to a
  deadline, for the newest checkpoint (journal ``mirror_drained``).

Every text here comes from the seam already redacted: no credential reaches the
journal, the status line or state.json.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from supervisor.core import checkpoints
from supervisor.core.model import Inventory, State
from supervisor.shell.mirror.errors import MirrorError
from supervisor.shell.mirror.restore import RestoreReport
from supervisor.shell.mirror.seam import Mirror
from supervisor.shell.mirror.worker import DrainResult, JobKind, MirrorEvent, Outcome
from supervisor.shell.store import CheckpointStore

__all__ = ["DRAIN_SLICE_SECONDS", "MIN_DRAIN_SECONDS", "MirrorSync"]

#: The drain on the way out waits in slices this long, so the watchdog is fed
#: and a second stop signal is noticed between them.
DRAIN_SLICE_SECONDS = 1.0
#: A preemption whose emergency save used the whole grace still gives its upload
#: this long (within the stop slack asked of systemd, ``policy.STOP_SLACK``).
MIN_DRAIN_SECONDS = 10.0

Recorder = Callable[[str, dict[str, object]], None]


class MirrorSync:
    """The loop's side of one mirror (or of none: then every method does nothing)."""

    def __init__(self, mirror: Mirror | None, record: Recorder) -> None:
        self.mirror = mirror
        self._record = record
        #: The newest valid step last handed to the worker.
        self._submitted: int | None = None
        #: Uploads are failing (a ``mirror_retrying`` was journaled, no success since).
        self._failing = False
        self._line: str | None = None
        #: Monotonic time of the first stop signal: the preemption grace counts from it.
        self.signalled_at: float | None = None

    @property
    def enabled(self) -> bool:
        return self.mirror is not None

    # --- start ---------------------------------------------------------------------

    def probe(self) -> None:
        """Check the storage before anything is created; ``ProbeFailed`` (exit 78) if unusable."""
        if self.mirror is not None:
            self.mirror.probe()

    def restore(self, store: CheckpointStore) -> bool:
        """Bring back what the remote has newer; return whether state.json came with it.

        Storage failing here (after a good probe) is carried past when the local
        disk has something to resume from; with nothing local it ends the start
        (exit 1, for systemd to retry): training from scratch over a remote that
        holds the run would throw the run away.
        """
        if self.mirror is None:
            return False
        try:
            report = self.mirror.restore(store)
        except MirrorError as exc:
            local = store.inventory()
            if not local.final_complete and checkpoints.newest_valid(local) is None:
                raise
            self._record("mirror_restore_failed", {"url": self.mirror.url, "error": str(exc)})
            return False
        self._record("mirror_restored", _restore_fields(self.mirror.url, report))
        return report.state_restored

    def start(self, notify: Callable[[MirrorEvent], None]) -> None:
        """Start the worker (``notify`` only enqueues) and queue one prune."""
        if self.mirror is not None:
            self.mirror.start(notify)
            self.mirror.submit_prune()

    # --- while the run goes on -------------------------------------------------------

    def note(self, state: State) -> None:
        """Queue the upload of the newest valid checkpoint when it is not the one last queued."""
        newest = state.newest_valid
        if self.mirror is None or newest is None or newest == self._submitted:
            return
        self._submitted = newest
        self.mirror.submit_checkpoint(newest)

    def persisted(self) -> None:
        """state.json was written: queue its upload (coalesced with one already queued)."""
        if self.mirror is not None:
            self.mirror.submit_state()

    def with_inventory_pins(self, inventory: Inventory) -> Inventory:
        """Mark the checkpoint being uploaded, which retention spares until it is remote."""
        if self.mirror is None:
            return inventory
        uploading = self.mirror.uploading()
        return dataclasses.replace(inventory, uploading=uploading) if uploading else inventory

    def status(self, text: str) -> str:
        """The STATUS= line: the policy's text, then the lag (``remote: checkpoint-4, 1 behind``).

        Refreshed at each status change and each upload outcome.
        """
        if self.mirror is None:
            return text
        return f"{text}; {self.mirror.lag().status_line()}"

    def state_fields(self) -> dict[str, object]:
        """What state.json carries about the mirror (``trainwarden status``, metrics)."""
        if self.mirror is None:
            return {}
        lag = self.mirror.lag()
        return {
            "mirror_status": lag.status_line(),
            "mirror_lag": lag.behind,
            "mirror_newest_step": lag.newest_uploaded,
        }

    def lag_checkpoints(self) -> int | None:
        """Committed checkpoints not yet remote (the metric); None without a mirror."""
        return self.mirror.lag().behind if self.mirror is not None else None

    def on_event(self, event: MirrorEvent) -> bool:
        """Journal what the worker reported; return whether the lag line changed."""
        if self.mirror is None:
            return False
        fields = _job_fields(event)
        if event.outcome is Outcome.DONE:
            self._done(event, fields)
        elif event.outcome is Outcome.RETRYING and not self._failing:
            # Once per outage: the status line shows every retry after it.
            self._failing = True
            retry = {"error": event.error, "retry_in": event.retry_in}
            self._record("mirror_retrying", {**fields, **retry})
        elif event.outcome is Outcome.FAILED:
            self._record("mirror_failed", {**fields, "error": event.error})
        elif event.outcome is Outcome.DROPPED and event.job.kind is JobKind.CHECKPOINT:
            self._record("mirror_skipped", {**fields, "reason": event.error})
        line = self.mirror.lag().status_line()
        changed, self._line = line != self._line, line
        return changed

    def _done(self, event: MirrorEvent, fields: dict[str, object]) -> None:
        if self._failing:
            self._failing = False
            self._record("mirror_recovered", {**fields, "tries": event.attempt})
        kind = event.job.kind
        if kind in (JobKind.CHECKPOINT, JobKind.FINAL):
            self._record(
                "mirror_uploaded",
                {
                    **fields,
                    "seconds": round(event.seconds, 3),
                    "latency": round(event.latency, 3) if event.latency is not None else None,
                    "bytes": event.bytes,
                    "already_remote": event.already_remote,
                },
            )
        elif kind is JobKind.PRUNE and event.pruned is not None:
            pruned = event.pruned
            if pruned.removed or pruned.partial_removed or pruned.quarantined:
                self._record(
                    "mirror_pruned",
                    {
                        "removed": list(pruned.removed),
                        "partial_removed": list(pruned.partial_removed),
                        "quarantined": list(pruned.quarantined),
                        "bytes": pruned.bytes_freed,
                    },
                )

    # --- on the way out ------------------------------------------------------------------

    def drain(
        self,
        state: State,
        *,
        deadline: float,
        clock: Callable[[], float],
        poll: Callable[[], bool],
    ) -> DrainResult | None:
        """Upload final/ (when complete) and wait for every upload until ``deadline``.

        ``poll`` runs between slices: it feeds the watchdog, hands queued mirror
        events to ``on_event``, and returns True when a further stop signal asks
        us to stop waiting. Journals ``mirror_drained``: whether everything made
        it, how long it took, and whether the newest local checkpoint (after a
        preemption, the emergency one) is remote.
        """
        if self.mirror is None:
            return None
        if state.inventory.final_complete:
            self.mirror.submit_final()
        started = clock()
        interrupted = False
        while True:
            result = self.mirror.drain(min(deadline, clock() + DRAIN_SLICE_SECONDS))
            interrupted = poll()
            if result.complete or interrupted or clock() >= deadline:
                break
        newest = state.newest_valid
        self._record(
            "mirror_drained",
            {
                "complete": result.complete,
                "seconds": round(clock() - started, 3),
                "step": result.newest_uploaded,
                "newest_local": newest,
                "newest_is_remote": newest is None or result.newest_uploaded == newest,
                "left": [str(job) for job in result.left],
                "interrupted": interrupted,
                "mode": state.mode.value,
            },
        )
        return result

    def close(self, timeout: float) -> None:
        """Stop the worker; a transfer still running after ``timeout`` dies with the process."""
        if self.mirror is not None:
            self.mirror.close(timeout)


def _job_fields(event: MirrorEvent) -> dict[str, object]:
    job = event.job
    if job.kind is JobKind.CHECKPOINT:
        return {"what": "checkpoint", "step": job.step}
    return {"what": job.kind.name.lower()}


def _restore_fields(url: str, report: RestoreReport) -> dict[str, object]:
    return {
        "url": url,
        "local_newest": report.local_newest,
        "remote_newest": report.remote_newest,
        "downloaded": report.downloaded,
        "rejected": [{"step": step, "why": why} for step, why in report.rejected],
        "state_restored": report.state_restored,
        "final_restored": report.final_restored,
        "remote_final_complete": report.remote_final_complete,
        "seconds": round(report.seconds, 3),
    }
