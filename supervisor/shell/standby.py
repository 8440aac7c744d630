"""A launcher that keeps a warm standby child and starts the next attempt in it.

``restart.standby: auto`` wraps the ``ProcessLauncher`` in a ``WarmLauncher``;
the loop sees the same ``Launcher`` seam. On ``spawn`` it asks
``core/standby.py`` how a standby would run the attempt (the built-in job, or a
``command:`` that is ``python -m module`` / ``python script.py``) and whether
the standby it holds was prepared for exactly that (its key). If so, it sends
the attempt over the standby's socket and the standby becomes the child in
well under a second; otherwise the attempt starts cold, as before. Either way
it then prepares the next standby, when host memory holds one comfortably.
``ChildHandle.start`` and ``start_note`` say which happened and why; the
journal's ``child_started`` carries them.

The protocol (``trainer_child/standby.py`` is the other side), over an
``AF_UNIX``/``SOCK_SEQPACKET`` socketpair, one JSON message each way at most:

1. spawn: ``python [options] -m trainer_child.standby --fd N --parent PID`` in
   its own session, its log ``.warden/logs/standby.log``, holding one end of
   the socket and *not* the run lock; then the recipe (``StandbyRecipe``).
2. go: the attempt (``StandbyGo``) with, as SCM_RIGHTS, the attempt log's
   descriptor and the descriptors a cold child would inherit (the run lock).
   The lock's open file description is shared, so the flock is the same one
   the supervisor holds: a warm child holds the output_dir exactly like a cold
   one, and an idle standby holds nothing.
3. discard: SIGKILL (an idle standby has nothing to save).

Hazards handled here:

- The standby dies with the supervisor through ``PR_SET_PDEATHSIG``, which the
  kernel fires when the *thread* that forked it exits: standbys are started
  only from ``spawn``, i.e. from the loop's own thread, never from a waiter.
- The standby is reaped by the inner launcher's waiter thread. Until go its
  exit is the standby's business (noted, and after two deaths of one recipe no
  more standbys for it); from go on it is the attempt's and goes to the
  attempt's ``on_exit``. A death racing with go waits for the outcome of the
  send, so exactly one of the two hears of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import structlog

from supervisor.core.standby import Cold, Recipe, memory_shortfall, recipe_for
from supervisor.shell.launcher import ChildHandle, ExitCallback, ProcessLauncher
from supervisor.shell.oom import SYSFS_CGROUP, cgroup_folders, cgroup_of, read_field
from trainer_child.protocol import (
    ENV_ATTEMPT,
    STANDBY_MODULE,
    JobFile,
    Layout,
    StandbyFile,
    StandbyGo,
    StandbyRecipe,
    read_model,
)

__all__ = ["WarmLauncher", "available_memory"]

log = structlog.get_logger()

#: What a standby is expected to hold before one was measured: the imports of
#: torch, transformers, trl and peft on a CPU host (~0.5 GB measured) plus the
#: model's weights on disk.
IMPORTS_BYTES = 700 << 20
#: Deaths of idle standbys of one recipe after which it gets no more.
MAX_IDLE_DEATHS = 2
STANDBY_LOG_CAP = 1 << 20
#: How long ``close`` waits for a killed standby to be reaped.
CLOSE_WAIT = 10.0
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def available_memory(pid: int | None = None) -> int | None:
    """Bytes a new process may still use: MemAvailable, or less if a memory cgroup says so.

    A cgroup's usage counts its page cache; the inactive part of it (files read
    once: the model, old checkpoints) is reclaimable and counts as available,
    as MemAvailable counts it for the host.
    """
    available: int | None = psutil.virtual_memory().available
    ref = cgroup_of(pid or os.getpid())
    if ref is None:
        return available
    v2 = ref.version == 2
    limit_name, usage_name, cache_name = (
        ("memory.max", "memory.current", "inactive_file")
        if v2
        else ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    )
    base = Path(SYSFS_CGROUP) if v2 else Path(SYSFS_CGROUP) / "memory"
    for folder in cgroup_folders(base, ref.path):
        try:
            limit_text = (folder / limit_name).read_text().strip()
            usage = int((folder / usage_name).read_text())
        except (OSError, ValueError):
            continue
        if limit_text.isdigit() and int(limit_text) < 1 << 60:
            reclaimable = read_field(folder / "memory.stat", cache_name) or 0
            headroom = max(int(limit_text) - usage + reclaimable, 0)
            available = headroom if available is None else min(available, headroom)
        break
    return available


def _weights_bytes(job: JobFile) -> int:
    """Bytes of the job's model weights on disk, when the model is a local folder."""
    folder = Path(os.path.expanduser(job.train.model))
    if not folder.is_dir():
        return 0
    return sum(
        p.stat().st_size for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()
    )


