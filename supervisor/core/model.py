"""What the supervisor knows and decides, as plain immutable data.

Observations come in as *events*, decisions go out as *actions*; ``policy.decide``
maps ``(State, Event, now)`` to ``(State, [Action])``. Nothing here touches the
clock, the filesystem or a process: the shell (``supervisor/shell``) gathers the
facts into events and executes the actions, so every path through the policy can
be driven by a unit test with scripted events.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from trainer_child.protocol import Overrides, Phase

# --- enums ---------------------------------------------------------------------------


class Mode(enum.Enum):
    """Where the supervisor is in a run's lifecycle.

    STARTING -> (WAITING_ORPHAN ->) RUNNING -> STOPPING? -> BACKOFF | WAITING_DISK
    -> RUNNING ... and finally one of the terminal modes COMPLETED, GAVE_UP,
    PREEMPTED. A child is alive exactly in RUNNING and STOPPING (and, not ours, in
    WAITING_ORPHAN).
    """

    STARTING = "starting"
    WAITING_ORPHAN = "waiting_orphan"
    RUNNING = "running"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    WAITING_DISK = "waiting_disk"
    COMPLETED = "completed"
    GAVE_UP = "gave_up"
    PREEMPTED = "preempted"

    @property
    def terminal(self) -> bool:
        return self in (Mode.COMPLETED, Mode.GAVE_UP, Mode.PREEMPTED)


class FailureKind(str, enum.Enum):
    """Why an attempt ended badly: the journal's ``kind`` (docs/architecture.md)."""

    CRASH = "crash"
    CUDA_OOM = "cuda_oom"
    HOST_OOM = "host_oom"
    DISK_FULL = "disk_full"
    HANG = "hang"
    PREEMPTED = "preempted"
    CONFIG = "config"
    RESUME = "resume"
    NO_PROGRESS = "no_progress"


class Integrity(enum.Enum):
    """What the files of one ``checkpoint-N/`` prove, judged by the shell's verifier.

    COMPLETE: commit record (or, for plain HF checkpoints, structure) checks out.
    INCOMPLETE: something is missing (no record yet, no trainer_state): either
    still being written or abandoned; only the child's liveness tells which.
    CORRUPT: a record exists but the bytes disagree with it: never resumable.
    """

    COMPLETE = "complete"
    INCOMPLETE = "incomplete"
    CORRUPT = "corrupt"


class CheckpointStatus(enum.Enum):
    """The verdict on a checkpoint folder once liveness is taken into account."""

    VALID = "valid"
    IN_PROGRESS = "in_progress"
    PARTIAL = "partial"
    CORRUPT = "corrupt"
    SYMLINK = "symlink"


class Signal(enum.Enum):
    """Signals the policy may send to a child's process group."""

    TERM = "SIGTERM"
    KILL = "SIGKILL"
    USR1 = "SIGUSR1"
    CONT = "SIGCONT"


# --- observations --------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointEntry:
    """One ``checkpoint-N`` directly under output_dir, as the verifier found it."""

    step: int
    integrity: Integrity
    size_bytes: int = 0
    problems: tuple[str, ...] = ()
    symlink: bool = False
    has_record: bool = False
    #: Step of trainer_state's ``best_model_checkpoint``, when it names one.
    best_step: int | None = None
    #: The run's ``max_steps`` as the record or trainer_state.json gives it.
    max_steps: int | None = None


@dataclass(frozen=True)
class Inventory:
    """Everything on disk that retention and resume decisions depend on."""

    entries: tuple[CheckpointEntry, ...] = ()
    final_complete: bool = False
    trash_bytes: int = 0
    quarantine_bytes: int = 0
    #: Checkpoint steps the remote mirror is uploading right now: retention spares
    #: them until the upload ends, so an upload slower than the save interval
    #: still lands (disk pressure does not wait for it).
    uploading: frozenset[int] = frozenset()

    def get(self, step: int) -> CheckpointEntry | None:
        for entry in self.entries:
            if entry.step == step:
                return entry
        return None


