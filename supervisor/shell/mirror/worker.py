"""``MirrorWorker``: uploads in the background, so training and the main loop never wait.

The supervisor loop submits jobs and reads ``lag()``; nothing it calls blocks on
storage. One dispatcher thread runs one job at a time, most urgent first::

    upload final  >  upload checkpoint (newest first)  >  upload state  >  prune

and fans each job's files out over ``concurrency`` transfer threads (default 2).
Jobs run one at a time on purpose: a prune can never race an upload, the record
of a checkpoint goes up only after its own files, and the newest checkpoint gets
all the bandwidth rather than sharing it with older ones.

Outcomes reach the loop through ``notify(MirrorEvent)``, called on the worker's
thread. It must only enqueue (``supervisor.queue.put``), like every other
handler of the supervisor: the event then carries what the journal needs.

Faults: any backend error (unreachable, refused, timed out) puts the job back
and pauses the whole worker for an exponential backoff with jitter
(``backoff_initial`` doubling up to ``backoff_max``): when storage is down every
job would fail alike, so the worker probes with one job instead of hammering
with all. ``LocalMismatch`` (the local folder was pruned or disagrees with its
record) is final: no retry can fix it. Checkpoints queued while storage was down
are uploaded newest first, and a pending checkpoint with ``keep_last`` newer
ones pending is dropped: remote retention would delete it right after upload
(unless ``keep_every`` keeps it; ``keep_best`` is not known before upload).

Lifecycle: ``start()``; ``submit_*`` from the loop; on SIGTERM
``drain(deadline)`` (prunes are dropped, backoff is cut short, and an older
checkpoint in flight is set aside after its current files, so the emergency
checkpoint gets every chance within the grace); ``close(timeout)`` always, which
joins every thread (a transfer in flight finishes first; later ones never start).
"""

from __future__ import annotations

import enum
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Any, TypeVar

import structlog

from supervisor.core.backoff import backoff_delay
from supervisor.shell.mirror.errors import LocalMismatch
from supervisor.shell.mirror.remote import PruneResult, RemoteStore, UploadResult
from trainer_child.protocol import Layout

__all__ = [
    "DrainResult",
    "Job",
    "JobKind",
    "MirrorEvent",
    "MirrorLag",
    "MirrorWorker",
    "Outcome",
    "TransferPool",
]

log = structlog.get_logger()

T = TypeVar("T")

#: While draining for a preemption, a failed try is retried after at most this long.
DRAIN_RETRY_SECONDS = 0.5
#: How much of an error a status line shows.
STATUS_ERROR_CHARS = 60


class JobKind(enum.Enum):
    """What a job does. Declaration order is priority order (see the module docstring)."""

    FINAL = "upload final"
    CHECKPOINT = "upload checkpoint"
    STATE = "upload state"
    PRUNE = "prune"


_PRIORITY = {kind: rank for rank, kind in enumerate(JobKind)}


@dataclass(frozen=True)
class Job:
    """One unit of work; equal jobs pending at once are one job (submits coalesce)."""

    kind: JobKind
    step: int | None = None

    def __str__(self) -> str:
        return f"{self.kind.value} {self.step}" if self.step is not None else self.kind.value


class Outcome(enum.Enum):
    """How one try of a job ended, as ``notify`` hears it.

    DONE: finished (the checkpoint is remote-valid). RETRYING: storage failed; the
    job is queued again and runs after ``retry_in`` seconds. FAILED: cannot succeed
    (the local folder vanished or disagrees with its record); not retried.
    DROPPED: never ran: superseded by ``keep_last`` newer checkpoints, or a prune
    skipped by ``drain``.
    """

    DONE = "done"
    RETRYING = "retrying"
    FAILED = "failed"
    DROPPED = "dropped"


@dataclass(frozen=True)
class MirrorEvent:
    """What the worker tells the loop about one try of one job."""

    job: Job
    outcome: Outcome
    #: Seconds this try took.
    seconds: float = 0.0
    #: Seconds from the first submit to DONE: commit -> remote-valid for a checkpoint.
    latency: float | None = None
    bytes: int = 0
    #: The failure, secret-free (RETRYING, FAILED) or why it was dropped.
    error: str | None = None
    retry_in: float | None = None
    #: Tries so far, this one included.
    attempt: int = 1
    #: DONE without moving a byte: an identical valid copy was already remote.
    already_remote: bool = False
    pruned: PruneResult | None = None


