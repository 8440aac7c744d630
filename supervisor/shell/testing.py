"""Fakes of every seam the supervisor loop has, in one place (like httpx's MockTransport).

Each fake satisfies the protocol beside its real implementation
(``supervisor/shell/<seam>.py``) and records what was asked of it, so a test
drives ``Supervisor`` with scripted child exits, checkpoints, disks and signals
without a process, a file or ``/proc``.
The contract tests in ``tests/shell/`` run the same assertions against the real
implementation and its fake, so a fake that drifts from the real thing fails there.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from supervisor.core.model import (
    CheckpointEntry,
    Disk,
    Evidence,
    HeartbeatView,
    Integrity,
    Inventory,
)
from supervisor.shell.journal import journal_entry
from supervisor.shell.launcher import ChildHandle, ExitCallback
from supervisor.shell.mirror.restore import RestoreReport
from supervisor.shell.mirror.worker import (
    DrainResult,
    Job,
    JobKind,
    MirrorEvent,
    MirrorLag,
    Outcome,
)
from supervisor.shell.notify import Message
from supervisor.shell.observe import RunView
from supervisor.shell.preemption_notice import PreemptionNotice
from supervisor.shell.store import CheckpointStore, RefusedError
from supervisor.shell.systemd import one_line, usec
from trainer_child.protocol import JobFile, Phase, RunStateFile, checkpoint_name

__all__ = [
    "FakeCheckpointStore",
    "FakeDisk",
    "FakeEvidence",
    "FakeHeartbeat",
    "FakeJournal",
    "FakeLauncher",
    "FakeLock",
    "FakeMirror",
    "FakeNotifier",
    "FakeObserver",
    "FakeOomWatch",
    "FakePeers",
    "FakeRunDir",
    "FakeSignals",
    "FakeSpawn",
    "FakeWatcher",
    "FakeWatchers",
]


# --- launcher --------------------------------------------------------------------------


@dataclass
class FakeSpawn:
    """One recorded ``FakeLauncher.spawn`` call."""

    pid: int
    argv: list[str]
    env: dict[str, str]
    cwd: str
    log_path: Path
    pass_fds: tuple[int, ...]
    on_exit: ExitCallback


class FakeLauncher:
    """A scripted launcher: records calls, and exits a child when the test says so."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, first_pid: int = 10_000
    ) -> None:
        self._clock = clock
        self._next_pid = first_pid
        self.spawns: list[FakeSpawn] = []
        self.signals: list[tuple[int, int]] = []
        self.stops: list[tuple[int, float]] = []
        self.log_caps: list[tuple[Path, int]] = []
        self.alive: set[int] = set()
        self.stopped: set[int] = set()
        #: Raised by the next ``spawn`` (e.g. ``FileNotFoundError``), then cleared.
        self.fail_next: OSError | None = None
        #: When True, ``stop`` makes the child exit with -SIGTERM like a polite child.
        self.exit_on_stop = True
        #: Processes of the job outside any child's group (ranks whose agent died).
        self.strays: set[int] = set()
        self.closed = False
        #: ``(start, start_note)`` of the handles it returns ("warm": as if a
        #: standby had taken the attempt, see shell/standby.py).
        self.start_as = ("cold", "")

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str | os.PathLike[str],
        log_path: Path,
        pass_fds: Sequence[int],
        on_exit: ExitCallback,
    ) -> ChildHandle:
        """Record the call and hand out the next fake pid."""
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        pid = self._next_pid
        self._next_pid += 1
        self.spawns.append(
            FakeSpawn(
                pid, list(argv), dict(env), os.fspath(cwd), log_path, tuple(pass_fds), on_exit
            )
        )
        self.alive.add(pid)
        start, note = self.start_as
        return ChildHandle(
            pid=pid, started_at=self._clock(), log_path=log_path, start=start, start_note=note
        )

    def exit(self, pid: int, returncode: int) -> None:
        """Make child ``pid`` exit now, calling its ``on_exit`` as the waiter thread would."""
        self.alive.discard(pid)
        self.stopped.discard(pid)
        for spawn in self.spawns:
            if spawn.pid == pid:
                spawn.on_exit(pid, returncode)
                return
        raise KeyError(f"no fake child with pid {pid}")

    def signal_group(self, pid: int, sig: int) -> None:
        """Record the signal; nothing else happens unless the test calls ``exit``."""
        self.signals.append((pid, int(sig)))

    def stop(self, pid: int, grace: float) -> None:
        """Record the stop and, by default, let the child die of SIGTERM."""
        self.stops.append((pid, grace))
        if self.exit_on_stop and pid in self.alive:
            self.exit(pid, -signal.SIGTERM)

    def enforce_log_cap(self, path: Path, cap_bytes: int) -> int:
        """Record the call; nothing is cut."""
        self.log_caps.append((path, cap_bytes))
        return 0

    def process_alive(self, pid: int) -> bool:
        """Answer from ``alive``."""
        return pid in self.alive

    def process_stopped(self, pid: int) -> bool:
        """Answer from ``stopped``."""
        return pid in self.stopped

    def job_processes(self, pid: int | None) -> list[int]:
        """Answer from ``alive`` (the leader) and ``strays``."""
        leader = [pid] if pid is not None and pid in self.alive else []
        return sorted({*leader, *self.strays})

    def close(self) -> None:
        """Remember that close was called."""
        self.closed = True