@dataclass(frozen=True)
class Disk:
    """Free and total bytes of the filesystem holding output_dir."""

    free: int
    total: int


@dataclass(frozen=True)
class HeartbeatView:
    """The child's heartbeat, with its age measured on the supervisor's monotonic clock."""

    step: int
    max_steps: int | None
    phase: Phase
    age: float
    last_step_seconds: float | None = None


@dataclass(frozen=True)
class Evidence:
    """Facts gathered about a child's exit, for classification."""

    error_kind: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    error_errno: int | None = None
    error_step: int | None = None
    #: The error's own last line ("OSError: Repo id must be ..."), from error.json
    #: or the attempt log's last traceback; None when the child left none.
    error_line: str | None = None
    #: The log ends in argparse's "prog: error: ..." (a bad flag or value).
    log_usage_error: bool = False
    #: The signal that killed the training process behind a launcher, as the
    #: launcher reported it ("died with <Signals.SIGKILL: 9>"): the launcher
    #: itself exits 1, which says nothing.
    worker_signal: int | None = None
    #: The exit status of the first worker to fail behind a launcher, as the
    #: launcher reported it ("exitcode  : 75"): torchrun exits 1 whatever it was.
    worker_exit: int | None = None
    log_cuda_oom: bool = False
    log_enospc: bool = False
    cgroup_oom_kill: bool = False
    kernel_oom_kill: bool = False


# --- events --------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """The supervisor came up and rebuilt its view from disk."""

    inventory: Inventory
    disk: Disk
    #: Restores overrides, failure history, budget from a previous supervisor.
    previous: PreviousRun | None = None
    #: A child of an earlier supervisor still holds the lock.
    orphan_pid: int | None = None


@dataclass(frozen=True)
class PreviousRun:
    """What ``state.json`` of an earlier supervisor said, converted to this clock."""

    attempts: int
    overrides: Overrides
    failures: tuple[FailureNote, ...]
    #: How many seconds ago each counted restart happened (wall clock difference).
    restart_ages: tuple[float, ...]
    consecutive_failures: int
    poisoned_steps: tuple[int, ...]
    gave_up: str | None
    #: A ``command:`` job that exited 0 with this very command (state.json).
    completed: bool = False


@dataclass(frozen=True)
class ChildSpawned:
    attempt: int
    pid: int
    #: "cold" (a new process) or "warm" (a standby took the attempt), and why.
    start: str = "cold"
    start_note: str = ""


@dataclass(frozen=True)
class SpawnFailed:
    attempt: int
    message: str


@dataclass(frozen=True)
class ChildExited:
    """The child is gone (reaped); the shell gathered the evidence first."""

    attempt: int
    pid: int
    returncode: int | None
    signal: int | None
    evidence: Evidence
    inventory: Inventory
    disk: Disk
    #: Uniform draw in [0, 1) from the shell: jitter for backoff (decide stays pure).
    jitter: float = 0.5


@dataclass(frozen=True)
class InventoryChanged:
    """The watcher (or the periodic rescan) saw checkpoint folders change."""

    inventory: Inventory


@dataclass(frozen=True)
class Tick:
    """The timer: heartbeat, disk and (while waiting) the lock, sampled now."""

    disk: Disk
    heartbeat: HeartbeatView | None = None
    #: The child is in state T (SIGSTOP/ptrace); it will not heartbeat.
    child_stopped: bool = False
    #: While WAITING_ORPHAN: the orphan released the lock and we now hold it.
    lock_acquired: bool = False
    orphan_alive: bool = False


@dataclass(frozen=True)
class ResumeRejected:
    """Re-verifying the chosen checkpoint just before launch found it unusable."""

    attempt: int
    step: int
    problems: tuple[str, ...]


