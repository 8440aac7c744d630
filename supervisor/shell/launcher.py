"""Start, signal and stop the training child; keep its log bounded.

The one place that knows how a process is started and killed. Decisions are the
policy's; this module only carries them out and reports exits through a callback
that must do nothing but enqueue (docs/architecture.md, "The process model").

Hazards handled here:

- The child leads its own session and process group (``start_new_session``), so
  a signal to the group reaches the grandchildren (dataloader workers, torchrun
  ranks) and a terminal's Ctrl-C or hangup does not reach it behind our back.
- Its stdout and stderr go to a *file* opened ``O_APPEND``, never a pipe: if the
  supervisor dies, a pipe would give the child SIGPIPE on its next print and kill
  a run that an orphan-aware restart could otherwise have kept.
- ``stop`` escalates SIGTERM -> grace -> SIGKILL over the whole group and treats
  an already-dead process as success (like torch elastic's ``_close``).
- In some containers PID 1 never reaps, so a dead grandchild can stay a zombie
  forever; liveness checks here therefore ignore zombies.
- A launcher (``accelerate launch``, ``torchrun``) may die before the ranks it
  started: on SIGTERM ``accelerate launch`` exits at once while its worker is
  still writing the emergency checkpoint. So a child's exit is reported once
  its whole process group is gone, not when the leader is: the group is given
  ``linger`` seconds after the leader's exit, then SIGKILLed.
- torchrun's agent (``accelerate launch`` with several processes runs the same
  agent) starts every rank with ``start_new_session``: the ranks are *not* in
  the child's process group, and survive a SIGKILL of it. So "the group" here
  is the leader's process group plus every process that carries the job's
  marker in its environment (``JobMarker``: the output_dir the supervisor hands
  every child), wherever it now lives in the process tree. Signals, the wait
  for the group to be gone and the stopped-process check cover all of them.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psutil
import structlog

__all__ = [
    "ChildHandle",
    "ExitCallback",
    "JobMarker",
    "JobScan",
    "Launcher",
    "ProcessLauncher",
    "enforce_log_cap",
    "live_group_members",
    "process_alive",
    "process_stopped",
]

log = structlog.get_logger()

#: Called from a waiter thread as ``on_exit(pid, returncode)``; Popen's returncode,
#: so a negative value is the signal that killed the child. It must only enqueue.
ExitCallback = Callable[[int, int], None]

#: How long ``stop`` waits for the group to vanish after SIGKILL before it gives
#: up and logs: SIGKILL cannot be caught, but a task in D state (stuck NFS read,
#: a GPU driver call) dies only when the kernel lets it.
_AFTER_KILL_TIMEOUT = 10.0
_POLL = 0.01
#: Polling a group through /proc costs a directory scan: not every 10 ms.
_GROUP_POLL = 0.05
#: How old the list of a job's processes may be when checking whether one is stopped.
_MEMBERS_MAX_AGE = 5.0
_COPY_CHUNK = 1 << 20
#: The smallest cap that leaves room for a marker and a useful tail.
_MIN_LOG_CAP = 4096
_MARKER_RE = re.compile(rb"^\[trainwarden: (\d+) bytes truncated\]\n")


@dataclass(frozen=True)
class ChildHandle:
    """A spawned child: its pid (also its process-group id) and monotonic start time.

    ``start`` says how it began: ``cold`` (a new process) or ``warm`` (a
    standby took the attempt, ``shell/standby.py``); ``start_note`` says why.
    """

    pid: int
    started_at: float
    log_path: Path
    start: str = "cold"
    start_note: str = ""


class Launcher(Protocol):
    """Everything the loop does to a child process, so tests can swap in a fake."""

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
        """Start a child in its own process group; raise OSError if it cannot start."""
        ...

    def signal_group(self, pid: int, sig: int) -> None:
        """Send ``sig`` to the process group led by ``pid``; a dead group is fine."""
        ...

    def stop(self, pid: int, grace: float) -> None:
        """Block until the group is gone: SIGTERM, then SIGKILL after ``grace`` seconds."""
        ...

    def enforce_log_cap(self, path: Path, cap_bytes: int) -> int:
        """Shrink the log to its newest half once it passes ``cap_bytes``; return bytes cut."""
        ...

    def process_alive(self, pid: int) -> bool:
        """Say whether ``pid`` exists and is not a zombie."""
        ...

    def process_stopped(self, pid: int) -> bool:
        """Say whether ``pid``, or any process of its job, is stopped (SIGSTOP/ptrace)."""
        ...

    def job_processes(self, pid: int | None) -> list[int]:
        """List the live processes of the job led by ``pid`` (None: those carrying its marker)."""
        ...

    def close(self) -> None:
        """Stop any child still running and join every waiter thread."""
        ...


# --- process facts ---------------------------------------------------------------------


def process_alive(pid: int) -> bool:
    """Say whether ``pid`` exists and is not a zombie (a zombie has already died)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def process_stopped(pid: int) -> bool:
    """Say whether ``pid`` is in state T/t: SIGSTOPped or stopped under a tracer.

    A stopped child writes no heartbeat; the policy must not call that a hang
    (someone is debugging it, or a job scheduler suspended it).
    """
    try:
        status = psutil.Process(pid).status()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    return status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)