# --- checkpoint store ---------------------------------------------------------------------


class FakeCheckpointStore:
    """An in-memory store: scripted verdicts, recorded calls."""

    def __init__(
        self,
        entries: tuple[CheckpointEntry, ...] = (),
        *,
        final_complete: bool = False,
        trash_bytes: int = 0,
        quarantine_bytes: int = 0,
    ) -> None:
        self.entries: dict[int, CheckpointEntry] = {entry.step: entry for entry in entries}
        self.final_complete = final_complete
        self.trash_bytes = trash_bytes
        self.quarantine_bytes = quarantine_bytes
        #: What verify_for_resume answers for a step, when it should differ from the
        #: inventory (damage the cache could not see).
        self.resume_verdicts: dict[int, CheckpointEntry] = {}
        self.quarantined: list[tuple[int, str]] = []
        self.removed: list[tuple[int, str]] = []
        self.calls: list[str] = []

    def put(self, entry: CheckpointEntry) -> None:
        """Make ``entry`` appear on the fake disk (a commit, or a damage)."""
        self.entries[entry.step] = entry

    def inventory(self) -> Inventory:
        self.calls.append("inventory")
        return Inventory(
            entries=tuple(self.entries[step] for step in sorted(self.entries)),
            final_complete=self.final_complete,
            trash_bytes=self.trash_bytes,
            quarantine_bytes=self.quarantine_bytes,
        )

    def verify_for_resume(self, step: int) -> CheckpointEntry:
        self.calls.append(f"verify_for_resume {step}")
        if step in self.resume_verdicts:
            return self.resume_verdicts[step]
        return self.entries.get(
            step, CheckpointEntry(step, Integrity.INCOMPLETE, problems=("folder does not exist",))
        )

    def quarantine(self, step: int, reason: str) -> Path | None:
        self.calls.append(f"quarantine {step}")
        entry = self._take(step)
        if entry is None:
            return None
        self.quarantined.append((step, reason))
        self.quarantine_bytes += entry.size_bytes
        return Path(".warden/quarantine") / checkpoint_name(step)

    def remove(self, step: int, reason: str) -> int:
        self.calls.append(f"remove {step}")
        entry = self._take(step)
        if entry is None:
            return 0
        self.removed.append((step, reason))
        return entry.size_bytes

    def empty_trash(self) -> int:
        self.calls.append("empty_trash")
        freed, self.trash_bytes = self.trash_bytes, 0
        return freed

    def purge_quarantine(self) -> int:
        self.calls.append("purge_quarantine")
        freed, self.quarantine_bytes = self.quarantine_bytes, 0
        return freed

    def _take(self, step: int) -> CheckpointEntry | None:
        entry = self.entries.get(step)
        if entry is not None and entry.symlink:
            raise RefusedError(f"{checkpoint_name(step)} is a symlink")
        return self.entries.pop(step, None)


# --- journal -----------------------------------------------------------------------------


