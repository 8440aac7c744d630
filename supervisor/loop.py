"""The one main loop: drain the queue, ask the policy, execute its actions.

One thread owns all state. The watchdog observer, the signal handlers and the
threads that wait on children only put notices on ``self.queue``; the timer is
the queue's own ``get(timeout=...)``. Everything the policy needs to know is
gathered here into an event, and everything it decides is executed here, through
the narrow interfaces bundled in ``Shell`` (each has a fake for tests).
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import random
import re
import signal as signal_mod
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from supervisor.config import Config
from supervisor.core import policy
from supervisor.core.command import render_command
from supervisor.core.model import (
    Action,
    ChildExited,
    ChildSpawned,
    Event,
    Evidence,
    Exit,
    ExtendStop,
    FailureKind,
    FailureNote,
    FreeSpace,
    Integrity,
    InventoryChanged,
    Launch,
    Mode,
    Persist,
    PreviousRun,
    Quarantine,
    Record,
    Remove,
    ResumeRejected,
    SendSignal,
    Signal,
    SignalReceived,
    SpawnFailed,
    Started,
    State,
    Status,
    Tick,
)
from supervisor.errors import LockedError
from supervisor.shell import procs, signals
from supervisor.shell.disk import DiskProbe, StatvfsDisk
from supervisor.shell.heartbeat import HeartbeatMonitor
from supervisor.shell.journal import FileJournal, Journal, read_state
from supervisor.shell.launcher import JobMarker, Launcher, ProcessLauncher
from supervisor.shell.lock import RunLock
from supervisor.shell.oom import OomEvidence, OomWatch
from supervisor.shell.store import CheckpointStore, FileCheckpointStore
from supervisor.shell.systemd import Notifier, SystemdNotifier
from supervisor.shell.watcher import CheckpointWatcher
from trainer_child.protocol import (
    ENV_ATTEMPT,
    ENV_GRAD_ACCUM,
    ENV_INJECT,
    ENV_MICRO_BATCH,
    ENV_OUTPUT_DIR,
    ENV_RESUME_FROM,
    SITE_DIR,
    ErrorReport,
    FailureRecord,
    JobFile,
    Layout,
    Overrides,
    RunStateFile,
    atomic_write_model,
    read_model,
)

log = structlog.get_logger("trainwarden")

#: Seconds between timer ticks: bounds hang-detection lag and stop escalation lag.
TICK_SECONDS = 0.25
#: The watcher is the fast path; this periodic rescan is the safety net.
RESCAN_SECONDS = 10.0
#: Per-attempt log cap; the tail is kept.
LOG_CAP_BYTES = 64 * 1024 * 1024
#: How much of the attempt log's tail is searched for failure evidence.
LOG_EVIDENCE_BYTES = 256 * 1024
_CUDA_OOM_MARKERS = (
    b"CUDA out of memory",
    b"torch.OutOfMemoryError",
    b"CUBLAS_STATUS_ALLOC_FAILED",
)
_ENOSPC_MARKERS = (b"No space left on device", b"ENOSPC")


@dataclass(frozen=True)
class _ExitNotice:
    pid: int
    returncode: int


@dataclass(frozen=True)
class _FsNotice:
    pass


@dataclass
class Shell:
    """Every side effect the loop performs, behind narrow interfaces."""

    launcher: Launcher
    store: CheckpointStore
    journal: Journal
    disk: DiskProbe
    notifier: Notifier
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    rand: Callable[[], float] = random.random
    watch_fs: bool = True
    extra: dict[str, object] = field(default_factory=dict)


def default_shell(config: Config) -> Shell:
    """The real shell for a config: processes, files, statvfs, sd_notify."""
    layout = Layout(config.output_dir)
    return Shell(
        launcher=ProcessLauncher(
            linger=config.preemption.grace, marker=JobMarker(ENV_OUTPUT_DIR, str(config.output_dir))
        ),
        store=FileCheckpointStore(config.output_dir, require_record=config.train is not None),
        journal=FileJournal(layout),
        disk=StatvfsDisk(config.output_dir),
        notifier=SystemdNotifier(),
    )


class Supervisor:
    """Run one job to completion (or a clean stop, or a reasoned give-up)."""

    def __init__(
        self, config: Config, shell: Shell | None = None, *, config_path: Path | None = None
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.layout = Layout(config.output_dir)
        self.shell = shell or default_shell(config)
        self.queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.state = State(config=config.policy())
        self.lock = RunLock(self.layout.lock)
        self.heartbeat = HeartbeatMonitor(self.layout, clock=self.shell.clock)
        self.oom_watch: OomEvidence | None = None
        self.exit_code: int | None = None
        self._last_rescan = 0.0
        self._last_tick = 0.0
        self._child_pids: set[int] = set()
        self._orphan_gone_seen = False

    # --- lifecycle ---------------------------------------------------------------

    def run(self) -> int:
        """Supervise until the run completes, stops cleanly, or gives up; return the exit code."""
        self.config.output_dir.mkdir(parents=True, exist_ok=True)
        self.layout.ensure()
        previous = read_state(self.layout)
        orphan: int | None = None
        if not self.lock.acquire():
            if procs.supervisor_alive(previous):
                pid = previous.supervisor_pid if previous else None
                raise LockedError(
                    f"another trainwarden supervisor (pid {pid}) is running on "
                    f"{self.config.output_dir}; stop it first (two must never share an output_dir)"
                )
            orphan = procs.find_orphan(self.layout, previous)
            if orphan is None:
                raise LockedError(
                    f"{self.layout.lock} is held by an unknown process; find it with "
                    f"`fuser {self.layout.lock}` and stop it"
                )
        else:
            # Ranks whose launcher died with the last supervisor hold no lock (torchrun
            # closes inherited descriptors) and may train on: wait them out as an orphan.
            strays = self.shell.launcher.job_processes(None)
            if strays:
                orphan = strays[0]
                log.warning("stray_job_processes", pids=strays)
        restore = signals.install(self.queue.put, SignalReceived)
        watcher = (
            CheckpointWatcher(self.config.output_dir, lambda: self.queue.put(_FsNotice()))
            if self.shell.watch_fs
            else None
        )
        try:
            if watcher is not None:
                watcher.start()
            self.shell.notifier.ready()
            log.info("supervisor_started", output_dir=str(self.config.output_dir), pid=os.getpid())
            started = Started(
                inventory=self.shell.store.inventory(),
                disk=self.shell.disk.usage(),
                previous=self._previous(previous),
                orphan_pid=orphan,
            )
            self._process(started)
            while self.exit_code is None:
                self._process(self._next_event())
            return self.exit_code
        except BaseException:
            # An unexpected error in the loop must not leave a child training
            # unsupervised: ask it for an emergency checkpoint, then kill it.
            for pid in list(self._child_pids):
                self.shell.launcher.stop(pid, self.config.preemption.grace)
            raise
        finally:
            self.shell.notifier.stopping()
            if watcher is not None:
                watcher.stop()
            restore()
            self.shell.launcher.close()
            self.lock.release()

    def _previous(self, previous: RunStateFile | None) -> PreviousRun | None:
        if previous is None:
            return None
        wall = self.shell.wall()
        return PreviousRun(
            attempts=previous.attempts,
            overrides=previous.overrides,
            failures=tuple(
                FailureNote(f.attempt, _kind(f.kind), f.step, f.evidence) for f in previous.failures
            ),
            restart_ages=tuple(max(wall - t, 0.0) for t in previous.restart_wall_times),
            consecutive_failures=previous.consecutive_failures,
            poisoned_steps=previous.poisoned_steps,
            gave_up=previous.gave_up,
            # Only this very command: a changed command (more steps, another
            # dataset) is a new job to run, resuming from its checkpoints.
            completed=previous.completed and previous.completed_job == self.config.job_digest(),
        )

    # --- events ------------------------------------------------------------------

    def _next_event(self) -> Event:
        now = self.shell.clock()
        timeout = max(0.0, self._last_tick + TICK_SECONDS - now)
        try:
            notice = self.queue.get(timeout=timeout)
        except queue.Empty:
            return self._tick()
        if isinstance(notice, _ExitNotice):
            return self._child_exited(notice)
        if isinstance(notice, _FsNotice):
            self._last_rescan = self.shell.clock()
            return InventoryChanged(self.shell.store.inventory())
        if isinstance(notice, SignalReceived):
            return notice
        raise TypeError(f"unexpected notice {notice!r}")

    def _tick(self) -> Event:
        now = self.shell.clock()
        self._last_tick = now
        self.shell.notifier.watchdog()
        orphan_gone = self.state.mode is Mode.WAITING_ORPHAN and self._orphan_gone()
        orphan_just_gone = orphan_gone and not self._orphan_gone_seen
        self._orphan_gone_seen = orphan_gone
        # A gone orphan is judged by what it left (its emergency checkpoint, or
        # final/) from a fresh scan, not from a watcher notice that may still be
        # on its way; the next tick reports the lock as ours.
        if orphan_just_gone or now - self._last_rescan >= RESCAN_SECONDS:
            self._last_rescan = now
            return InventoryChanged(self.shell.store.inventory())
        child = self.state.child
        beat = None
        stopped = False
        if child is not None:
            beat = self.heartbeat.poll(child.started_at)
            stopped = self.shell.launcher.process_stopped(child.pid)
            self.shell.launcher.enforce_log_cap(
                self.layout.attempt_log(child.attempt), LOG_CAP_BYTES
            )
        lock_acquired = False
        orphan_alive = False
        if self.state.mode is Mode.WAITING_ORPHAN:
            lock_acquired = orphan_gone
            pid = self.state.orphan_pid
            # Its ranks count too; the cheap check first, /proc is scanned only after.
            launcher = self.shell.launcher
            orphan_alive = pid is not None and (
                launcher.process_alive(pid) or bool(launcher.job_processes(pid))
            )
        return Tick(
            disk=self.shell.disk.usage(),
            heartbeat=beat,
            child_stopped=stopped,
            lock_acquired=lock_acquired,
            orphan_alive=orphan_alive,
        )

    def _orphan_gone(self) -> bool:
        """Say whether the orphan's lock is ours and no process of its job is left.

        The lock alone is not enough: torchrun's ranks do not inherit it, and
        may outlive their agent.
        """
        if not self.lock.acquire():
            return False
        return not self.shell.launcher.job_processes(self.state.orphan_pid)

    def _child_exited(self, notice: _ExitNotice) -> Event:
        self._child_pids.discard(notice.pid)
        child = self.state.child
        attempt = child.attempt if child is not None else self.state.attempt
        returncode = notice.returncode if notice.returncode >= 0 else None
        sig = -notice.returncode if notice.returncode < 0 else None
        return ChildExited(
            attempt=attempt,
            pid=notice.pid,
            returncode=returncode,
            signal=sig,
            evidence=self._evidence(notice.pid, attempt, sig),
            inventory=self.shell.store.inventory(),
            disk=self.shell.disk.usage(),
            jitter=self.shell.rand(),
        )

    def _evidence(self, pid: int, attempt: int, sig: int | None) -> Evidence:
        report = read_model(self.layout.error, ErrorReport)
        if report is not None and report.pid != pid and report.attempt != attempt:
            report = None  # left by an earlier attempt
        tail = _read_tail(self.layout.attempt_log(attempt), LOG_EVIDENCE_BYTES)
        killed_by = sig if sig is not None else launcher_reported_signal(tail)
        cgroup_oom = False
        if self.oom_watch is not None and killed_by == signal_mod.SIGKILL:
            cgroup_oom = self.oom_watch.oom_killed_since()
        kernel_oom = (
            self.oom_watch is not None
            and killed_by == signal_mod.SIGKILL
            and not cgroup_oom
            and self.oom_watch.kernel_log_oom()
        )
        worker_signal = launcher_reported_signal(tail)
        worker_exit = launcher_reported_exit(tail) if worker_signal is None else None
        line = _report_line(report) if report else last_error_line(tail)
        if worker_signal is not None and report is None:
            line = None  # "died with SIGKILL" names no error, however often it recurs
        return Evidence(
            error_kind=report.kind.value if report else None,
            error_type=report.type if report else None,
            error_message=report.message[:500] if report else None,
            error_errno=report.errno if report else None,
            error_step=report.step if report else None,
            error_line=line,
            log_usage_error=bool(line and _USAGE_ERROR_RE.match(line)),
            worker_signal=worker_signal,
            worker_exit=worker_exit,
            log_cuda_oom=any(m in tail for m in _CUDA_OOM_MARKERS),
            log_enospc=any(m in tail for m in _ENOSPC_MARKERS),
            cgroup_oom_kill=cgroup_oom,
            kernel_oom_kill=kernel_oom,
        )

    def _process(self, event: Event) -> None:
        pending: list[Event] = [event]
        while pending:
            current = pending.pop(0)
            self.state, actions = policy.decide(self.state, current, self.shell.clock())
            for action in actions:
                pending.extend(self._execute(action))

    # --- actions -----------------------------------------------------------------

    def _execute(self, action: Action) -> list[Event]:
        if isinstance(action, Launch):
            return self._launch(action)
        if isinstance(action, SendSignal):
            self.shell.launcher.signal_group(action.pid, getattr(signal_mod, action.signal.value))
            log.info("signal_sent", pid=action.pid, signal=action.signal.value)
        elif isinstance(action, Quarantine):
            with _logged_failure("quarantine_failed", step=action.step):
                slot = self.shell.store.quarantine(action.step, action.reason)
                if slot is not None:
                    self._record(
                        "quarantined",
                        {"step": action.step, "reason": action.reason, "to": str(slot)},
                    )
        elif isinstance(action, Remove):
            with _logged_failure("remove_failed", step=action.step):
                freed = self.shell.store.remove(action.step, action.reason)
                self._record(
                    "pruned", {"step": action.step, "reason": action.reason, "bytes": freed}
                )
        elif isinstance(action, FreeSpace):
            with _logged_failure("free_space_failed"):
                freed = self.shell.store.empty_trash() + self.shell.store.purge_quarantine()
                self._record("space_freed", {"bytes": freed, "reason": action.reason})
        elif isinstance(action, Record):
            self._record(action.event, action.fields)
        elif isinstance(action, Persist):
            self.shell.journal.write_state(self._state_file())
        elif isinstance(action, Status):
            self.shell.notifier.status(action.text)
        elif isinstance(action, ExtendStop):
            self.shell.notifier.extend_timeout(action.seconds)
        elif isinstance(action, Exit):
            self.exit_code = action.code
            log.info("supervisor_exit", code=action.code, reason=action.reason)
        return []

    def _record(self, event: str, fields: dict[str, object]) -> None:
        self.shell.journal.append(event, self.state.attempt, **fields)
        failure = event in ("failure", "gave_up", "hang_detected")
        (log.warning if failure else log.info)(event, attempt=self.state.attempt, **fields)

    def _launch(self, action: Launch) -> list[Event]:
        if action.resume_from is not None:
            entry = self.shell.store.verify_for_resume(action.resume_from)
            if entry.integrity is not Integrity.COMPLETE or entry.symlink:
                return [
                    ResumeRejected(
                        action.attempt, action.resume_from, entry.problems or ("not complete",)
                    )
                ]
        resume_path = (
            str(self.layout.checkpoint(action.resume_from))
            if action.resume_from is not None
            else ""
        )
        with contextlib.suppress(FileNotFoundError):
            self.layout.error.unlink()
        argv = self._argv(action, resume_path)
        env = self._env(action, resume_path)
        log_path = self.layout.attempt_log(action.attempt)
        with contextlib.suppress(OSError), log_path.open("ab") as handle:
            handle.write(
                f"# trainwarden attempt {action.attempt}: resume_from={resume_path or '-'} "
                f"argv={argv}\n".encode()
            )
        try:
            handle_ = self.shell.launcher.spawn(
                argv,
                env=env,
                cwd=Path.cwd(),
                log_path=log_path,
                pass_fds=(self.lock.fd,) if self.lock.held else (),
                on_exit=lambda pid, rc: self.queue.put(_ExitNotice(pid, rc)),
            )
        except OSError as exc:
            return [SpawnFailed(action.attempt, f"{argv[0]}: {exc.strerror or exc}")]
        self._child_pids.add(handle_.pid)
        self.heartbeat.reset(action.attempt, handle_.pid)
        self.oom_watch = OomWatch(handle_.pid)
        return [ChildSpawned(action.attempt, handle_.pid)]

    def _argv(self, action: Launch, resume_path: str) -> list[str]:
        if self.config.command is not None:
            return render_command(self.config.command, resume_path)
        assert self.config.train is not None
        job = JobFile(
            output_dir=str(self.config.output_dir),
            train=self.config.train,
            overrides=action.overrides,
        )
        atomic_write_model(self.layout.job, job)
        argv = [sys.executable, "-m", "trainer_child", "--job", str(self.layout.job)]
        if self.config.train.nproc_per_node > 1:
            # torch.distributed.run's agent, in-process, around N ranks of the same child.
            nproc = str(self.config.train.nproc_per_node)
            argv[2:3] = ["trainer_child.launch", "--nproc-per-node", nproc]
        if resume_path:
            argv += ["--resume-from", resume_path]
        return argv

    def _env(self, action: Launch, resume_path: str) -> dict[str, str]:
        env = {**os.environ, **launcher_env(self.config.preemption.grace), **self.config.env}
        env[ENV_RESUME_FROM] = resume_path
        env[ENV_OUTPUT_DIR] = str(self.config.output_dir)
        env[ENV_ATTEMPT] = str(action.attempt)
        env["PYTHONUNBUFFERED"] = "1"
        if self.config.command is not None and self.config.inject_callback:
            env.update(injection_env(env))
        # systemd's notify socket belongs to the supervisor (NotifyAccess=main).
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)
        overrides: Overrides = action.overrides
        if overrides.per_device_train_batch_size is not None:
            env[ENV_MICRO_BATCH] = str(overrides.per_device_train_batch_size)
        if overrides.gradient_accumulation_steps is not None:
            env[ENV_GRAD_ACCUM] = str(overrides.gradient_accumulation_steps)
        return env

    def _state_file(self) -> RunStateFile:
        state = self.state
        now, wall = self.shell.clock(), self.shell.wall()
        beat = state.heartbeat
        child = state.child
        return RunStateFile(
            attempts=state.attempt,
            restarts=len(state.failures),
            completed=state.mode is Mode.COMPLETED,
            completed_job=self.config.job_digest() if state.mode is Mode.COMPLETED else None,
            gave_up=state.gave_up,
            status=state.status,
            mode=state.mode.value,
            overrides=state.overrides,
            failures=tuple(
                FailureRecord(
                    attempt=f.attempt, kind=f.kind.value, step=f.step, evidence=f.evidence
                )
                for f in state.failures
            ),
            restart_wall_times=tuple(wall - (now - t) for t in state.restart_times),
            consecutive_failures=state.consecutive_failures,
            newest_valid_step=state.newest_valid,
            poisoned_steps=tuple(sorted(state.poisoned)),
            step=beat.step if beat else None,
            max_steps=beat.max_steps if beat else None,
            supervisor_pid=os.getpid(),
            child_pid=child.pid if child else None,
            child_create_time=procs.create_time(child.pid) if child else None,
            updated_wall_time=wall,
        )


def injection_env(env: dict[str, str]) -> dict[str, str]:
    """Return the variables that make every Python process of the job load our hook.

    Only the hook's own folder goes on PYTHONPATH, ahead of the user's entries:
    adding this interpreter's site-packages would break a job that runs another
    Python (a conda env), which gets a one-line warning from the hook instead.
    """
    site = str(SITE_DIR)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != site]
    return {"PYTHONPATH": os.pathsep.join([site, *paths]), ENV_INJECT: "1"}


def launcher_env(grace: float) -> dict[str, str]:
    """Return the settings that put torch.distributed's agent under trainwarden's rules.

    Its own restarts off (torchrun's ``--max-restarts`` defaults to
    ``PET_MAX_RESTARTS``): trainwarden restarts the whole group, from a checkpoint
    it has verified. Its shutdown timeout (SIGTERM to the ranks, then SIGKILL;
    30 s by default) raised to the preemption grace, so it never kills a rank
    still writing its emergency checkpoint before trainwarden itself would.
    A flag on the command line, or the job's ``env:``, still wins.
    """
    return {
        "PET_MAX_RESTARTS": "0",
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(max(1, math.ceil(grace))),
    }


def _kind(value: str) -> FailureKind:
    try:
        return FailureKind(value)
    except ValueError:
        return FailureKind.CRASH


#: argparse's last words: "sft.py: error: argument --max_steps: invalid int value: 'x'".
_USAGE_ERROR_RE = re.compile(r"^[\w.\-]+: error: ")
_EXCEPTION_LINE_RE = re.compile(r"^[A-Za-z_][\w.]*(?:: |$)")
#: Longest error line kept: enough for a path and a reason, short enough for a status line.
MAX_ERROR_LINE = 300


def last_error_line(tail: bytes) -> str | None:
    """Return the line that names the child's fatal error in its log tail, if there is one.

    Python ends an uncaught exception with its traceback, whose first unindented
    line after the frames is ``Type: message``; argparse ends with ``prog: error:
    ...``. A process killed by a signal prints neither, and gets None: nothing
    to recognise it by.
    """
    lines = tail.decode(errors="replace").splitlines()
    start = max((i for i, text in enumerate(lines) if text.startswith("Traceback (")), default=None)
    if start is not None:
        for text in lines[start + 1 :]:
            if text and not text[0].isspace() and _EXCEPTION_LINE_RE.match(text):
                return text.strip()[:MAX_ERROR_LINE]
    for text in reversed(lines[-5:]):
        if _USAGE_ERROR_RE.match(text):
            return text.strip()[:MAX_ERROR_LINE]
    return None


#: How launchers report the signal that killed the process they started:
#: ``accelerate launch`` (subprocess.CalledProcessError) and torchrun's agent.
_LAUNCHER_SIGNAL_RES = (
    re.compile(rb"died with <Signals\.SIG\w+: (\d+)>"),
    re.compile(rb"Signal (\d+) \(SIG\w+\) received by PID"),
    re.compile(rb"exitcode\s*:\s*-(\d+)"),
)


#: A launcher's account of a worker's exit status: torchrun's failure summary
#: (its root cause comes last) and ``accelerate launch``'s CalledProcessError.
_LAUNCHER_EXIT_RES = (
    re.compile(rb"exitcode\s*:\s*(-?\d+)"),
    re.compile(rb"returned non-zero exit status (\d+)"),
)


def launcher_reported_exit(tail: bytes) -> int | None:
    """Return the exit status a launcher says its (first failed) worker ended with.

    Negative values (a signal) are ``launcher_reported_signal``'s; None then.
    """
    found: tuple[int, int] | None = None
    for pattern in _LAUNCHER_EXIT_RES:
        for match in pattern.finditer(tail):
            if found is None or match.start() > found[0]:
                found = (match.start(), int(match.group(1)))
    return found[1] if found is not None and found[1] >= 0 else None


def launcher_reported_signal(tail: bytes) -> int | None:
    """Return the signal a launcher says killed its worker, from the log's last words."""
    found: tuple[int, int] | None = None
    for pattern in _LAUNCHER_SIGNAL_RES:
        for match in pattern.finditer(tail):
            if found is None or match.start() > found[0]:
                found = (match.start(), int(match.group(1)))
    return found[1] if found is not None else None


def _report_line(report: ErrorReport) -> str:
    """One line for an error.json: ``OSError: the first line of its message``."""
    first = report.message.strip().splitlines()[0] if report.message.strip() else ""
    name = report.type.rsplit(".", 1)[-1]
    return f"{name}: {first}"[:MAX_ERROR_LINE] if first else name


def _read_tail(path: Path, size: int) -> bytes:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - size))
            return handle.read()
    except OSError:
        return b""


@contextlib.contextmanager
def _logged_failure(event: str, **fields: object) -> Iterator[None]:
    """Log and swallow an OSError: a failed prune must not take the supervisor down."""
    try:
        yield
    except OSError as exc:
        log.exception(event, error=str(exc), **fields)


__all__ = ["Shell", "Signal", "Supervisor", "default_shell"]