@dataclass(frozen=True)
class SignalReceived:
    """SIGTERM/SIGINT (or SIGHUP) reached the supervisor."""

    name: str


@dataclass(frozen=True)
class PreemptionNoticed:
    """The cloud said this machine is about to be taken (``preemption.notice``)."""

    provider: str
    #: AWS: terminate, stop or hibernate; GCP: preempted.
    action: str
    #: When the machine goes (wall time), if the cloud said.
    deadline_wall_time: float | None = None

    @property
    def name(self) -> str:
        """How the journal names this stop, as it names a signal: ``preemption notice (...)``."""
        return f"preemption notice ({self.provider} {self.action})"


Event = (
    Started
    | ChildSpawned
    | SpawnFailed
    | ChildExited
    | InventoryChanged
    | Tick
    | ResumeRejected
    | SignalReceived
    | PreemptionNoticed
)


# --- actions -------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """Start attempt ``attempt`` as a child, resuming from ``resume_from`` if set."""

    attempt: int
    resume_from: int | None
    overrides: Overrides


@dataclass(frozen=True)
class SendSignal:
    """Signal the child's whole process group (or a known orphan's). Dead is fine."""

    pid: int
    signal: Signal


@dataclass(frozen=True)
class Quarantine:
    """Move ``checkpoint-N`` into ``.warden/quarantine/`` as evidence."""

    step: int
    reason: str


@dataclass(frozen=True)
class Remove:
    """Delete ``checkpoint-N``: rename into trash first, then remove."""

    step: int
    reason: str


@dataclass(frozen=True)
class FreeSpace:
    """Empty the trash and drop quarantined checkpoints (first to go under pressure)."""

    reason: str


@dataclass(frozen=True)
class Record:
    """Append to events.jsonl and log it; ``fields`` must be JSON-serialisable."""

    event: str
    fields: dict[str, object] = field(default_factory=dict)
    #: The attempt it is about, when the state has moved on to the next one by
    #: the time it is executed (a failure followed at once by its restart).
    attempt: int | None = None


@dataclass(frozen=True)
class Persist:
    """Write state.json from the current state."""


@dataclass(frozen=True)
class Status:
    """A one-line human status (systemd STATUS=, state.json, `trainwarden status`)."""

    text: str


@dataclass(frozen=True)
class ExtendStop:
    """Ask the service manager for more stop time (EXTEND_TIMEOUT_USEC)."""

    seconds: float


@dataclass(frozen=True)
class Exit:
    """The supervisor is done: exit with ``code``."""

    code: int
    reason: str


Action = (
    Launch
    | SendSignal
    | Quarantine
    | Remove
    | FreeSpace
    | Record
    | Persist
    | Status
    | ExtendStop
    | Exit
)


# --- settings the policy needs ---------------------------------------------------------


@dataclass(frozen=True)
class PolicyConfig:
    """The config values the pure policy reads (seconds and bytes, already parsed).

    No defaults here: ``supervisor/config.py`` is their one home, and
    ``Config.policy()`` builds this record from a validated job file.
    """

    max_restarts: int
    window: float
    backoff_initial: float
    backoff_max: float
    #: The first failure after progress (the first of its streak) restarts at
    #: once; only repeated failures without progress back off.
    first_failure_at_once: bool
    no_progress_limit: int
    keep_last: int
    keep_best: bool
    keep_every: int | None
    #: Bytes to keep free; None = auto (2 x the largest checkpoint seen).
    disk_reserve: int | None
    #: Seconds without a heartbeat in train/eval before ``hang``; None = auto.
    hang_timeout: float | None
    startup_timeout: float
    #: Seconds a save may take before ``hang``; None = auto.
    save_timeout: float | None
    #: SIGTERM -> SIGKILL grace when killing a hung child.
    kill_grace: float
    preemption_grace: float
    #: The micro-batch/accumulation the job starts with (for OOM halving); 0 = unknown.
    micro_batch: int
    grad_accum: int
    #: True for the built-in job, whose checkpoints must carry warden.json.
    require_record: bool
    #: The built-in job is done when final/ holds a valid adapter; a ``command:``
    #: job, which knows nothing of final/, when it exits 0.
    success_needs_final: bool
    #: A resume from a checkpoint at max_steps takes no step (the built-in job, or
    #: WardenCallback injected); otherwise HF would train one step past the end.
    step_guard: bool