class FakeJournal:
    """In-memory journal; set ``full`` to make it behave like a disk with no space."""

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall = wall_clock
        self.entries: list[dict[str, object]] = []
        self.states: list[RunStateFile] = []
        self.full = False
        self.full_reports = 0
        #: What ``read_state`` answers before anything was written (an earlier run).
        self.previous: RunStateFile | None = None
        self._lines: list[dict[str, object]] = []
        self._pending_state: RunStateFile | None = None
        self._reported = False

    @property
    def backlog(self) -> int:
        """Count the entries not yet 'on disk'."""
        return len(self._lines)

    def append(self, event: str, attempt: int, **fields: object) -> bool:
        """Record one event (held back while ``full``)."""
        self._lines.append(journal_entry(self._wall(), event, attempt, fields))
        return self.flush()

    def write_state(self, state: RunStateFile) -> bool:
        """Record the state (held back while ``full``)."""
        self._pending_state = state
        return self.flush()

    def flush(self) -> bool:
        """Move pending entries to ``entries`` unless ``full``."""
        if self.full:
            if not self._reported and (self._lines or self._pending_state is not None):
                self._reported = True
                self.full_reports += 1
            return not self._lines and self._pending_state is None
        self._reported = False
        self.entries.extend(self._lines)
        self._lines.clear()
        if self._pending_state is not None:
            self.states.append(self._pending_state)
            self._pending_state = None
        return True

    def read_state(self) -> RunStateFile | None:
        """Return the newest state written, else ``previous``."""
        return self.states[-1] if self.states else self.previous

    def events(self) -> list[str]:
        """List the event names written so far."""
        return [str(entry["event"]) for entry in self.entries]


# --- disk, notifier, OOM ----------------------------------------------------------------


class FakeDisk:
    """A disk whose free space the test sets."""

    def __init__(self, free: int = 100 << 30, total: int = 200 << 30) -> None:
        self.free = free
        self.total = total
        self.samples = 0

    def usage(self) -> Disk:
        """Return the scripted numbers."""
        self.samples += 1
        return Disk(free=self.free, total=self.total)


