"""The contract between the supervisor and the training child.

This is the one module both processes import. It holds the environment variable
names, the exit codes, the file layout under ``output_dir`` (and the one rule for
a checkpoint's name), the words that mark an OOM or a full disk in a message or a
log, and a pydantic model for every file either side writes there
(docs/architecture.md, "The output-dir contract").

It must stay light: the supervisor imports it and never imports torch,
transformers, trl, peft or datasets, so only the standard library, pydantic and
xxhash may be imported here.
"""

from __future__ import annotations

import contextlib
import enum
import errno as errno_mod
import hashlib
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, Literal, TypeVar

import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationError

M = TypeVar("M", bound=BaseModel)

__all__ = [
    "CHECKPOINT_RE",
    "COMMIT_RECORD",
    "CUDA_OOM_MARKERS",
    "DISK_FULL_MARKERS",
    "ENV_ATTEMPT",
    "ENV_FAILPOINTS",
    "ENV_GRAD_ACCUM",
    "ENV_INJECT",
    "ENV_MICRO_BATCH",
    "ENV_OUTPUT_DIR",
    "ENV_RESUME_FROM",
    "ENV_TRACKING_RUN_ID",
    "EXIT_CONFIG",
    "EXIT_GAVE_UP",
    "EXIT_OK",
    "EXIT_PREEMPTED",
    "HOST_OOM_MARKERS",
    "SITE_DIR",
    "STANDBY_MODULE",
    "TRAINER_STATE",
    "CommitRecord",
    "EntryKind",
    "ErrorKind",
    "ErrorReport",
    "FailureRecord",
    "FileEntry",
    "Heartbeat",
    "JobFile",
    "JournalEntry",
    "Layout",
    "LoraSpec",
    "MetricsLine",
    "Overrides",
    "Phase",
    "RunStateFile",
    "StandbyFile",
    "StandbyGo",
    "StandbyRecipe",
    "TrackingFile",
    "TrainSpec",
    "atomic_write_bytes",
    "atomic_write_model",
    "checkpoint_name",
    "checkpoint_step",
    "entry_kind",
    "file_digest",
    "fsync_dir",
    "is_real_dir",
    "mentions",
    "read_model",
]

# --- environment -----------------------------------------------------------------

#: Checkpoint folder the child must resume from; unset or empty for a fresh start.
ENV_RESUME_FROM = "TRAINWARDEN_RESUME_FROM"
#: The output_dir the supervisor watches (lets a bring-your-own script find `.warden/`).
ENV_OUTPUT_DIR = "TRAINWARDEN_OUTPUT_DIR"
#: 1-based attempt number, so logs and failpoints can tell attempts apart.
ENV_ATTEMPT = "TRAINWARDEN_ATTEMPT"
#: Test facility only: faults that cannot be produced for real (see failpoints.py).
ENV_FAILPOINTS = "TRAINWARDEN_FAILPOINTS"
#: "1" makes ``trainer_child/_site/sitecustomize.py`` add WardenCallback to every
#: transformers Trainer of a ``command:`` job (config ``inject_callback``).
ENV_INJECT = "TRAINWARDEN_INJECT"
#: The folder the supervisor puts first on a ``command:`` child's PYTHONPATH.
SITE_DIR = Path(__file__).resolve().parent / "_site"
#: Micro-batch and accumulation in force after an OOM remediation. The built-in job
#: reads them from the job file; a bring-your-own script may read these.
ENV_MICRO_BATCH = "TRAINWARDEN_PER_DEVICE_TRAIN_BATCH_SIZE"
ENV_GRAD_ACCUM = "TRAINWARDEN_GRADIENT_ACCUMULATION_STEPS"
#: The run's tracking id (state.json ``tracking_run_id``), the same in every attempt;
#: the child uses it as the default ``run_name`` so trackio resumes one run by name.
ENV_TRACKING_RUN_ID = "TRAINWARDEN_TRACKING_RUN_ID"
#: What the supervisor runs as a warm standby: ``python -m trainer_child.standby``.
STANDBY_MODULE = "trainer_child.standby"

# --- exit codes --------------------------------------------------------------------