def live_group_members(pgid: int, proc_root: str = "/proc") -> list[int]:
    """List the non-zombie processes whose process group is ``pgid``.

    Read from ``/proc/N/stat`` rather than ``killpg(pgid, 0)``, which also counts
    zombies: where PID 1 does not reap, a dead grandchild would look alive forever.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []  # no member at all, zombies included: skip the scan
    except PermissionError:
        pass
    members: list[int] = []
    for name in os.listdir(proc_root):
        if not name.isdigit():
            continue
        try:
            with open(f"{proc_root}/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue  # exited while we looked
        # comm (field 2) may hold spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) < 3:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in (b"Z", b"X"):
            members.append(int(name))
    return members


@dataclass(frozen=True)
class JobMarker:
    """An environment variable every process of the job inherits, and the job's value of it.

    The value is a path (the output_dir); a process whose value is relative is
    judged from its own working directory.
    """

    name: str
    value: str


def _stat_fields(proc_root: str, pid: int) -> list[bytes] | None:
    """Return ``/proc/PID/stat`` from field 3 (state) on, plus comm; None if it is gone."""
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    close = stat.rfind(b")")
    fields = stat[close + 2 :].split()
    if len(fields) < 20:
        return None
    return [stat[stat.find(b"(") + 1 : close], *fields]


class JobScan:
    """Find a job's live processes: its leader's process group, plus every marked process.

    One pass over ``/proc``. Whether a process carries the marker is fixed at its
    exec, so the answer is cached by (pid, start time, comm) and only processes
    not seen before have their environment read. Thread-safe: the waiter threads
    and the main loop share one scan.
    """

    def __init__(self, marker: JobMarker | None, proc_root: str = "/proc") -> None:
        self.marker = marker
        self._proc_root = proc_root
        self._lock = threading.Lock()
        self._verdicts: dict[tuple[int, bytes, bytes], bool] = {}
        #: Process groups that carry the marker but are not the job (an idle standby).
        self._spared: set[int] = set()
        self._needle = f"{marker.name}=".encode() if marker else b""
        self._target = os.path.realpath(marker.value) if marker else ""

    def spare(self, pgid: int, spared: bool = True) -> None:
        """Leave group ``pgid`` out of the job (or take it back): it is marked, but not the job's.

        A spared group's own members are still its members; no other group's are.
        """
        with self._lock:
            (self._spared.add if spared else self._spared.discard)(pgid)

    def members(self, pgid: int | None) -> list[int]:
        """List the live (non-zombie) processes in group ``pgid`` or carrying the marker."""
        with self._lock:
            alone = pgid is not None and pgid in self._spared
        if self.marker is None or alone:
            return live_group_members(pgid, self._proc_root) if pgid is not None else []
        own = os.getpid()
        found: list[int] = []
        verdicts: dict[tuple[int, bytes, bytes], bool] = {}
        with self._lock:
            for name in os.listdir(self._proc_root):
                if not name.isdigit() or int(name) == own:
                    continue
                pid = int(name)
                fields = _stat_fields(self._proc_root, pid)
                if fields is None:
                    continue  # exited while we looked
                comm, state, pgrp, start = fields[0], fields[1], int(fields[3]), fields[20]
                if state in (b"Z", b"X"):
                    continue
                key = (pid, start, comm)
                marked = self._verdicts.get(key)
                if marked is None:
                    marked = self._carries_marker(pid)
                verdicts[key] = marked
                if pgrp == pgid or (marked and pgrp not in self._spared):
                    found.append(pid)
            self._verdicts = verdicts
        return found

    def _carries_marker(self, pid: int) -> bool:
        try:
            with open(f"{self._proc_root}/{pid}/environ", "rb") as handle:
                environ = handle.read()
        except OSError:
            return False  # gone, or not ours to read
        for entry in environ.split(b"\0"):
            if not entry.startswith(self._needle):
                continue
            value = os.fsdecode(entry[len(self._needle) :])
            if not os.path.isabs(value):
                try:
                    value = os.path.join(os.readlink(f"{self._proc_root}/{pid}/cwd"), value)
                except OSError:
                    return False
            return os.path.realpath(value) == self._target
        return False


# --- log cap ---------------------------------------------------------------------------


def enforce_log_cap(path: str | os.PathLike[str], cap_bytes: int) -> int:
    """Cut a log that passed ``cap_bytes`` down to its newest half, in place; return bytes cut.

    The child keeps appending through its own ``O_APPEND`` descriptor while this
    runs, so the file is rewritten in place (copy the tail to the front, then
    ``ftruncate``) rather than replaced: a rename would leave the child writing
    into an unlinked inode. The first line becomes
    ``[trainwarden: N bytes truncated]`` with N counted over every cut so far.

    The race accepted: bytes the child appends after our last size check and
    before the ``ftruncate`` are cut off. We re-check the size after copying and
    copy whatever arrived, so the window is the few microseconds between that
    last ``fstat`` and ``ftruncate``. A single write is never torn: Linux holds the
    inode lock across an ``O_APPEND`` write and across ``ftruncate``, so a write
    lands wholly before the cut (and may be lost) or wholly after it (at the new
    end). Readers following the file see it shrink, as with any rotated log.
    """
    if cap_bytes < _MIN_LOG_CAP:
        raise ValueError(f"log cap {cap_bytes} is below the minimum of {_MIN_LOG_CAP} bytes")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        size = os.fstat(fd).st_size
        if size <= cap_bytes:
            return 0
        head = os.pread(fd, 64, 0)
        match = _MARKER_RE.match(head)
        earlier, old_marker_len = (int(match.group(1)), match.end()) if match else (0, 0)

        start = size - cap_bytes // 2
        # Begin the kept part at a line start so it does not open mid-line.
        probe = os.pread(fd, min(4096, size - start), start)
        newline = probe.find(b"\n")
        if newline >= 0 and start + newline + 1 < size:
            start += newline + 1

        cut = start - old_marker_len
        marker = f"[trainwarden: {earlier + cut} bytes truncated]\n".encode()
        # The destination always lies below the source, so copying front to back
        # never overwrites bytes not yet read (memmove's forward case).
        src, dst = start, len(marker)
        while True:
            end = os.fstat(fd).st_size
            while src < end:
                chunk = os.pread(fd, min(_COPY_CHUNK, end - src), src)
                if not chunk:
                    break
                os.pwrite(fd, chunk, dst)
                src += len(chunk)
                dst += len(chunk)
            if os.fstat(fd).st_size == end:
                break  # nothing arrived while copying
        os.pwrite(fd, marker, 0)
        os.ftruncate(fd, dst)
    finally:
        os.close(fd)
    log.info("log_truncated", path=str(path), cut_bytes=cut, kept_bytes=dst)
    return cut


# --- the real launcher -----------------------------------------------------------------


@dataclass
class _Child:
    proc: subprocess.Popen[bytes]
    waiter: threading.Thread
    #: Set once the waiter has reaped the child *and* delivered on_exit.
    reported: threading.Event = field(default_factory=threading.Event)


class ProcessLauncher:
    """Run children with ``subprocess.Popen``; one waiter thread per child reports its exit."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        linger: float = 120.0,
        marker: JobMarker | None = None,
        cold_note: str = "",
    ) -> None:
        """``cold_note``: why its children start cold, for the journal (``restart.standby``)."""
        self._clock = clock
        self._cold_note = cold_note
        #: Seconds the rest of a group may outlive its leader before SIGKILL.
        self._linger = linger
        #: Finds the ranks that left the child's process group (see the module docstring).
        self._scan = JobScan(marker)
        self._known_members: list[int] = []
        self._members_seen_at = float("-inf")
        self._lock = threading.Lock()
        self._children: dict[int, _Child] = {}
        self._threads: list[threading.Thread] = []

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str | os.PathLike[str],
        log_path: Path,
        pass_fds: Sequence[int],
        on_exit: ExitCallback,
        spared: bool = False,
    ) -> ChildHandle:
        """Start ``argv`` as a session leader writing to ``log_path``; raise OSError on failure.

        ``pass_fds`` stay open in the child on purpose: the run lock's descriptor is
        among them, so an orphaned child keeps the output_dir locked. ``spared``:
        start it spared (see ``spare``) before its exit can be waited for.
        """
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            proc = subprocess.Popen(
                list(argv),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                close_fds=True,
                pass_fds=tuple(pass_fds),
                start_new_session=True,
            )
        finally:
            os.close(log_fd)  # the child has its own copy now
        started_at = self._clock()
        waiter = threading.Thread(
            target=self._wait,
            args=(proc, on_exit),
            name=f"trainwarden-waiter-{proc.pid}",
            # Daemon only so a wedged supervisor can still exit; close() joins it.
            daemon=True,
        )
        child = _Child(proc=proc, waiter=waiter)
        if spared:
            self._scan.spare(proc.pid)
        with self._lock:
            self._children[proc.pid] = child
            self._threads.append(waiter)
        waiter.start()
        log.debug("child_spawned", pid=proc.pid, argv0=argv[0], log=str(log_path))
        return ChildHandle(
            pid=proc.pid, started_at=started_at, log_path=log_path, start_note=self._cold_note
        )

    def _wait(self, proc: subprocess.Popen[bytes], on_exit: ExitCallback) -> None:
        # The only place that reaps this child: nobody else calls wait() or poll().
        returncode = proc.wait()
        self._await_group(proc.pid)
        try:
            on_exit(proc.pid, returncode)
        except Exception:
            log.exception("on_exit_failed", pid=proc.pid, returncode=returncode)
        finally:
            # Forget the child only once its exit is reported, so stop() can
            # promise that on_exit has run when it returns.
            with self._lock:
                child = self._children.pop(proc.pid, None)
            if child is not None:
                child.reported.set()

    def _await_group(self, pgid: int) -> None:
        """Wait for the leader's group to empty: ``linger`` seconds, then SIGKILL it."""
        deadline = self._clock() + self._linger
        while self._scan.members(pgid):
            if self._clock() >= deadline:
                log.warning("group_outlived_leader", pgid=pgid, linger=self._linger)
                self.signal_group(pgid, signal.SIGKILL)
                deadline = self._clock() + _AFTER_KILL_TIMEOUT
                if not self._wait_members_gone(pgid, deadline):
                    log.error("group_survived_sigkill", pid=pgid, members=self._scan.members(pgid))
                return
            time.sleep(_GROUP_POLL)

    def _wait_members_gone(self, pgid: int, deadline: float) -> bool:
        while self._scan.members(pgid):
            if self._clock() >= deadline:
                return False
            time.sleep(_GROUP_POLL)
        return True

    def signal_group(self, pid: int, sig: int) -> None:
        """Send ``sig`` to the group led by ``pid`` and to every process of its job.

        A rank in a session of its own is signalled through its own process
        group, which also reaches what it forked. A group already gone is not
        an error.
        """
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        if self._scan.marker is None:
            return
        own = os.getpgrp()
        groups: set[int] = set()
        for member in self._scan.members(pid):
            try:
                pgid = os.getpgid(member)
            except ProcessLookupError:
                continue
            if pgid == own:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member, sig)  # never our own group
            elif pgid != pid:
                groups.add(pgid)
        for pgid in sorted(groups):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)

    def stop(self, pid: int, grace: float) -> None:
        """Stop the group led by ``pid``: SIGTERM (+SIGCONT), wait ``grace``, then SIGKILL.

        Returns once no live member of the group is left and, for our own child,
        once its exit has been reaped and reported, so callers can rely on the
        ``on_exit`` callback having run.
        """
        self.signal_group(pid, signal.SIGTERM)
        # A SIGSTOPped process keeps SIGTERM pending until it is continued.
        self.signal_group(pid, signal.SIGCONT)
        if self._wait_gone(pid, self._clock() + grace):
            return
        log.warning("stop_escalated", pid=pid, grace=grace)
        self.signal_group(pid, signal.SIGKILL)
        if not self._wait_gone(pid, self._clock() + _AFTER_KILL_TIMEOUT):
            log.error("group_survived_sigkill", pid=pid, members=self._scan.members(pid))

    def _wait_gone(self, pid: int, deadline: float) -> bool:
        with self._lock:
            child = self._children.get(pid)
        while True:
            reported = child is None or child.reported.is_set()
            if reported and not self._scan.members(pid):
                return True
            if self._clock() >= deadline:
                return False
            if child is not None and not reported:
                child.reported.wait(_POLL)
            else:
                time.sleep(_GROUP_POLL)

    def enforce_log_cap(self, path: Path, cap_bytes: int) -> int:
        """Bound the attempt log (see the module function ``enforce_log_cap``)."""
        return enforce_log_cap(path, cap_bytes)

    def process_alive(self, pid: int) -> bool:
        """Say whether ``pid`` exists and is not a zombie."""
        return process_alive(pid)

    def process_stopped(self, pid: int) -> bool:
        """Say whether ``pid``, or a process of its job, is SIGSTOPped or stopped under a tracer.

        A stopped rank stalls the others in their next collective, so the
        heartbeat stops while the leader itself looks fine. Called every tick:
        the job's processes are listed afresh only every few seconds (a rank
        that stops was running at the previous listing).
        """
        if process_stopped(pid):
            return True
        if self._scan.marker is None:
            return False
        now = self._clock()
        if now - self._members_seen_at >= _MEMBERS_MAX_AGE:
            self._known_members = self._scan.members(pid)
            self._members_seen_at = now
        return any(process_stopped(member) for member in self._known_members)

    def job_processes(self, pid: int | None) -> list[int]:
        """List the live processes of the job led by ``pid``: its group and every marked one."""
        return self._scan.members(pid)

    def spare(self, pgid: int, spared: bool = True) -> None:
        """Keep group ``pgid`` out of every job's members, signals and waits (or stop doing so).

        For a process that carries the job's marker without being the job: the
        warm standby, until it takes an attempt. Signals and waits aimed at the
        spared group itself reach only that group.
        """
        self._scan.spare(pgid, spared)

    def running(self) -> list[int]:
        """List the children whose exit has not been reported yet."""
        with self._lock:
            return list(self._children)

    def join(self, timeout: float | None = None) -> bool:
        """Join the waiter threads; return False if one is still waiting on a live child."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            remaining = None if deadline is None else max(0.0, deadline - self._clock())
            thread.join(remaining)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            return not self._threads

    def close(self, grace: float = 5.0) -> None:
        """Stop every child still running (escalating after ``grace``) and join the waiters.

        The supervisor normally has no child left here; one that is left would
        otherwise become an orphan nobody watches.
        """
        for pid in self.running():
            log.warning("child_left_at_close", pid=pid)
            self.stop(pid, grace)
        if not self.join(timeout=_AFTER_KILL_TIMEOUT):
            log.error("waiter_threads_left", count=len(self._threads))