@dataclass(frozen=True)
class MirrorLag:
    """How far the remote copy trails the local one, for status lines and ``status``."""

    #: Newest checkpoint step handed to the worker.
    newest_submitted: int | None
    #: Newest checkpoint step known remote-valid (uploaded, or found at start).
    newest_uploaded: int | None
    #: Submitted checkpoints newer than ``newest_uploaded``.
    behind: int
    #: Jobs queued or in flight.
    pending: int
    last_error: str | None = None
    #: Seconds until the next try while backing off; None when not backing off.
    retry_in: float | None = None

    def status_line(self) -> str:
        """E.g. ``remote: checkpoint-400, 2 behind`` (the systemd STATUS= fragment)."""
        where = (
            f"checkpoint-{self.newest_uploaded}"
            if self.newest_uploaded is not None
            else "no checkpoint yet"
        )
        lag = f"{self.behind} behind" if self.behind else "up to date"
        line = f"remote: {where}, {lag}"
        if self.retry_in is not None and self.last_error:
            error = self.last_error
            if len(error) > STATUS_ERROR_CHARS:
                error = error[: STATUS_ERROR_CHARS - 3] + "..."
            line += f", retrying in {self.retry_in:.0f}s ({error})"
        return line


@dataclass(frozen=True)
class DrainResult:
    """What ``drain`` achieved before its deadline (the journal's preemption entry)."""

    complete: bool
    seconds: float
    newest_uploaded: int | None
    #: Jobs still queued or in flight at the deadline.
    left: tuple[Job, ...] = ()


@dataclass
class _Pending:
    submitted_at: float
    attempts: int = 0


class _Closed(Exception):
    """The worker is closing: transfers not yet started are not started."""


class _Abandoned(Exception):
    """The job was set aside for a more urgent one: its remaining transfers are skipped."""


class _Batch:
    """The transfers of one ``TransferPool.run`` call, abandoned together."""

    def __init__(self) -> None:
        self.abandoned = False


class TransferPool:
    """``size`` threads running the file transfers of the job in progress."""

    def __init__(self, size: int, name: str) -> None:
        self._tasks: SimpleQueue[tuple[Callable[[], Any], Future[Any], _Batch] | None] = (
            SimpleQueue()
        )
        self._closing = threading.Event()
        self._batch = _Batch()
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}-{index}", daemon=True)
            for index in range(size)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def run(self, tasks: Sequence[Callable[[], T]]) -> list[T]:
        """Run every task on the pool, wait for all, then re-raise the first failure.

        Waiting for all even after one failed keeps a straggler from writing
        after the caller moved on (and maybe retried the same job).
        """
        batch = self._batch = _Batch()
        futures: list[Future[T]] = []
        for task in tasks:
            future: Future[T] = Future()
            self._tasks.put((task, future, batch))
            futures.append(future)
        results: list[T] = []
        failure: BaseException | None = None
        for future in futures:
            try:
                results.append(future.result())
            except BaseException as exc:  # re-raised below, after every task ended
                failure = failure or exc
        if failure is not None:
            raise failure
        return results

    def _serve(self) -> None:
        while (item := self._tasks.get()) is not None:
            task, future, batch = item
            if self._closing.is_set():
                future.set_exception(_Closed())
                continue
            if batch.abandoned:
                future.set_exception(_Abandoned())
                continue
            try:
                future.set_result(task())
            except BaseException as exc:  # handed to the waiting job
                future.set_exception(exc)

    def abandon(self) -> None:
        """Skip the current batch's transfers not yet started; those running finish."""
        self._batch.abandoned = True

    def cancel(self) -> None:
        """Fail every transfer not yet started with ``_Closed``; those running finish."""
        self._closing.set()

    def close(self, deadline: float) -> bool:
        """End the threads once nothing submits any more; return whether all ended in time."""
        self._closing.set()
        for _ in self._threads:
            self._tasks.put(None)
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)


