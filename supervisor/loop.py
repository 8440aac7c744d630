"""The one main loop: drain the queue, ask the policy, execute its actions.

One thread owns all state. The watchdog observer, the signal handlers and the
threads that wait on children only put notices on ``self.queue``; the timer is
the queue's own ``get(timeout=...)``. Everything the policy needs to know is
gathered here into an event, and everything it decides is executed here, through
the narrow interfaces bundled in ``Shell`` (each has a fake in ``shell/testing.py``).
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import random
import signal as signal_mod
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from supervisor.config import Config
from supervisor.core import checkpoints, policy
from supervisor.core.command import render_command
from supervisor.core.model import (
    Action,
    ChildExited,
    ChildSpawned,
    Disk,
    Event,
    Exit,
    ExtendStop,
    FailureKind,
    FailureNote,
    FreeSpace,
    HeartbeatView,
    Inventory,
    InventoryChanged,
    Launch,
    Mode,
    Persist,
    PreemptionNoticed,
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
from supervisor.mirror_sync import MIN_DRAIN_SECONDS, MirrorSync
from supervisor.shell import signals
from supervisor.shell.disk import DiskProbe, StatvfsDisk
from supervisor.shell.evidence import EvidenceSource, FileEvidence
from supervisor.shell.heartbeat import HeartbeatMonitor, HeartbeatSource
from supervisor.shell.journal import FileJournal, Journal
from supervisor.shell.launcher import JobMarker, Launcher, ProcessLauncher
from supervisor.shell.lock import Lock, RunLock
from supervisor.shell.mirror.seam import Mirror, RemoteMirror
from supervisor.shell.mirror.worker import MirrorEvent
from supervisor.shell.observe import Observer, RunObserver, RunView
from supervisor.shell.preemption_notice import (
    NoticePoller,
    NoticeStarter,
    NoticeWatch,
    PreemptionNotice,
    Provider,
)
from supervisor.shell.procs import Peers, ProcPeers
from supervisor.shell.rundir import FileRunDir, RunDir
from supervisor.shell.standby import WarmLauncher
from supervisor.shell.store import CheckpointStore, FileCheckpointStore
from supervisor.shell.systemd import NOTIFY_ENV_VARS, Notifier, SystemdNotifier
from supervisor.shell.watcher import CheckpointWatcher, WatcherFactory
from trainer_child.protocol import (
    ENV_ATTEMPT,
    ENV_GRAD_ACCUM,
    ENV_INJECT,
    ENV_MICRO_BATCH,
    ENV_OUTPUT_DIR,
    ENV_RESUME_FROM,
    SITE_DIR,
    FailureRecord,
    JobFile,
    Layout,
    Overrides,
    RunStateFile,
)

log = structlog.get_logger("trainwarden")

#: Seconds between timer ticks: bounds hang-detection lag and stop escalation lag.
TICK_SECONDS = 0.25
#: The watcher is the fast path; this periodic rescan is the safety net.
RESCAN_SECONDS = 10.0
#: Per-attempt log cap; the tail is kept.
LOG_CAP_BYTES = 64 * 1024 * 1024
#: On the way out, how long the mirror's threads get to end (a transfer in flight
#: finishes first; after this they die with the process).
MIRROR_CLOSE_SECONDS = 10.0


@dataclass(frozen=True)
class _ExitNotice:
    pid: int
    returncode: int


@dataclass(frozen=True)
class _FsNotice:
    pass


#: ``signals.install``'s shape: route stop signals to ``queue_put``; return ``restore``.
SignalInstaller = Callable[[Callable[[object], None], Callable[[str], object]], Callable[[], None]]


@dataclass
class Shell:
    """Every side effect the loop performs, behind narrow interfaces.

    One field per seam; ``default_shell`` builds the real ones and
    ``supervisor/shell/testing.py`` has a fake of each, so the loop can run with
    no process, no file and no ``/proc`` at all.
    """

    launcher: Launcher
    store: CheckpointStore
    journal: Journal
    disk: DiskProbe
    notifier: Notifier
    run_dir: RunDir
    lock: Lock
    peers: Peers
    heartbeat: HeartbeatSource
    evidence: EvidenceSource
    watcher: WatcherFactory
    observer: Observer
    #: The remote copy (``mirror:``); None when the job has none.
    mirror: Mirror | None = None
    #: Watches the cloud's preemption notice (``preemption.notice``); None when off.
    notices: NoticeStarter | None = None
    signals: SignalInstaller = signals.install
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    rand: Callable[[], float] = random.random


def default_shell(config: Config) -> Shell:
    """The real shell for a config: processes, files, statvfs, inotify, sd_notify."""
    layout = Layout(config.output_dir)
    warm = config.restart.standby == "auto"
    processes = ProcessLauncher(
        linger=config.preemption.grace,
        marker=JobMarker(ENV_OUTPUT_DIR, str(config.output_dir)),
        cold_note="" if warm else "restart.standby is off",
    )
    launcher: Launcher = WarmLauncher(processes, layout) if warm else processes
    return Shell(
        launcher=launcher,
        store=FileCheckpointStore(config.output_dir, require_record=config.train is not None),
        journal=FileJournal(layout),
        disk=StatvfsDisk(config.output_dir),
        notifier=SystemdNotifier(),
        run_dir=FileRunDir(layout),
        lock=RunLock(layout.lock),
        peers=ProcPeers(layout),
        heartbeat=HeartbeatMonitor(layout),
        evidence=FileEvidence(layout),
        watcher=CheckpointWatcher,
        observer=RunObserver(config),
        mirror=_remote_mirror(config, layout),
        notices=_notice_starter(config),
    )


def _notice_starter(config: Config) -> NoticeStarter | None:
    """Poll the configured cloud's metadata service on a thread, from the loop's start."""
    notice = config.preemption
    if notice.notice == "off":
        return None
    provider = Provider(notice.notice)

    def start(notify: Callable[[PreemptionNotice], None]) -> NoticeWatch:
        poller = NoticePoller(
            provider, notify, base_url=notice.notice_url, interval=notice.notice_interval
        )
        return poller.start()

    return start


def _remote_mirror(config: Config, layout: Layout) -> RemoteMirror | None:
    if config.mirror is None:
        return None
    retention = config.retention
    return RemoteMirror(
        config.mirror,
        layout,
        keep_last=config.mirror_keep_last,
        keep_best=retention.keep_best,
        keep_every=retention.keep_every,
    )


class Supervisor:
    """Run one job to completion (or a clean stop, or a reasoned give-up)."""

    def __init__(self, config: Config, shell: Shell | None = None) -> None:
        self.config = config
        self.layout = Layout(config.output_dir)
        self.shell = shell or default_shell(config)
        self.queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.state = State(config=config.policy())
        self.exit_code: int | None = None
        self._last_rescan = 0.0
        self._last_tick = 0.0
        self._child_pids: set[int] = set()
        self._mirror = MirrorSync(self.shell.mirror, self._record)
        self._orphan_gone_seen = False
        #: The cloud's preemption notice came and its own SIGTERM has not yet.
        self._cloud_signal_due = False

    # --- lifecycle ---------------------------------------------------------------

    def run(self) -> int:
        """Supervise until the run completes, stops cleanly, or gives up; return the exit code."""
        shell = self.shell
        # Before anything is created: a wrong bucket or bad credentials is exit 78.
        self._mirror.probe()
        shell.run_dir.prepare()
        previous = shell.journal.read_state()
        orphan = self._claim_output_dir(previous)
        try:
            # An orphan child trains on this very disk: nothing to bring back.
            # Before the observer: a restored state.json carries the tracking run id.
            if orphan is None and self._mirror.restore(shell.store):
                previous = shell.journal.read_state()
            shell.observer.start(previous)
        except BaseException:
            self._mirror.close(MIRROR_CLOSE_SECONDS)
            shell.lock.release()
            raise
        restore = shell.signals(self.queue.put, SignalReceived)
        notices: NoticeWatch | None = None
        watcher = shell.watcher(self.config.output_dir, lambda: self.queue.put(_FsNotice()))
        try:
            self._mirror.start(self.queue.put)
            watcher.start()
            notices = shell.notices(self.queue.put) if shell.notices else None
            shell.notifier.ready()
            log.info("supervisor_started", output_dir=str(self.config.output_dir), pid=os.getpid())
            started = Started(
                inventory=self._inventory(),
                disk=shell.disk.usage(),
                previous=self._previous(previous),
                orphan_pid=orphan,
            )
            self._process(started)
            while self.exit_code is None:
                event = self._next_event()
                if event is not None:
                    self._process(event)
            self._drain_mirror()
            return self.exit_code
        except BaseException:
            # An unexpected error in the loop must not leave a child training
            # unsupervised: ask it for an emergency checkpoint, then kill it.
            for pid in list(self._child_pids):
                shell.launcher.stop(pid, self.config.preemption.grace)
            raise
        finally:
            shell.notifier.stopping()
            watcher.stop()
            if notices is not None:
                notices.close()
            restore()
            self._mirror.close(MIRROR_CLOSE_SECONDS)
            shell.launcher.close()
            shell.observer.update(self._view())
            shell.observer.close()
            shell.lock.release()

    def _claim_output_dir(self, previous: RunStateFile | None) -> int | None:
        """Take the run lock; return the pid of an orphan that holds it, or refuse."""
        if self.shell.lock.acquire():
            # Ranks whose launcher died with the last supervisor hold no lock
            # (torchrun closes inherited descriptors) and may train on: wait
            # them out as an orphan.
            strays = self.shell.launcher.job_processes(None)
            if strays:
                log.warning("stray_job_processes", pids=strays)
                return strays[0]
            return None
        peers = self.shell.peers
        if peers.supervisor_alive(previous):
            pid = previous.supervisor_pid if previous else None
            raise LockedError(
                f"another trainwarden supervisor (pid {pid}) is running on "
                f"{self.config.output_dir}; stop it first (two must never share an output_dir)"
            )
        orphan = peers.find_orphan(previous)
        if orphan is None:
            raise LockedError(
                f"{self.layout.lock} is held by an unknown process; find it with "
                f"`fuser {self.layout.lock}` and stop it"
            )
        return orphan

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

    def _next_event(self) -> Event | None:
        """The next event for the policy; None for a notice the loop handled itself."""
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
            return InventoryChanged(self._inventory())
        if isinstance(notice, PreemptionNotice):
            provider, action = notice.provider.value, notice.action
            notice = PreemptionNoticed(provider, action, notice.deadline_wall_time)
            # Only a notice that starts the stop promises a signal; after a
            # SIGTERM it changes nothing (the policy agrees: Stopping.noticed).
            self._cloud_signal_due = self._mirror.signalled_at is None
        elif isinstance(notice, SignalReceived):
            self._cloud_signal_due = False  # the policy knows it was expected (Stopping.noticed)
        if isinstance(notice, SignalReceived | PreemptionNoticed):
            # The mirror's drain before exit is counted from here.
            self._mirror.signalled_at = self._mirror.signalled_at or self.shell.clock()
            return notice
        if isinstance(notice, MirrorEvent):
            self._on_mirror_event(notice)
            return None
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
            return InventoryChanged(self._inventory())
        child = self.state.child
        beat = None
        stopped = False
        if child is not None:
            beat = self.shell.heartbeat.poll(child.started_at)
            stopped = self.shell.launcher.process_stopped(child.pid)
            self.shell.launcher.enforce_log_cap(
                self.layout.attempt_log(child.attempt), LOG_CAP_BYTES
            )
        lock_acquired = False
        orphan_alive = False
        if self.state.mode is Mode.WAITING_ORPHAN:
            lock_acquired = orphan_gone
            orphan = self.state.orphan
            # Its ranks count too; the cheap check first, /proc is scanned only after.
            launcher = self.shell.launcher
            orphan_alive = orphan is not None and (
                launcher.process_alive(orphan.pid) or bool(launcher.job_processes(orphan.pid))
            )
        disk = self.shell.disk.usage()
        self.shell.observer.update(self._view(beat, disk.free))
        return Tick(
            disk=disk,
            heartbeat=beat,
            child_stopped=stopped,
            lock_acquired=lock_acquired,
            orphan_alive=orphan_alive,
        )

    def _view(self, beat: HeartbeatView | None = None, disk_free: int | None = None) -> RunView:
        """The run as the observer sees it now (the heartbeat of this tick, if any)."""
        state = self.state
        beat = beat or state.heartbeat
        return RunView(
            wall=self.shell.wall(),
            mode=state.mode,
            attempt=state.attempt,
            step=beat.step if beat is not None else None,
            max_steps=beat.max_steps if beat is not None else None,
            last_step_seconds=beat.last_step_seconds if beat is not None else None,
            newest_checkpoint_step=state.newest_valid,
            disk_free_bytes=disk_free if disk_free is not None else _free(state.disk),
            mirror_lag_checkpoints=self._mirror.lag_checkpoints(),
        )

    def _orphan_gone(self) -> bool:
        """Say whether the orphan's lock is ours and no process of its job is left.

        The lock alone is not enough: torchrun's ranks do not inherit it, and
        may outlive their agent.
        """
        if not self.shell.lock.acquire():
            return False
        orphan = self.state.orphan
        return not self.shell.launcher.job_processes(orphan.pid if orphan else None)

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
            evidence=self.shell.evidence.gather(notice.pid, attempt, sig),
            inventory=self._inventory(),
            disk=self.shell.disk.usage(),
            jitter=self.shell.rand(),
        )

    def _process(self, event: Event) -> None:
        pending: list[Event] = [event]
        while pending:
            current = pending.pop(0)
            self.state, actions = policy.decide(self.state, current, self.shell.clock())
            self._mirror.note(self.state)
            for action in actions:
                pending.extend(self._execute(action))

    # --- the mirror (supervisor/mirror_sync.py) -----------------------------------

    def _inventory(self) -> Inventory:
        """The checkpoint inventory, with the step the mirror is uploading marked."""
        return self._mirror.with_inventory_pins(self.shell.store.inventory())

    def _on_mirror_event(self, event: MirrorEvent) -> None:
        """Journal an upload's outcome; a changed lag goes to STATUS= and state.json."""
        if self._mirror.on_event(event):
            self.shell.notifier.status(self._mirror.status(self.state.status))
            self.shell.journal.write_state(self._state_file())

    def _drain_mirror(self) -> None:
        """Before exiting, give the mirror until the preemption grace ends to take the newest.

        After a stop signal the grace counts from the signal, as for the
        emergency save; otherwise (complete, gave up) from now.
        """
        if not self._mirror.enabled:
            return
        now = self.shell.clock()
        since = self._mirror.signalled_at if self.state.mode is Mode.PREEMPTED else None
        deadline = max((since or now) + self.config.preemption.grace, now + MIN_DRAIN_SECONDS)
        self._mirror.drain(
            self.state, deadline=deadline, clock=self.shell.clock, poll=self._poll_while_draining
        )
        self.shell.journal.write_state(self._state_file())

    def _poll_while_draining(self) -> bool:
        """Feed the watchdog, journal mirror events; say whether another stop signal came."""
        self.shell.notifier.watchdog()
        stop = False
        while True:
            try:
                notice = self.queue.get_nowait()
            except queue.Empty:
                return stop
            if isinstance(notice, MirrorEvent):
                self._on_mirror_event(notice)
            elif isinstance(notice, SignalReceived) and self._cloud_signal_due:
                # The SIGTERM that follows the cloud's notice: the upload goes on.
                self._cloud_signal_due = False
                self._record("stop_signal_after_notice", {"signal": notice.name})
            elif isinstance(notice, SignalReceived):
                stop = True

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
            self._record(action.event, action.fields, action.attempt)
        elif isinstance(action, Persist):
            self.shell.journal.write_state(self._state_file())
            self._mirror.persisted()
        elif isinstance(action, Status):
            self.shell.notifier.status(self._mirror.status(action.text))
        elif isinstance(action, ExtendStop):
            self.shell.notifier.extend_timeout(action.seconds)
        elif isinstance(action, Exit):
            self.exit_code = action.code
            log.info("supervisor_exit", code=action.code, reason=action.reason)
        return []

    def _record(self, event: str, fields: dict[str, object], attempt: int | None = None) -> None:
        attempt = self.state.attempt if attempt is None else attempt
        self.shell.journal.append(event, attempt, **fields)
        self.shell.observer.record(self.shell.wall(), event, attempt, fields)
        failure = event in ("failure", "gave_up", "hang_detected")
        (log.warning if failure else log.info)(event, attempt=attempt, **fields)

    def _launch(self, action: Launch) -> list[Event]:
        if action.resume_from is not None:
            entry = self.shell.store.verify_for_resume(action.resume_from)
            if not checkpoints.is_valid(entry):
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
        shell = self.shell
        shell.evidence.forget()
        argv = self._argv(action, resume_path)
        env = self._env(action, resume_path)
        log_path = self.layout.attempt_log(action.attempt)
        shell.run_dir.note(
            action.attempt,
            f"attempt {action.attempt}: resume_from={resume_path or '-'} argv={argv}",
        )
        try:
            handle_ = self.shell.launcher.spawn(
                argv,
                env=env,
                cwd=Path.cwd(),
                log_path=log_path,
                pass_fds=(shell.lock.fd,) if shell.lock.held else (),
                on_exit=lambda pid, rc: self.queue.put(_ExitNotice(pid, rc)),
            )
        except OSError as exc:
            return [SpawnFailed(action.attempt, f"{argv[0]}: {exc.strerror or exc}")]
        self._child_pids.add(handle_.pid)
        shell.heartbeat.reset(action.attempt, handle_.pid)
        shell.evidence.watch(handle_.pid)
        return [ChildSpawned(action.attempt, handle_.pid, handle_.start, handle_.start_note)]

    def _argv(self, action: Launch, resume_path: str) -> list[str]:
        if self.config.command is not None:
            return render_command(self.config.command, resume_path)
        assert self.config.train is not None
        job = JobFile(
            output_dir=str(self.config.output_dir),
            train=self.config.train,
            overrides=action.overrides,
        )
        job_path = self.shell.run_dir.write_job(job)
        argv = [sys.executable, "-m", "trainer_child", "--job", str(job_path)]
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
        env.update(self.shell.observer.child_env(env))
        # systemd's notify socket belongs to the supervisor (NotifyAccess=main).
        for name in NOTIFY_ENV_VARS:
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
            consecutive_failures=state.streak.failures,
            newest_valid_step=state.newest_valid,
            poisoned_steps=tuple(sorted(state.poisoned)),
            step=beat.step if beat else None,
            max_steps=beat.max_steps if beat else None,
            supervisor_pid=os.getpid(),
            child_pid=child.pid if child else None,
            child_create_time=self.shell.peers.create_time(child.pid) if child else None,
            updated_wall_time=wall,
            tracking_run_id=self.shell.observer.tracking_run_id,
            **self._mirror.state_fields(),
        )


def _free(disk: Disk | None) -> int | None:
    return disk.free if disk is not None else None


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


@contextlib.contextmanager
def _logged_failure(event: str, **fields: object) -> Iterator[None]:
    """Log and swallow an OSError: a failed prune must not take the supervisor down."""
    try:
        yield
    except OSError as exc:
        log.exception(event, error=str(exc), **fields)


__all__ = ["Shell", "Signal", "Supervisor", "default_shell"]