class FakeNotifier:
    """Record every message in ``messages`` instead of sending it.

    No rate limit: a test of the main loop sees each ``watchdog()`` call.
    """

    def __init__(self, watchdog_interval: float | None = None, pid: int = 4242) -> None:
        self.messages: list[str] = []
        self._interval = watchdog_interval
        self._pid = pid

    def ready(self) -> None:
        """Record READY=1."""
        self.messages.append(f"READY=1\nMAINPID={self._pid}")

    def status(self, text: str) -> None:
        """Record STATUS=."""
        self.messages.append(f"STATUS={one_line(text)}")

    def watchdog(self) -> None:
        """Record WATCHDOG=1."""
        self.messages.append("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Return the interval given at construction."""
        return self._interval

    def stopping(self) -> None:
        """Record STOPPING=1."""
        self.messages.append("STOPPING=1")

    def extend_timeout(self, seconds: float) -> None:
        """Record EXTEND_TIMEOUT_USEC=."""
        self.messages.append(f"EXTEND_TIMEOUT_USEC={usec(seconds)}")

    @property
    def statuses(self) -> list[str]:
        """The STATUS= texts sent so far, oldest first."""
        return [m.removeprefix("STATUS=") for m in self.messages if m.startswith("STATUS=")]

    @property
    def pings(self) -> int:
        """How many WATCHDOG=1 were sent."""
        return self.messages.count("WATCHDOG=1")


class FakeOomWatch:
    """Scripted OOM evidence for one child."""

    def __init__(self, pid: int, *, cgroup_killed: bool = False, kmsg_killed: bool = False) -> None:
        self.pid = pid
        self.cgroup_killed = cgroup_killed
        self.kmsg_killed = kmsg_killed

    def oom_killed_since(self) -> bool:
        """Answer from ``cgroup_killed``."""
        return self.cgroup_killed

    def kernel_log_oom(self) -> bool:
        """Answer from ``kmsg_killed``."""
        return self.kmsg_killed


# --- evidence, heartbeat -------------------------------------------------------------------


class FakeEvidence:
    """Scripted exit evidence, per attempt; records what the loop asked."""

    def __init__(self) -> None:
        #: What ``gather`` answers for an attempt (empty Evidence when not scripted).
        self.by_attempt: dict[int, Evidence] = {}
        self.watched: list[int] = []
        self.gathered: list[tuple[int, int, int | None]] = []
        self.forgotten = 0

    def forget(self) -> None:
        """Count the call."""
        self.forgotten += 1

    def watch(self, pid: int) -> None:
        """Record the pid."""
        self.watched.append(pid)

    def gather(self, pid: int, attempt: int, signal: int | None) -> Evidence:
        """Answer from ``by_attempt``."""
        self.gathered.append((pid, attempt, signal))
        return self.by_attempt.get(attempt, Evidence())


class FakeHeartbeat:
    """A heartbeat the test sets in ``view``; until then, the real monitor's ``load`` view.

    Like ``HeartbeatMonitor``: nothing before the first ``reset``, and after it,
    until the child "writes" one, phase ``load`` at step 0, aged from the
    child's start on ``clock``.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.view: HeartbeatView | None = None
        self.resets: list[tuple[int, int]] = []

    def reset(self, attempt: int, pid: int) -> None:
        """Record the new child; forget the old view."""
        self.resets.append((attempt, pid))
        self.view = None

    def poll(self, child_started_at: float) -> HeartbeatView | None:
        """Return ``view``, or the ``load`` view of a child that has not written one yet."""
        if not self.resets:
            return None
        if self.view is not None:
            return self.view
        age = max(0.0, self._clock() - child_started_at)
        return HeartbeatView(step=0, max_steps=None, phase=Phase.LOAD, age=age)


# --- watcher ------------------------------------------------------------------------------


class FakeWatcher:
    """A watcher the test fires by hand with ``trigger()``."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        self.running = False
        self.starts = 0

    def start(self) -> None:
        """Mark the watcher running."""
        self.running = True
        self.starts += 1

    def stop(self) -> None:
        """Mark the watcher stopped."""
        self.running = False

    def trigger(self) -> None:
        """Deliver one change notification, as the real watcher would after a burst."""
        if self.running:
            self._on_change()


class FakeWatchers:
    """A ``WatcherFactory`` that hands out FakeWatchers and keeps them for the test."""

    def __init__(self) -> None:
        self.made: list[tuple[Path, FakeWatcher]] = []

    def __call__(self, output_dir: Path, on_change: Callable[[], None]) -> FakeWatcher:
        watcher = FakeWatcher(on_change)
        self.made.append((output_dir, watcher))
        return watcher


# --- lock, peers, run dir, signals -----------------------------------------------------------


class FakeLock:
    """A run lock that is free unless ``holder`` says another process has it."""

    def __init__(self, fd: int = 99) -> None:
        #: Another process holds the lock (an orphaned child, a peer supervisor).
        self.holder: int | None = None
        self._fd = fd
        self._held = False
        self.acquires = 0
        self.releases = 0

    @property
    def held(self) -> bool:
        """Say whether we hold it."""
        return self._held

    @property
    def fd(self) -> int:
        """Return the fake descriptor (never opened)."""
        if not self._held:
            raise RuntimeError("the fake lock is not held")
        return self._fd

    def acquire(self) -> bool:
        """Take it unless ``holder`` is set."""
        self.acquires += 1
        if self.holder is None:
            self._held = True
        return self._held

    def release(self) -> None:
        """Let go."""
        self.releases += 1
        self._held = False


class FakePeers:
    """Scripted answers about other processes on the output_dir."""

    def __init__(self) -> None:
        self.supervisor: bool = False
        self.orphan: int | None = None
        self.create_times: dict[int, float] = {}

    def supervisor_alive(self, state: RunStateFile | None) -> bool:
        """Answer from ``supervisor``."""
        return self.supervisor

    def find_orphan(self, state: RunStateFile | None) -> int | None:
        """Answer from ``orphan``."""
        return self.orphan

    def create_time(self, pid: int) -> float | None:
        """Answer from ``create_times``."""
        return self.create_times.get(pid)


class FakeRunDir:
    """Records the job files and log notes the loop would write."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.prepared = 0
        self.jobs: list[JobFile] = []
        self.notes: list[tuple[int, str]] = []

    def prepare(self) -> None:
        """Count the call."""
        self.prepared += 1

    def write_job(self, job: JobFile) -> Path:
        """Keep the job; return where the real one would be."""
        self.jobs.append(job)
        return self.output_dir / ".warden" / "job.json"

    def note(self, attempt: int, text: str) -> None:
        """Keep the note."""
        self.notes.append((attempt, text))


class FakeSignals:
    """A signal installer (``signals.install``'s shape) the test delivers signals through."""

    def __init__(self) -> None:
        self._put: Callable[[object], None] | None = None
        self._make: Callable[[str], object] | None = None
        self.installed = 0
        self.restored = 0

    def __call__(
        self, queue_put: Callable[[object], None], make_event: Callable[[str], object]
    ) -> Callable[[], None]:
        self._put, self._make = queue_put, make_event
        self.installed += 1
        return self._restore

    def _restore(self) -> None:
        self.restored += 1
        self._put = self._make = None

    def deliver(self, name: str) -> None:
        """Enqueue the event a handler for signal ``name`` (e.g. ``"SIGINT"``) would."""
        if self._put is None or self._make is None:
            raise RuntimeError("no signal handler is installed")
        self._put(self._make(name))


class FakeSender:
    """A notification ``Sender``: collects messages; can be told to fail or raise."""

    def __init__(self, result: bool | Exception = True) -> None:
        self.messages: list[Message] = []
        self.result = result
        self.lock = threading.Lock()

    def send(self, message: Message) -> bool:
        with self.lock:
            self.messages.append(message)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


class FakeNotices:
    """A preemption-notice starter (``Shell.notices``) the test delivers the notice through."""

    def __init__(self) -> None:
        self._notify: Callable[[PreemptionNotice], None] | None = None
        self.started = 0
        self.closed = 0

    def __call__(self, notify: Callable[[PreemptionNotice], None]) -> FakeNotices:
        self._notify = notify
        self.started += 1
        return self

    def close(self, timeout: float = 5.0) -> bool:
        """Stop watching (the real poller joins its thread)."""
        self.closed += 1
        self._notify = None
        return True

    def deliver(self, notice: PreemptionNotice) -> None:
        """Report ``notice`` as the poller's thread would."""
        if self._notify is None:
            raise RuntimeError("nobody watches for the notice")
        self._notify(notice)


# --- mirror -------------------------------------------------------------------------------


class FakeMirror:
    """A remote mirror whose uploads land when the test says (``land``), or fail while down.

    Like ``RemoteMirror``: submits never block and coalesce while pending; each
    outcome reaches the loop through the ``notify`` given to ``start``; the lag
    counts submitted checkpoints newer than the newest uploaded one; ``drain``
    lands what it can (everything, unless ``reachable`` is False).
    """

    def __init__(self, url: str = "s3://bucket/run") -> None:
        self.url = url
        #: Raised by ``probe`` (e.g. ``ProbeFailed``), when set.
        self.probe_error: Exception | None = None
        #: What ``restore`` answers, and what it "downloads" into a FakeCheckpointStore.
        self.restore_report = RestoreReport(local_newest=None, remote_newest=None)
        self.restore_entries: tuple[CheckpointEntry, ...] = ()
        self.restore_final = False
        self.restore_error: Exception | None = None
        #: False: every try fails (RETRYING), as with storage down.
        self.reachable = True
        #: True: every submit is tried at once, as an idle worker would.
        self.auto_land = False
        self.newest_uploaded: int | None = None
        self.in_flight: int | None = None
        self.probes = 0
        self.restores = 0
        self.submitted: list[Job] = []
        self.landed: list[Job] = []
        self.drains: list[float] = []
        self.closed = False
        self._notify: Callable[[MirrorEvent], None] | None = None
        self._pending: list[Job] = []
        self._submitted_steps: set[int] = set()
        self._last_error: str | None = None

    def probe(self) -> None:
        """Count the call; raise ``probe_error`` when set."""
        self.probes += 1
        if self.probe_error is not None:
            raise self.probe_error

    def restore(self, store: CheckpointStore) -> RestoreReport:
        """Put ``restore_entries`` (and final/) into a fake store; answer ``restore_report``."""
        self.restores += 1
        if self.restore_error is not None:
            raise self.restore_error
        if isinstance(store, FakeCheckpointStore):
            for entry in self.restore_entries:
                store.put(entry)
            store.final_complete = store.final_complete or self.restore_final
        self.newest_uploaded = self.restore_report.remote_newest
        return self.restore_report

    def start(self, notify: Callable[[MirrorEvent], None]) -> None:
        """Keep ``notify`` for the outcomes ``land`` reports."""
        self._notify = notify

    def _submit(self, job: Job) -> None:
        self.submitted.append(job)
        if job not in self._pending:
            self._pending.append(job)
        if self.auto_land:
            self.land()

    def submit_checkpoint(self, step: int) -> None:
        """Queue it."""
        self._submitted_steps.add(step)
        self._submit(Job(JobKind.CHECKPOINT, step))

    def submit_state(self) -> None:
        """Queue it (coalesced)."""
        self._submit(Job(JobKind.STATE))

    def submit_final(self) -> None:
        """Queue it."""
        self._submit(Job(JobKind.FINAL))

    def submit_prune(self) -> None:
        """Queue it."""
        self._submit(Job(JobKind.PRUNE))

    def land(self) -> list[MirrorEvent]:
        """Try every pending job once, most urgent first, reporting each through ``notify``."""
        order = list(JobKind)
        jobs = sorted(self._pending, key=lambda j: (order.index(j.kind), -(j.step or 0)))
        events = [self._try(job) for job in jobs]
        for event in events:
            if self._notify is not None:
                self._notify(event)
        return events

    def _try(self, job: Job) -> MirrorEvent:
        if not self.reachable:
            self._last_error = "EndpointConnectionError: Could not connect"
            return MirrorEvent(job, Outcome.RETRYING, error=self._last_error, retry_in=8.0)
        self._pending.remove(job)
        self.landed.append(job)
        self._last_error = None
        if job.kind is JobKind.CHECKPOINT and job.step is not None:
            self.newest_uploaded = max(job.step, self.newest_uploaded or job.step)
        return MirrorEvent(job, Outcome.DONE, seconds=0.5, latency=1.0, bytes=1000)

    def lag(self) -> MirrorLag:
        """Computed as the real worker computes it."""
        newest = self.newest_uploaded
        return MirrorLag(
            newest_submitted=max(self._submitted_steps, default=None),
            newest_uploaded=newest,
            behind=sum(1 for s in self._submitted_steps if newest is None or s > newest),
            pending=len(self._pending),
            last_error=self._last_error,
            retry_in=8.0 if self._last_error else None,
        )

    def uploading(self) -> frozenset[int]:
        """Answer from ``in_flight``."""
        return frozenset() if self.in_flight is None else frozenset({self.in_flight})

    def drain(self, deadline: float) -> DrainResult:
        """Record the deadline; land everything if reachable."""
        self.drains.append(deadline)
        self.land()
        return DrainResult(not self._pending, 0.0, self.newest_uploaded, tuple(self._pending))

    def close(self, timeout: float) -> bool:
        """Remember that close was called."""
        self.closed = True
        return True


# --- observer ---------------------------------------------------------------------------


class FakeObserver:
    """An observer that remembers what it was told (``observe.Observer``)."""

    def __init__(self, run_id: str = "0123456789abcdef") -> None:
        self._run_id = run_id
        self.started: RunStateFile | None = None
        self.records: list[tuple[str, int, dict[str, object]]] = []
        self.views: list[RunView] = []
        self.closed = False

    @property
    def tracking_run_id(self) -> str | None:
        return self._run_id

    def start(self, previous: RunStateFile | None) -> None:
        """Remember what the run started from."""
        self.started = previous

    def record(self, wall: float, event: str, attempt: int, fields: Mapping[str, object]) -> None:
        """Keep the record."""
        self.records.append((event, attempt, dict(fields)))

    def update(self, view: RunView) -> None:
        """Keep the view."""
        self.views.append(view)

    def child_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """Offer the tracking run id, unless the env sets it."""
        return {} if env.get("WANDB_RUN_ID") else {"WANDB_RUN_ID": self._run_id}

    def close(self) -> None:
        """Remember that close was called."""
        self.closed = True