class MirrorWorker:
    """Upload checkpoints, final/ and state.json in the background; prune the remote.

    ``notify`` runs on the worker's thread and must only enqueue. ``keep_last``
    (None: keep every remote checkpoint) drives remote retention: a prune is
    queued after each new checkpoint upload. ``newest_uploaded`` seeds the lag
    with what the remote already held at start (``RestoreReport.remote_newest``).
    ``clock`` is monotonic seconds (injected, as everywhere in the supervisor).
    """

    def __init__(
        self,
        remote: RemoteStore,
        layout: Layout,
        notify: Callable[[MirrorEvent], None],
        *,
        concurrency: int = 2,
        keep_last: int | None = None,
        keep_best: bool = True,
        keep_every: int | None = None,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        newest_uploaded: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.remote = remote
        self.layout = layout
        self._notify = notify
        self._keep_last = keep_last
        self._keep_best = keep_best
        self._keep_every = keep_every
        self._backoff_initial = backoff_initial
        self._backoff_max = max(backoff_max, backoff_initial)
        self._clock = clock
        self._rand = rand
        self._cond = threading.Condition()
        self._pending: dict[Job, _Pending] = {}
        self._in_flight: Job | None = None
        self._failures = 0
        self._retry_at: float | None = None
        self._last_error: str | None = None
        self._draining = False
        self._stopping = False
        self._started = False
        self._submitted_steps: set[int] = set()
        self._newest_uploaded = newest_uploaded
        self._pool = TransferPool(concurrency, "mirror-transfer")
        self._dispatcher = threading.Thread(target=self._run, name="mirror-worker", daemon=True)

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> MirrorWorker:
        with self._cond:
            if self._started:
                return self
            self._started = True
        self._pool.start()
        self._dispatcher.start()
        return self

    def __enter__(self) -> MirrorWorker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self, timeout: float = 30.0) -> bool:
        """Stop: let the transfer in flight end, start no other; join every thread.

        Jobs still queued are abandoned (a remote folder without its record is
        what they leave, and ``prune`` cleans that up). Returns whether every
        thread ended within ``timeout`` seconds (a transfer stuck in the backend
        can outlive it; the threads are daemons and die with the process).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        # The pool keeps serving (failing fast what has not started) until the
        # dispatcher is gone; only then can no task arrive after the pool's end.
        self._pool.cancel()
        if self._dispatcher.ident is not None:
            self._dispatcher.join(max(0.0, deadline - time.monotonic()))
        pool_ok = self._pool.close(deadline)
        return pool_ok and not self._dispatcher.is_alive()

    # --- what the loop calls (never blocks on storage) -----------------------------------

    def submit_checkpoint(self, step: int) -> None:
        """Queue the upload of committed ``output_dir/checkpoint-N``."""
        with self._cond:
            self._submitted_steps.add(step)
            self._add(Job(JobKind.CHECKPOINT, step))

    def submit_final(self) -> None:
        """Queue the upload of ``output_dir/final`` (after it verified complete)."""
        with self._cond:
            self._add(Job(JobKind.FINAL))

    def submit_state(self) -> None:
        """Queue the upload of ``.warden/state.json``; the newest content is read when it runs."""
        with self._cond:
            self._add(Job(JobKind.STATE))

    def submit_prune(self) -> None:
        """Queue remote retention and cleanup (also worth one at start: a killed
        predecessor may have left a partial upload)."""
        with self._cond:
            if not self._draining:
                self._add(Job(JobKind.PRUNE))

    def lag(self) -> MirrorLag:
        """Where the remote copy stands, for ``remote: checkpoint-400, 2 behind``."""
        with self._cond:
            newest = self._newest_uploaded
            behind = sum(1 for step in self._submitted_steps if newest is None or step > newest)
            retry_in = (
                max(0.0, self._retry_at - self._clock()) if self._retry_at is not None else None
            )
            return MirrorLag(
                newest_submitted=max(self._submitted_steps, default=None),
                newest_uploaded=newest,
                behind=behind,
                pending=len(self._pending) + (self._in_flight is not None),
                last_error=self._last_error,
                retry_in=retry_in,
            )

    def steps_in_transfer(self) -> frozenset[int]:
        """Checkpoint steps queued or uploading: local retention may want to spare them."""
        with self._cond:
            steps = {job.step for job in self._pending if job.kind is JobKind.CHECKPOINT}
            if self._in_flight is not None and self._in_flight.kind is JobKind.CHECKPOINT:
                steps.add(self._in_flight.step)
            return frozenset(step for step in steps if step is not None)

    def uploading(self) -> frozenset[int]:
        """The checkpoint step whose upload is in flight right now (empty or one step).

        Local retention spares it, so an upload slower than the save interval
        still finishes; checkpoints merely queued are not spared (an outage
        must not stop local pruning).
        """
        with self._cond:
            job = self._in_flight
            if job is None or job.kind is not JobKind.CHECKPOINT or job.step is None:
                return frozenset()
            return frozenset({job.step})

    def drain(self, deadline: float) -> DrainResult:
        """Wait until every upload is done or ``deadline`` (on ``clock``) passes.

        For the preemption path: queued prunes are dropped, a backoff in progress
        is cut short, and an older checkpoint being uploaded is set aside (its
        files in flight finish, the rest wait) while a newer one is queued, so
        the emergency checkpoint and the state get every chance within the
        grace. Call it after submitting the emergency checkpoint. New submits
        are still accepted.
        """
        started = self._clock()
        dropped: list[Job] = []
        with self._cond:
            self._draining = True
            for job in [job for job in self._pending if job.kind is JobKind.PRUNE]:
                del self._pending[job]
                dropped.append(job)
            if self._retry_at is not None:
                self._retry_at = min(self._retry_at, started)
            if self._older_checkpoint_in_flight():
                # The emergency checkpoint must not wait behind an older one: the
                # older one's remaining files are skipped and it is queued again.
                self._pool.abandon()
            self._cond.notify_all()
        for job in dropped:
            self._emit(MirrorEvent(job, Outcome.DROPPED, error="skipped while draining"))
        with self._cond:
            while (self._pending or self._in_flight is not None) and not self._stopping:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.25))
            left = tuple(self._pending) + ((self._in_flight,) if self._in_flight else ())
            self._draining = False
            newest = self._newest_uploaded
        return DrainResult(not left, self._clock() - started, newest, left)

    # --- the dispatcher ------------------------------------------------------------------

    def _older_checkpoint_in_flight(self) -> bool:
        """Say whether a checkpoint upload runs while a newer one waits (lock held)."""
        job = self._in_flight
        if job is None or job.kind is not JobKind.CHECKPOINT or job.step is None:
            return False
        return any(
            other.kind is JobKind.CHECKPOINT and (other.step or 0) > job.step
            for other in self._pending
        )

    def _add(self, job: Job) -> None:
        """Queue ``job`` (caller holds the lock); an equal pending job absorbs it."""
        if self._stopping:
            return
        self._pending.setdefault(job, _Pending(submitted_at=self._clock()))
        self._cond.notify_all()

    def _take(self) -> tuple[Job | None, _Pending | None, list[Job]]:
        """Pick the most urgent job (caller holds the lock); also return superseded ones."""
        dropped: list[Job] = []
        if self._keep_last is not None:
            steps = sorted(
                job.step
                for job in self._pending
                if job.kind is JobKind.CHECKPOINT and job.step is not None
            )
            for step in steps[: max(0, len(steps) - self._keep_last)]:
                if self._keep_every and step % self._keep_every == 0:
                    continue  # remote retention keeps it (keep_every): it must go up
                job = Job(JobKind.CHECKPOINT, step)
                del self._pending[job]
                dropped.append(job)
        if not self._pending:
            return None, None, dropped
        job = min(self._pending, key=lambda j: (_PRIORITY[j.kind], -(j.step or 0)))
        return job, self._pending.pop(job), dropped

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping:
                    now = self._clock()
                    waiting = self._retry_at is not None and now < self._retry_at
                    if self._pending and not waiting:
                        break
                    timeout = self._retry_at - now if self._retry_at is not None else None
                    self._cond.wait(timeout if waiting else None)
                if self._stopping:
                    return
                job, pending, dropped = self._take()
                self._in_flight = job
                self._cond.notify_all()
            for superseded in dropped:
                self._emit(
                    MirrorEvent(
                        superseded,
                        Outcome.DROPPED,
                        error=f"superseded: {self._keep_last} newer checkpoints queued",
                    )
                )
            if job is not None and pending is not None:
                self._execute(job, pending)

    def _execute(self, job: Job, pending: _Pending) -> None:
        pending.attempts += 1
        started = self._clock()
        result: UploadResult | PruneResult | None = None
        try:
            result = self._perform(job)
        except _Closed:
            self._finish(job, None)
            return
        except _Abandoned:
            # Set aside for a newer checkpoint; queued again, no failure counted.
            pending.attempts -= 1
            self._finish(job, None, requeue=pending)
            log.info("mirror_job_set_aside", job=str(job))
            return
        except LocalMismatch as exc:
            self._failed(job, pending, started, self.remote.describe(exc))
            return
        except Exception as exc:
            self._retrying(job, pending, started, self.remote.describe(exc))
            return
        now = self._clock()
        self._finish(job, None, succeeded=True)
        upload = result if isinstance(result, UploadResult) else None
        self._emit(
            MirrorEvent(
                job,
                Outcome.DONE,
                seconds=now - started,
                latency=now - pending.submitted_at,
                bytes=upload.bytes if upload else 0,
                attempt=pending.attempts,
                already_remote=upload.already_remote if upload else False,
                pruned=result if isinstance(result, PruneResult) else None,
            )
        )

    def _failed(self, job: Job, pending: _Pending, started: float, error: str) -> None:
        """The job cannot succeed (the local folder is gone or disagrees): report, never retry."""
        self._finish(job, None, error=error)
        log.warning("mirror_job_failed", job=str(job), error=error)
        self._emit(
            MirrorEvent(
                job,
                Outcome.FAILED,
                seconds=self._clock() - started,
                error=error,
                attempt=pending.attempts,
            )
        )

    def _retrying(self, job: Job, pending: _Pending, started: float, error: str) -> None:
        """Storage failed: queue the job again after the worker's backoff, and say so."""
        retry_in = self._finish(job, pending, error=error)
        log.warning(
            "mirror_job_retrying",
            job=str(job),
            error=error,
            attempt=pending.attempts,
            retry_in=round(retry_in or 0.0, 3),
        )
        self._emit(
            MirrorEvent(
                job,
                Outcome.RETRYING,
                seconds=self._clock() - started,
                error=error,
                retry_in=retry_in,
                attempt=pending.attempts,
            )
        )

    def _perform(self, job: Job) -> UploadResult | PruneResult:
        if job.kind is JobKind.CHECKPOINT and job.step is not None:
            return self.remote.upload_checkpoint(
                self.layout.checkpoint(job.step), job.step, transfers=self._pool
            )
        if job.kind is JobKind.FINAL:
            return self.remote.upload_final(self.layout.final, transfers=self._pool)
        if job.kind is JobKind.STATE:
            return self.remote.upload_state(self.layout.state)
        return self.remote.prune(
            keep_last=self._keep_last, keep_best=self._keep_best, keep_every=self._keep_every
        )

    def _finish(
        self,
        job: Job,
        retry: _Pending | None,
        *,
        error: str | None = None,
        succeeded: bool = False,
        requeue: _Pending | None = None,
    ) -> float | None:
        """Record how a try ended (takes the lock); requeue ``retry``; return its delay.

        ``requeue`` puts a job back without counting a failure (it was set aside).
        """
        with self._cond:
            self._in_flight = None
            delay: float | None = None
            if requeue is not None and not self._stopping:
                self._pending.setdefault(job, requeue)
            if succeeded:
                self._failures = 0
                self._retry_at = None
                self._last_error = None
                if job.kind is JobKind.CHECKPOINT and job.step is not None:
                    if self._newest_uploaded is None or job.step > self._newest_uploaded:
                        self._newest_uploaded = job.step
                    if self._keep_last is not None and not self._draining:
                        self._add(Job(JobKind.PRUNE))
            elif error is not None:
                self._last_error = error
            if retry is not None and not self._stopping:
                self._failures += 1
                delay = backoff_delay(
                    self._failures, self._backoff_initial, self._backoff_max, self._rand()
                )
                if self._draining:
                    delay = min(delay, DRAIN_RETRY_SECONDS)
                self._retry_at = self._clock() + delay
                again = self._pending.setdefault(job, retry)
                again.attempts = max(again.attempts, retry.attempts)
                again.submitted_at = min(again.submitted_at, retry.submitted_at)
            self._cond.notify_all()
            return delay

    def _emit(self, event: MirrorEvent) -> None:
        try:
            self._notify(event)
        except Exception as exc:  # a broken handler must not stop the uploads
            log.exception("mirror_notify_failed", job=str(event.job), error=repr(exc))
