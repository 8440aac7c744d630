"""Turn any exception into the ``kind`` hint of ``.warden/error.json``, in one place.

The supervisor's remedy depends on the kind (halve the micro-batch, prune the disk,
quarantine a checkpoint, give up), so every rule that maps an exception to a kind
lives in ``classify`` and nowhere else.

Exceptions the child raises on purpose::

    ChildError                  base; never raised itself
    ├── ConfigError             the job cannot work as written  -> config, exit 78
    │   └── FailpointError      (failpoints.py) a malformed TRAINWARDEN_FAILPOINTS
    ├── DataError               dataset missing, unreadable, no such column -> data, exit 78
    └── ResumeError             the checkpoint to resume from is unusable -> resume, exit 1

Everything else (torch, HF, the OS) is classified by evidence in the exception
chain: type, errno, then message text, because torch often flattens an OSError
into a RuntimeError that only keeps the words. The Hugging Face libraries' own
"no such model / dataset" errors count as config and data errors: an unmodified
script (``inject_callback``) raises those instead of ours.

This module imports only the standard library and ``protocol`` so that even a
failure during ``import torch`` is reported.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator

from trainer_child.protocol import (
    CUDA_OOM_MARKERS,
    DISK_FULL_MARKERS,
    EXIT_CONFIG,
    HOST_OOM_MARKERS,
    ErrorKind,
    ErrorReport,
    Layout,
    Phase,
    atomic_write_model,
    mentions,
)

__all__ = [
    "EXIT_CRASH",
    "ChildError",
    "ConfigError",
    "DataError",
    "ErrorReserve",
    "ResumeError",
    "build_report",
    "classify",
    "exception_chain",
    "exit_code_for",
    "find_errno",
    "write_report",
]

log = logging.getLogger("trainer_child")

#: Exit status for every failure that a restart might fix.
EXIT_CRASH = 1

#: error.json keeps the end of the traceback (where the cause is) within this size.
MAX_TRACEBACK_CHARS = 32_000

# huggingface_hub / datasets exceptions (by class name: neither may be importable)
# that mean the id or path in the command is wrong, not that the network is.
_HF_CONFIG_ERRORS = frozenset(
    {"HFValidationError", "RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError"}
)
_HF_DATA_ERRORS = frozenset({"DatasetNotFoundError", "DataFilesNotFoundError"})


class ChildError(Exception):
    """Base of the errors the training child raises on purpose."""


class ConfigError(ChildError):
    """The job as written cannot work; restarting will not help (exit 78)."""


class DataError(ChildError):
    """The dataset is missing, unreadable or lacks the text column (exit 78)."""


class ResumeError(ChildError):
    """The checkpoint to resume from is missing or unreadable."""


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """Yield ``exc`` and every exception behind it (__cause__, then __context__)."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                pending.append(linked)


def find_errno(exc: BaseException) -> int | None:
    """Return the first errno found along the exception chain."""
    for link in exception_chain(exc):
        code = getattr(link, "errno", None)
        if isinstance(code, int):
            return code
    return None


def _mentions(exc: BaseException, markers: tuple[str, ...]) -> bool:
    if isinstance(exc, ChildError):
        # Our own messages may quote such words (a failpoint named "enospc");
        # the physical evidence, if any, is in the exception they wrap.
        return False
    return mentions(str(exc), markers)


def _is_cuda_oom(exc: BaseException) -> bool:
    # Look the class up lazily: torch may not be importable (or imported) at all.
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if isinstance(oom_type, type) and isinstance(exc, oom_type):
        return True
    return _mentions(exc, CUDA_OOM_MARKERS)


def _is_disk_full(exc: BaseException) -> bool:
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return True
    return _mentions(exc, DISK_FULL_MARKERS)


def _is_host_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or _mentions(exc, HOST_OOM_MARKERS)


def classify(exc: BaseException, *, loading_resume: bool = False) -> ErrorKind:
    """Return the kind hint for ``exc``.

    Physical causes win over everything else: an OOM or a full disk is what the
    supervisor can remedy, even when HF wrapped it in a ValueError. Then our own
    config/data errors (never retried). ``loading_resume`` says the failure came
    while the trainer was loading the resume checkpoint, before the first step
    began: only then is the checkpoint itself suspected.
    """
    chain = list(exception_chain(exc))
    if any(_is_cuda_oom(link) for link in chain):
        return ErrorKind.CUDA_OOM
    if any(_is_disk_full(link) for link in chain):
        return ErrorKind.DISK_FULL
    if any(_is_host_oom(link) for link in chain):
        return ErrorKind.HOST_OOM
    for link in chain:
        if isinstance(link, ConfigError):
            return ErrorKind.CONFIG
        if isinstance(link, DataError):
            return ErrorKind.DATA
        if isinstance(link, ResumeError):
            return ErrorKind.RESUME
    for link in chain:
        names = {cls.__name__ for cls in type(link).__mro__}
        if names & _HF_CONFIG_ERRORS:
            return ErrorKind.CONFIG
        if names & _HF_DATA_ERRORS:
            return ErrorKind.DATA
    if loading_resume:
        return ErrorKind.RESUME
    return ErrorKind.CRASH


def exit_code_for(kind: ErrorKind) -> int:
    """Return the child's exit status: 78 for what a restart cannot fix, else 1."""
    return EXIT_CONFIG if kind in (ErrorKind.CONFIG, ErrorKind.DATA) else EXIT_CRASH


def build_report(
    exc: BaseException,
    kind: ErrorKind,
    *,
    step: int | None,
    phase: Phase | None,
    resume_from: str | None,
    attempt: int | None,
) -> ErrorReport:
    """Describe ``exc`` for the supervisor (the traceback keeps its last 32 kB)."""
    formatted = "".join(traceback.format_exception(exc))
    if len(formatted) > MAX_TRACEBACK_CHARS:
        formatted = "...\n" + formatted[-MAX_TRACEBACK_CHARS:]
    return ErrorReport(
        type=f"{type(exc).__module__}.{type(exc).__qualname__}",
        message=str(exc)[:4000],
        errno=find_errno(exc),
        kind=kind,
        step=step,
        phase=phase,
        resume_from=resume_from,
        traceback=formatted,
        pid=os.getpid(),
        attempt=attempt,
        wall_time=time.time(),
    )


class ErrorReserve:
    """Hold a little disk space so error.json can be written on a full disk.

    error.json lives in ``output_dir/.warden``, on the very filesystem a failed
    checkpoint just filled. Releasing this file right before writing the report
    frees enough blocks for it.
    """

    SIZE = 64 * 1024

    def __init__(self, layout: Layout, *, rank: int = 0) -> None:
        # One file per rank: ranks start and exit at their own moments, and one
        # rank's release must not take the space another rank is counting on.
        suffix = f".{rank}" if rank else ""
        self.path = layout.warden / f"error.reserve{suffix}"

    def hold(self) -> None:
        """Allocate the reserve (real bytes, not a sparse hole, so blocks are taken)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "wb") as handle:
            handle.write(b"\0" * self.SIZE)
            handle.flush()
            os.fsync(handle.fileno())

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def write_report(layout: Layout, report: ErrorReport) -> bool:
    """Write ``.warden/error.json`` durably; return False (and say so) if even that fails.

    The reserve is released first. A failure here must not mask the original
    error, so it is only logged (stderr) and the exit status still tells the kind.
    """
    ErrorReserve(layout).release()
    try:
        layout.warden.mkdir(parents=True, exist_ok=True)
        atomic_write_model(layout.error, report)
    except OSError:
        log.exception("error_report_unwritable path=%s", layout.error)
        return False
    return True