EXIT_OK = 0
#: EX_TEMPFAIL: stopped by SIGTERM after an emergency checkpoint. Not a failure.
EXIT_PREEMPTED = 75
#: Supervisor only: gave up (restart budget spent, no progress, unretryable failure).
EXIT_GAVE_UP = 76
#: EX_CONFIG: bad configuration or data. A restart cannot fix it, so never retried.
EXIT_CONFIG = 78

# --- file layout -------------------------------------------------------------------

COMMIT_RECORD = "warden.json"
#: The one name rule: ``checkpoint-N`` with N in ASCII digits as HF writes it (no
#: leading zeros), so a name and its step map one to one: ``checkpoint-05``, or N
#: in another script's digits (which ``int()`` would accept), is not a checkpoint.
CHECKPOINT_RE = re.compile(r"^checkpoint-(0|[1-9][0-9]*)$")
#: HF Trainer writes this last; its global_step must equal the folder's N.
TRAINER_STATE = "trainer_state.json"


def checkpoint_name(step: int) -> str:
    """Return the folder name of step ``step`` (``checkpoint-N``)."""
    if step < 0:
        raise ValueError(f"a checkpoint step is >= 0, got {step}")
    return f"checkpoint-{step}"


def checkpoint_step(name: str) -> int | None:
    """Return N for a folder named exactly ``checkpoint_name(N)``, else None."""
    match = CHECKPOINT_RE.match(name)
    return int(match.group(1)) if match else None


class EntryKind(enum.Enum):
    """What a path is, as ``lstat`` sees it: a symlink is never looked through."""

    MISSING = "missing"
    SYMLINK = "symlink"
    DIRECTORY = "directory"
    FILE = "file"
    OTHER = "other"