@dataclass(frozen=True)
class FailureNote:
    """One failure, as kept in the state and in state.json."""

    attempt: int
    kind: FailureKind
    step: int | None
    evidence: str


@dataclass(frozen=True)
class Child:
    """The running child, as the policy tracks it."""

    pid: int
    attempt: int
    resume_from: int | None
    started_at: float


@dataclass(frozen=True)
class Stopping:
    """Why we are stopping our child and when SIGTERM turns into SIGKILL; gone once it exits."""

    #: HANG (we found it stuck) or PREEMPTED (a stop signal reached us first).
    reason: FailureKind
    deadline: float
    #: SIGKILL has been sent: a further signal only repeats it.
    killed: bool = False
    #: A stop signal reached the supervisor: once the child is gone, so are we.
    requested: bool = False
    #: The stop began with the cloud's notice, whose own SIGTERM is still to come:
    #: that one signal is expected, not a second one (which would escalate).
    noticed: bool = False


@dataclass(frozen=True)
class Backoff:
    """The pause between a failure and the next attempt."""

    until: float


@dataclass(frozen=True)
class Orphan:
    """A child of an earlier supervisor that still holds the lock; asked to save and exit."""

    pid: int
    #: When our SIGTERM's grace runs out and SIGKILL follows.
    deadline: float
    killed: bool = False


@dataclass(frozen=True)
class Streak:
    """Failures in a row with no newer checkpoint; a new commit ends it as a whole."""

    failures: int = 0
    #: Newest valid step when the streak began (the progress marker).
    base: int | None = None
    #: The one fallback to an older checkpoint has been spent.
    fallback_tried: bool = False
    #: (error line, resume step) of the last failure, if it came before training
    #: began: the same one twice in a row is deterministic, not bad luck.
    startup_failure: tuple[str, int | None] | None = None


@dataclass(frozen=True)
class Pace:
    """How long steps and saves take, which the automatic hang limits scale with."""

    slowest_step: float | None = None
    slowest_save: float | None = None
    #: Monotonic time the current save began (heartbeat phase ``save``), if one runs.
    save_started: float | None = None


@dataclass(frozen=True)
class State:
    """The supervisor's whole mutable world, replaced (never mutated) by ``decide``.

    The per-mode records (``stopping``, ``backoff``, ``orphan``) exist only in
    their mode and are replaced as a whole, so nothing is left behind to reset
    by hand when a mode ends.
    """

    config: PolicyConfig
    mode: Mode = Mode.STARTING
    attempt: int = 0
    child: Child | None = None
    #: The attempt a Launch was issued for, until ChildSpawned/SpawnFailed answers.
    launching: int | None = None
    inventory: Inventory = Inventory()
    disk: Disk | None = None
    overrides: Overrides = Overrides()  # noqa: RUF009 - a frozen pydantic model is immutable
    failures: tuple[FailureNote, ...] = ()
    restart_times: tuple[float, ...] = ()
    streak: Streak = Streak()
    #: Steps that must not be resumed from again (failed to load, or superseded).
    poisoned: frozenset[int] = frozenset()
    #: Newest valid step seen so far (to notice commits).
    newest_valid: int | None = None
    stopping: Stopping | None = None
    backoff: Backoff | None = None
    orphan: Orphan | None = None
    heartbeat: HeartbeatView | None = None
    pace: Pace = Pace()
    status: str = "starting"
    exit_code: int | None = None
    gave_up: str | None = None