@dataclass
class _Standby:
    """One standby process and what became of it."""

    pid: int
    recipe: Recipe
    sock: socket.socket
    started_at: float
    #: Set (under the lock) when its exit has been seen.
    exited: bool = False
    #: Set while go is being sent; the waiter waits for ``decided`` then.
    going: bool = False
    decided: threading.Event = field(default_factory=threading.Event)
    #: The attempt's on_exit once go has been sent.
    handed: ExitCallback | None = None
    discarded: bool = False


class WarmLauncher:
    """A ``Launcher`` that starts an attempt in a warm standby when one matches it."""

    def __init__(
        self,
        inner: ProcessLauncher,
        layout: Layout,
        *,
        python: str = sys.executable,
        memory: Callable[[], int | None] = available_memory,
        clock: Callable[[], float] = time.monotonic,
        imports: tuple[str, ...] | None = None,
    ) -> None:
        """``imports``: what a ``command:`` job's standby imports ahead (None: the ML stack)."""
        self._inner = inner
        self._layout = layout
        self._python = python
        self._memory = memory
        self._clock = clock
        self._imports = imports
        self._lock = threading.Lock()
        self._standby: _Standby | None = None
        #: Every standby started whose exit has not been seen, by pid.
        self._known: dict[int, _Standby] = {}
        self._deaths: dict[str, int] = {}
        #: RSS of the last standby handed over, per recipe kind: the next one's size.
        self._measured: dict[str, int] = {}
        #: Why no standby is kept now ("" while one is).
        self.off_reason = ""

    # --- the seam -------------------------------------------------------------------

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
        """Start the attempt in the standby if it was prepared for it, else cold; then prepare."""
        recipe = recipe_for(
            argv, env, os.fspath(cwd), python=self._python, job_text=self._job_text(argv)
        )
        handle: ChildHandle | None = None
        note = recipe.reason if isinstance(recipe, Cold) else ""
        if isinstance(recipe, Recipe):
            handle, note = self._go(
                recipe,
                argv=argv,
                env=env,
                cwd=cwd,
                log_path=log_path,
                pass_fds=pass_fds,
                on_exit=on_exit,
            )
        if handle is None:
            # A standby we cannot use only holds memory the cold start needs.
            self._discard()
            cold = self._inner.spawn(
                argv, env=env, cwd=cwd, log_path=log_path, pass_fds=pass_fds, on_exit=on_exit
            )
            handle = dataclasses.replace(cold, start="cold", start_note=note)
        if isinstance(recipe, Recipe):
            self._prepare(recipe, env, cwd)
        log.info("attempt_started", pid=handle.pid, start=handle.start, why=handle.start_note)
        return handle

    def signal_group(self, pid: int, sig: int) -> None:
        """See ``ProcessLauncher.signal_group``."""
        self._inner.signal_group(pid, sig)

    def stop(self, pid: int, grace: float) -> None:
        """See ``ProcessLauncher.stop``."""
        self._inner.stop(pid, grace)

    def enforce_log_cap(self, path: Path, cap_bytes: int) -> int:
        """See ``ProcessLauncher.enforce_log_cap``."""
        return self._inner.enforce_log_cap(path, cap_bytes)

    def process_alive(self, pid: int) -> bool:
        """See ``ProcessLauncher.process_alive``."""
        return self._inner.process_alive(pid)

    def process_stopped(self, pid: int) -> bool:
        """See ``ProcessLauncher.process_stopped``."""
        return self._inner.process_stopped(pid)

    def job_processes(self, pid: int | None) -> list[int]:
        """See ``ProcessLauncher.job_processes`` (an idle standby is never among them)."""
        return self._inner.job_processes(pid)

    def close(self) -> None:
        """Kill the idle standby, then stop any child left and join every waiter."""
        self._discard()
        deadline = self._clock() + CLOSE_WAIT
        while self._idle_known() and self._clock() < deadline:
            time.sleep(0.01)  # its waiter reaps it: SIGKILL takes a moment for a big one
        self._inner.close()

    def _idle_known(self) -> bool:
        with self._lock:
            return any(s.handed is None for s in self._known.values())

    @property
    def standby_pid(self) -> int | None:
        """The idle standby's pid, if one is kept."""
        standby = self._standby
        return standby.pid if standby is not None else None

    # --- go ---------------------------------------------------------------------------

    def _go(
        self,
        recipe: Recipe,
        *,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str | os.PathLike[str],
        log_path: Path,
        pass_fds: Sequence[int],
        on_exit: ExitCallback,
    ) -> tuple[ChildHandle | None, str]:
        """Hand the attempt to the standby; return its handle, or None and why not."""
        standby = self._standby
        if standby is None:
            return None, self.off_reason or "no standby yet"
        with self._lock:
            if standby.exited:
                self._standby = None
                standby.sock.close()
                return None, "the standby had exited"
            if standby.recipe.key != recipe.key:
                return None, "the standby was prepared for other settings (overrides, environment)"
            standby.going = True
        ready = self._ready_note(standby)
        self._measure(standby)
        message = StandbyGo(
            argv=tuple(argv),
            args=recipe.args,
            env=dict(env),
            cwd=os.fspath(cwd),
            attempt=int(env.get(ENV_ATTEMPT, "0") or 0),
        )
        error = self._send_go(standby, message, log_path, pass_fds)
        with self._lock:
            standby.handed = None if error else on_exit
            standby.going = False
        standby.decided.set()
        self._standby = None
        standby.sock.close()
        if error:
            self._kill(standby)
            return None, f"the standby could not take the attempt ({error})"
        # From here on it is the job: its group is the attempt's.
        self._inner.spare(standby.pid, spared=False)
        handle = ChildHandle(
            pid=standby.pid, started_at=self._clock(), log_path=log_path, start="warm"
        )
        return dataclasses.replace(handle, start_note=ready), ready

    def _send_go(
        self, standby: _Standby, message: StandbyGo, log_path: Path, pass_fds: Sequence[int]
    ) -> str:
        """Send go with the log and inherited descriptors; return "" or what went wrong."""
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            return f"log: {exc}"
        try:
            payload = message.model_dump_json().encode()
            socket.send_fds(standby.sock, [payload], [log_fd, *pass_fds])
        except OSError as exc:
            return str(exc)
        finally:
            os.close(log_fd)
        return ""

    def _account(self, standby: _Standby) -> StandbyFile | None:
        record = read_model(self._layout.standby, StandbyFile)
        return record if record is not None and record.pid == standby.pid else None

    def _measure(self, standby: _Standby) -> None:
        """Keep a ready standby's own RSS figure: the next one's expected size."""
        record = self._account(standby)
        if record is not None and record.state == "ready" and record.rss_bytes:
            self._measured[standby.recipe.kind] = record.rss_bytes

    def _ready_note(self, standby: _Standby) -> str:
        age = self._clock() - standby.started_at
        record = self._account(standby)
        state = "ready" if record is not None and record.state == "ready" else "still preparing"
        return f"standby {standby.pid} ({standby.recipe.what}), {state}, started {age:.1f}s before"

    # --- preparing the next one -------------------------------------------------------------

    def _prepare(self, recipe: Recipe, env: Mapping[str, str], cwd: str | os.PathLike[str]) -> None:
        """Start a standby for ``recipe`` unless one is kept, it keeps dying, or memory is short."""
        if self._standby is not None:
            return
        with self._lock:
            deaths = self._deaths.get(recipe.key, 0)
        if deaths >= MAX_IDLE_DEATHS:
            self._off(
                f"standbys for {recipe.what} died {MAX_IDLE_DEATHS} times while idle "
                f"(see {self._layout.standby_log})"
            )
            return
        expected = self._expected_bytes(recipe)
        short = memory_shortfall(self._memory(), expected)
        if short is not None:
            self._off(f"no standby: {short}")
            return
        try:
            self._standby = self._start(recipe, env, cwd)
        except OSError as exc:
            self._off(f"the standby could not be started: {exc}")
            return
        self.off_reason = ""

    def _off(self, reason: str) -> None:
        if reason != self.off_reason:
            log.info("standby_off", reason=reason)
        self.off_reason = reason

    def _expected_bytes(self, recipe: Recipe) -> int:
        if recipe.kind in self._measured:
            return self._measured[recipe.kind]
        job = self._job(recipe)
        return IMPORTS_BYTES + (_weights_bytes(job) if job is not None else 0)

    def _start(
        self, recipe: Recipe, env: Mapping[str, str], cwd: str | os.PathLike[str]
    ) -> _Standby:
        """Spawn a standby process and send it its recipe."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._inner.enforce_log_cap(self._layout.standby_log, STANDBY_LOG_CAP)
        argv = [
            *recipe.interpreter,
            "-m",
            STANDBY_MODULE,
            "--fd",
            str(theirs.fileno()),
            "--parent",
            str(os.getpid()),
        ]
        try:
            handle = self._inner.spawn(
                argv,
                env=env,
                cwd=cwd,
                log_path=self._layout.standby_log,
                pass_fds=(theirs.fileno(),),
                on_exit=self._exited,
                # It carries the job's marker (its environment is the attempt's)
                # but is not the job until go: no signal, wait or stray count of
                # the job's may reach it, nor the wait for its own exit the job.
                spared=True,
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        standby = _Standby(pid=handle.pid, recipe=recipe, sock=ours, started_at=self._clock())
        with self._lock:
            self._known[standby.pid] = standby
        first = StandbyRecipe(
            kind=recipe.kind,
            target=recipe.target,
            job=self._job(recipe),
            output_dir=str(self._layout.output_dir),
            key=recipe.key,
            imports=self._imports,
        )
        try:
            ours.send(first.model_dump_json().encode())
        except OSError as exc:
            self._kill(standby)
            raise OSError(f"recipe not delivered: {exc}") from exc
        log.info("standby_started", pid=handle.pid, what=recipe.what, key=recipe.key)
        return standby

    def _job(self, recipe: Recipe) -> JobFile | None:
        if recipe.kind != "builtin":
            return None
        text = self._job_text(["", "", "", *recipe.args])
        return JobFile.model_validate_json(text) if text else None

    @staticmethod
    def _job_text(argv: Sequence[str]) -> str:
        """The built-in job's job file, read now: its train spec and overrides shape the key."""
        words = list(argv)
        if "--job" not in words[3:]:
            return ""
        index = words.index("--job", 3)
        with contextlib.suppress(OSError, IndexError):
            return Path(words[index + 1]).read_text()
        return ""

    # --- ends -------------------------------------------------------------------------

    def _exited(self, pid: int, returncode: int) -> None:
        """The waiter's report for a standby: the attempt's exit after go, else its own."""
        with self._lock:
            standby = self._known.pop(pid, None)
            if standby is None:
                return
            standby.exited = True
            going = standby.going
        if going:
            standby.decided.wait()
        with self._lock:
            handed, discarded = standby.handed, standby.discarded
        if handed is not None:
            handed(pid, returncode)
            return
        self._inner.spare(pid, spared=False)  # its pid may be reused
        if not discarded:
            key = standby.recipe.key
            with self._lock:
                self._deaths[key] = self._deaths.get(key, 0) + 1
            log.warning(
                "standby_died", pid=pid, returncode=returncode, log=str(self._layout.standby_log)
            )

    def _discard(self) -> None:
        """Let the idle standby go (SIGKILL: it holds nothing worth saving)."""
        standby, self._standby = self._standby, None
        if standby is not None:
            self._kill(standby)

    def _kill(self, standby: _Standby) -> None:
        with self._lock:
            standby.discarded = True
            gone = standby.exited
        with contextlib.suppress(OSError):
            standby.sock.close()
        if not gone:
            # Reaped already: its pid (no longer spared) may be anyone's now.
            self._inner.signal_group(standby.pid, signal.SIGKILL)