def entry_kind(path: str | os.PathLike[str]) -> EntryKind:
    """Say what is at ``path`` without following a symlink."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return EntryKind.MISSING
    if stat.S_ISLNK(mode):
        return EntryKind.SYMLINK
    if stat.S_ISDIR(mode):
        return EntryKind.DIRECTORY
    return EntryKind.FILE if stat.S_ISREG(mode) else EntryKind.OTHER


def is_real_dir(path: str | os.PathLike[str]) -> bool:
    """Return whether ``path`` is a real directory: present, and not a symlink to one."""
    return entry_kind(path) is EntryKind.DIRECTORY


# --- words that name a failure --------------------------------------------------------
# Matched case-insensitively (``mentions``) by the child against exception messages
# (errors.py) and by the supervisor against the attempt log's tail
# (supervisor/shell/evidence.py), so both sides call the same words the same kind.

#: torch's allocator message, its exception type as a traceback prints it, and
#: cuBLAS failing to allocate its workspace (also an out-of-memory on the device).
CUDA_OOM_MARKERS = (
    "cuda out of memory",
    "cuda error: out of memory",
    "torch.outofmemoryerror",
    "cublas_status_alloc_failed",
)
#: ENOSPC in words. torch.save reports a full disk as "file write failed",
#: "unexpected pos ..." or, when only its final flush finds no room,
#: "basic_ios::clear: iostream error" (measured on a full tmpfs), all with no
#: errno; safetensors and tokenizers (Rust) keep only the io::Error text.
DISK_FULL_MARKERS = (
    "no space left on device",
    "disk quota exceeded",
    "enospc",
    "storagefull",
    "os error 28",
    "file write failed",
    "unexpected pos",
    "iostream error",
)
#: torch's CPU allocator raises RuntimeError, not MemoryError, when malloc fails.
HOST_OOM_MARKERS = ("defaultcpuallocator: can't allocate memory", "cannot allocate memory")


def mentions(text: str, markers: tuple[str, ...]) -> bool:
    """Return whether ``text`` contains any of ``markers``, ignoring case."""
    lowered = text.lower()
    return any(marker in lowered for marker in markers)


class Layout:
    """Every path trainwarden uses under one ``output_dir``.

    One object instead of string joins scattered through both processes, so the
    layout in docs/architecture.md has exactly one implementation.
    """

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.output_dir = Path(output_dir)
        self.warden = self.output_dir / ".warden"
        self.heartbeat = self.warden / "heartbeat.json"
        self.error = self.warden / "error.json"
        self.state = self.warden / "state.json"
        self.events = self.warden / "events.jsonl"
        self.logs = self.warden / "logs"
        self.quarantine = self.warden / "quarantine"
        self.trash = self.warden / "trash"
        self.lock = self.warden / "lock"
        self.failpoints = self.warden / "failpoints.json"
        self.job = self.warden / "job.json"
        self.metrics = self.warden / "metrics.jsonl"
        self.tracking = self.warden / "tracking.json"
        self.standby = self.warden / "standby.json"
        self.standby_log = self.logs / "standby.log"
        self.final = self.output_dir / "final"

    def checkpoint(self, step: int) -> Path:
        return self.output_dir / checkpoint_name(step)

    def attempt_log(self, attempt: int) -> Path:
        return self.logs / f"attempt-{attempt}.log"

    def ensure(self) -> None:
        """Create `.warden/` and its subfolders (idempotent)."""
        for path in (self.warden, self.logs, self.quarantine, self.trash):
            path.mkdir(parents=True, exist_ok=True)


# --- enums -------------------------------------------------------------------------


class Phase(str, enum.Enum):
    """What the child is doing; the supervisor allows each phase its own hang timeout.

    load -> train <-> (save | eval) -> done. ``load`` covers imports, model and
    dataset loading and reading the resume checkpoint; ``save`` covers HF's save and
    the commit record.
    """

    LOAD = "load"
    TRAIN = "train"
    SAVE = "save"
    EVAL = "eval"
    DONE = "done"


class ErrorKind(str, enum.Enum):
    """The child's hint about why it failed (error.json ``kind``).

    ``preempted`` is no failure: the child saved its emergency checkpoint after
    SIGTERM and exits 75. It is written down because a launcher between the
    supervisor and the training process (``accelerate launch``, ``torchrun``)
    does not pass exit status 75 on.
    """

    CUDA_OOM = "cuda_oom"
    HOST_OOM = "host_oom"
    DISK_FULL = "disk_full"
    CONFIG = "config"
    DATA = "data"
    RESUME = "resume"
    CRASH = "crash"
    PREEMPTED = "preempted"


# --- file models -------------------------------------------------------------------


class _Model(BaseModel):
    # Unknown keys are tolerated in files so an older supervisor can read a newer
    # child's records; strictness lives in the user-facing config instead.
    model_config = ConfigDict(extra="ignore", frozen=True)


class FileEntry(_Model):
    """One file of a checkpoint, relative to the checkpoint folder."""

    path: str
    size: int = Field(ge=0)
    hash: str


class CommitRecord(_Model):
    """``checkpoint-N/warden.json``: proof that the checkpoint is complete.

    Written last, after every file and the folder are fsynced, by tmp + fsync +
    rename, so its presence means everything it lists was durable first.
    """

    format: Literal["trainwarden.commit/1"] = "trainwarden.commit/1"
    step: int = Field(ge=0)
    max_steps: int | None = None
    reason: Literal["periodic", "emergency", "final"] = "periodic"
    hash_algorithm: Literal["xxh3_128", "blake2b"] = "xxh3_128"
    files: tuple[FileEntry, ...]
    versions: dict[str, str] = Field(default_factory=dict)
    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    attempt: int | None = None
    wall_time: float = 0.0
    save_seconds: float | None = None
    #: Ranks that wrote this checkpoint together; every one's files are listed.
    world_size: int = Field(default=1, ge=1)


class Heartbeat(_Model):
    """``.warden/heartbeat.json``: replaced atomically at most once a second."""

    step: int = 0
    max_steps: int | None = None
    phase: Phase
    pid: int
    attempt: int | None = None
    #: Wall time (time.time()) of the write; the supervisor judges staleness by
    #: its own monotonic clock from when it saw the file change, not by this.
    wall_time: float
    #: Seconds the last optimizer step took, for the adaptive hang timeout.
    last_step_seconds: float | None = None
    #: Wall times (time.time()) of this attempt's milestones, each noted once:
    #: ``started``, ``imports``, ``dataset``, ``model``, ``trainer``, ``train_begin``
    #: (resume checkpoint loaded), ``first_step``, ``train_end``. Informational
    #: (bench/ splits restart latency with them); the supervisor does not read it.
    marks: dict[str, float] = Field(default_factory=dict)


class ErrorReport(_Model):
    """``.warden/error.json``: written by the child on its way out."""

    type: str
    message: str
    errno: int | None = None
    kind: ErrorKind = ErrorKind.CRASH
    step: int | None = None
    phase: Phase | None = None
    resume_from: str | None = None
    traceback: str = ""
    pid: int | None = None
    attempt: int | None = None
    wall_time: float = 0.0


class LoraSpec(_Model):
    """The ``train.lora`` section, mapped onto ``peft.LoraConfig``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(default=8, ge=1)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | str | None = None


