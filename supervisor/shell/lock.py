"""One supervisor per output_dir: an ``flock`` on ``.warden/lock``.

Why ``flock(2)`` and not ``fcntl``/``lockf`` record locks or a pid file:

- An ``flock`` lock belongs to the *open file description*, not to the process.
  Every descriptor that shares that description (``fork``, ``dup``, an fd passed
  through ``exec`` with ``pass_fds``) holds the same lock, and the lock is only
  released when the *last* of them is closed. We hand the descriptor to the
  child, so if the supervisor dies the child still holds the lock; a restarted
  supervisor finds it taken, reads ``state.json`` and recognises the orphan
  instead of starting a second trainer on the same checkpoints.
- POSIX record locks (``fcntl(F_SETLK)``, ``lockf``) belong to the (process,
  file) pair: they are *not* inherited across ``fork``, vanish with the
  supervisor, and are dropped when the process closes *any* descriptor of the
  file (``held_by_someone`` in the same process would silently unlock us).
- A pid file needs stale-pid guessing; a lock dies with its last holder, so a
  crash never leaves a stale lock behind.

Hazards: ``LOCK_UN`` on any descriptor of the description unlocks it for every
holder, the child included, so ``release`` only *closes* ours. On NFS, Linux
emulates ``flock`` with POSIX locks and the inheritance above does not hold;
the pid check in ``state.json`` is then the only orphan guard.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Protocol

import structlog

__all__ = ["Lock", "RunLock", "held_by_someone"]

log = structlog.get_logger()


class Lock(Protocol):
    """The run lock as the loop uses it: take it, hand it to the child, let go."""

    @property
    def held(self) -> bool:
        """Say whether we hold it."""
        ...

    @property
    def fd(self) -> int:
        """Return the locked descriptor, for the child to inherit."""
        ...

    def acquire(self) -> bool:
        """Take it without blocking; False if another process holds it."""
        ...

    def release(self) -> None:
        """Let go of our copy (a child's copy keeps it held)."""
        ...


class RunLock:
    """Hold ``.warden/lock`` exclusively while this supervisor owns the output_dir."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Say whether this object currently holds the lock."""
        return self._fd is not None

    @property
    def fd(self) -> int:
        """Return the locked descriptor, to pass to the child (it is inheritable)."""
        if self._fd is None:
            raise RuntimeError(f"{self.path} is not locked by this supervisor")
        return self._fd

    def acquire(self) -> bool:
        """Take the lock without blocking; return False if someone else holds it.

        Someone may be another supervisor or an orphaned child of a dead one.
        """
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        # Inheritable so a child started with pass_fds (or a plain fork) keeps it.
        os.set_inheritable(fd, True)
        # The pid is for humans reading the file; the lock itself is the truth.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        log.info("lock_acquired", path=str(self.path))
        return True

    def release(self) -> None:
        """Close our descriptor; the lock is freed once the child's copy is closed too.

        Never ``LOCK_UN``: that would unlock the shared description under a child
        that is still running and let a second supervisor in.
        """
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def held_by_someone(path: str | os.PathLike[str]) -> bool:
    """Say whether any process holds the lock at ``path``, this one included.

    Probes with a fresh open file description, which conflicts with every other
    description, even one this process holds.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    else:
        # Closing drops the probe's lock; no LOCK_UN needed on a private description.
        return False
    finally:
        os.close(fd)