class TrainSpec(_Model):
    """The ``train:`` section: the built-in SFT + LoRA job.

    ``sft`` is passed to ``trl.SFTConfig`` and validated against its fields by the
    child (the supervisor must not import trl).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "builtin:tiny-gpt2"
    dataset: str = "builtin:tiny"
    dataset_split: str = "train"
    text_field: str = "text"
    lora: LoraSpec = LoraSpec()
    sft: dict[str, Any] = Field(default_factory=dict)
    #: Processes (ranks) on this machine; above 1 the job runs under torch.distributed.run.
    nproc_per_node: int = Field(default=1, ge=1)


class Overrides(_Model):
    """Settings the supervisor imposes after a failure (e.g. OOM remediation)."""

    per_device_train_batch_size: int | None = Field(default=None, ge=1)
    gradient_accumulation_steps: int | None = Field(default=None, ge=1)


class JobFile(_Model):
    """``.warden/job.json``: what ``python -m trainer_child --job FILE`` runs."""

    output_dir: str
    train: TrainSpec
    overrides: Overrides = Overrides()


class FailureRecord(_Model):
    """One failure in ``state.json``'s history."""

    attempt: int
    kind: str
    step: int | None = None
    evidence: str = ""
    wall_time: float = 0.0


class RunStateFile(_Model):
    """``.warden/state.json``: the supervisor's durable run state."""

    format: Literal["trainwarden.state/1"] = "trainwarden.state/1"
    attempts: int = 0
    restarts: int = 0
    completed: bool = False
    #: ``Config.job_digest()`` of the job that completed: a ``command:`` job is
    #: complete only for the command that exited 0.
    completed_job: str | None = None
    gave_up: str | None = None
    status: str = ""
    overrides: Overrides = Overrides()
    failures: tuple[FailureRecord, ...] = ()
    restart_wall_times: tuple[float, ...] = ()
    consecutive_failures: int = 0
    newest_valid_step: int | None = None
    poisoned_steps: tuple[int, ...] = ()
    fallback_tried_for: int | None = None
    step: int | None = None
    max_steps: int | None = None
    supervisor_pid: int | None = None
    child_pid: int | None = None
    #: psutil create_time of child_pid, so a recycled pid is never taken for our child.
    child_create_time: float | None = None
    mode: str = ""
    updated_wall_time: float = 0.0
    #: Made once for the run and kept forever: every attempt logs into the experiment
    #: tracker run of this id (``WANDB_RUN_ID``), so a restart does not split the run.
    tracking_run_id: str | None = None
    #: With a ``mirror:``: the lag line (``remote: checkpoint-400, 2 behind``), the
    #: committed checkpoints not yet remote, and the newest one that is.
    mirror_status: str | None = None
    mirror_lag: int | None = None
    mirror_newest_step: int | None = None


class MetricsLine(_Model):
    """One line of ``.warden/metrics.jsonl``: the child's loss log, for ``trainwarden report``.

    Appended by rank 0 at every Trainer ``on_log`` that carries a training loss;
    every attempt appends to the same file, so steps re-done after a failure
    appear twice, once per attempt.
    """

    step: int = Field(ge=0)
    loss: float | None = None
    learning_rate: float | None = None
    epoch: float | None = None
    attempt: int | None = None
    wall_time: float


class TrackingFile(_Model):
    """``.warden/tracking.json``: experiment-tracker runs the child found itself logging to.

    MLflow only resumes a run that exists (``MLFLOW_RUN_ID`` must name one), so the
    first attempt lets MLflow create it and records its id here; the supervisor
    hands it to every later attempt.
    """

    mlflow_run_id: str | None = None
    mlflow_experiment_id: str | None = None
    #: The MLFLOW_* variables the run was created under (tracking URI, experiment):
    #: under other ones the id would name a run MLflow cannot find, and the child
    #: would crash at start, so the supervisor then lets MLflow make a new run.
    mlflow_env: dict[str, str] = Field(default_factory=dict)
    attempt: int | None = None
    wall_time: float = 0.0


class JournalEntry(_Model):
    """One line of ``.warden/events.jsonl`` (more fields are kept as extras)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    ts: float
    event: str
    attempt: int
    kind: str | None = None


class StandbyRecipe(_Model):
    """What a warm standby prepares: the first message on its socket (``restart.standby``).

    ``builtin``: the built-in job (``job`` set); it imports and loads the base
    model, tokenizer and dataset. ``module``/``script``: a ``command:`` job's
    ``python -m target`` or ``python target``; it imports the heavy libraries.
    """

    format: Literal["trainwarden.standby/1"] = "trainwarden.standby/1"
    kind: Literal["builtin", "module", "script"]
    target: str = ""
    job: JobFile | None = None
    output_dir: str
    #: Digest of everything the preparation depended on; shown in standby.json.
    key: str
    #: For ``module``/``script``: the modules to import ahead; None = torch,
    #: transformers, peft, datasets, accelerate and trl.
    imports: tuple[str, ...] | None = None


class StandbyGo(_Model):
    """The attempt a standby becomes: the second message, sent with the log and lock fds.

    ``args`` are what follows the module or script in the command (empty for the
    built-in job, which reads ``argv`` like ``python -m trainer_child``).
    """

    argv: tuple[str, ...]
    args: tuple[str, ...] = ()
    env: dict[str, str]
    cwd: str
    attempt: int


class StandbyFile(_Model):
    """``.warden/standby.json``: the standby's own account of itself, for ``status``."""

    pid: int
    state: Literal["preparing", "ready", "failed"]
    kind: str
    target: str = ""
    key: str = ""
    #: What it holds beyond imports, e.g. "model, tokenizer, dataset".
    preloaded: str = ""
    rss_bytes: int | None = None
    prepare_seconds: float | None = None
    #: Scheduling it waits at ("nice 19", or why it could not lower its priority).
    priority: str = ""
    reason: str = ""
    wall_time: float = 0.0


# --- I/O helpers shared by both sides ------------------------------------------------


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename or create inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old or the new file, never half.

    Raises OSError (ENOSPC included) and leaves no temporary file behind.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(target.parent)


def atomic_write_model(
    path: str | os.PathLike[str], model: BaseModel, *, durable: bool = True
) -> None:
    """Write a pydantic model as JSON, atomically (see ``atomic_write_bytes``)."""
    data = model.model_dump_json(indent=1).encode() + b"\n"
    atomic_write_bytes(path, data, durable=durable)


def read_model(path: str | os.PathLike[str], model: type[M]) -> M | None:
    """Parse a JSON file into ``model``; None when missing, empty, or invalid."""
    try:
        raw = Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as exc:
        if exc.errno in (errno_mod.ENOENT, errno_mod.ENOTDIR):
            return None
        raise
    try:
        return model.model_validate(json.loads(raw))
    except (ValueError, ValidationError):
        return None


_CHUNK = 1 << 20


def file_digest(path: str | os.PathLike[str], algorithm: str = "xxh3_128") -> str:
    """Hash a file's bytes; xxh3-128 by default (see bench/ for the measurement)."""
    hasher: Any
    if algorithm == "xxh3_128":
        hasher = xxhash.xxh3_128()
    elif algorithm == "blake2b":
        hasher = hashlib.blake2b(digest_size=16)
    else:
        raise ValueError(f"unknown hash algorithm {algorithm!r}: use xxh3_128 or blake2b")
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
    return f"{algorithm}:{hasher.hexdigest()}"
