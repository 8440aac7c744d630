"""Gather what is known about why a child ended: error.json, its log's tail, OOM counters.

The one place the supervisor collects exit evidence; ``core/classify.py`` then
weighs it. Three sources, most specific first:

1. ``.warden/error.json``, the child's own account (kind hint, exception, step),
   taken only if it names this child (its pid or its attempt): one left by an
   earlier attempt would pin that failure on this one. It is removed before each
   launch (``forget``).
2. The tail of the attempt log, searched for the words of ``protocol``'s
   ``CUDA_OOM_MARKERS`` and ``DISK_FULL_MARKERS``, the same words the child's
   own classifier uses; for a child that died without writing error.json (a C++
   abort, ``os._exit``). The supervisor's own notes in that log are skipped: a
   path in them must not read as evidence.
3. For a SIGKILL, the OOM killer's traces (``oom.py``): the memory cgroup's kill
   counter, snapshotted at spawn (``watch``), else the kernel log. Behind a
   launcher (``accelerate launch``, ``torchrun``) the child itself exits 1; the
   signal that killed the training process is read from the launcher's report
   in the log (``launcher_reported_signal``).

Besides, the error's own last line (``error_line``): what the user needs to
read, and how two failures are recognised as the same one.
"""

from __future__ import annotations

import os
import re
import signal as signal_mod
from pathlib import Path
from typing import Protocol

from supervisor.core.model import Evidence
from supervisor.shell.oom import OomEvidence, OomWatch, OomWatchFactory
from supervisor.shell.rundir import NOTE_PREFIX
from trainer_child.protocol import (
    CUDA_OOM_MARKERS,
    DISK_FULL_MARKERS,
    ErrorReport,
    Layout,
    mentions,
    read_model,
)

__all__ = [
    "LOG_EVIDENCE_BYTES",
    "EvidenceSource",
    "FileEvidence",
    "last_error_line",
    "launcher_reported_exit",
    "launcher_reported_signal",
    "log_tail",
]

#: How much of the attempt log's tail is searched for failure evidence.
LOG_EVIDENCE_BYTES = 256 * 1024
#: error.json's message is cut to this length for the journal.
MESSAGE_CHARS = 500


class EvidenceSource(Protocol):
    """Where the loop learns why a child ended; one child at a time."""

    def forget(self) -> None:
        """Drop the previous attempt's error.json before the next attempt starts."""
        ...

    def watch(self, pid: int) -> None:
        """Snapshot what must be known at spawn (OOM counters) for the child ``pid``."""
        ...

    def gather(self, pid: int, attempt: int, signal: int | None) -> Evidence:
        """Collect the evidence about child ``pid`` of ``attempt``, which just ended."""
        ...


def log_tail(path: Path, size: int = LOG_EVIDENCE_BYTES) -> str:
    """Return the last ``size`` bytes of a log as text, without the supervisor's own notes."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - size))
            raw = handle.read()
    except OSError:
        return ""
    lines = raw.decode("utf-8", "replace").splitlines()
    return "\n".join(line for line in lines if not line.startswith(NOTE_PREFIX))


class FileEvidence:
    """The real source: files under ``.warden/`` and the kernel's OOM counters."""

    def __init__(self, layout: Layout, oom_watch: OomWatchFactory = OomWatch) -> None:
        self._layout = layout
        self._oom_watch = oom_watch
        self._watched: OomEvidence | None = None

    def forget(self) -> None:
        """Remove error.json (absent is fine)."""
        self._layout.error.unlink(missing_ok=True)

    def watch(self, pid: int) -> None:
        """Snapshot the child's OOM counters, while /proc/PID still exists."""
        self._watched = self._oom_watch(pid)

    def gather(self, pid: int, attempt: int, signal: int | None) -> Evidence:
        """Read error.json (if it is this child's), the log tail and, after SIGKILL, OOM traces."""
        report = read_model(self._layout.error, ErrorReport)
        if report is not None and report.pid != pid and report.attempt != attempt:
            report = None  # left by an earlier attempt
        tail = log_tail(self._layout.attempt_log(attempt))
        worker_signal = launcher_reported_signal(tail)
        worker_exit = launcher_reported_exit(tail) if worker_signal is None else None
        cgroup_oom, kernel_oom = self._oom_killed(signal if signal is not None else worker_signal)
        line = report_line(report) if report else last_error_line(tail)
        if worker_signal is not None and report is None:
            line = None  # "died with SIGKILL" names no error, however often it recurs
        return Evidence(
            error_kind=report.kind.value if report else None,
            error_type=report.type if report else None,
            error_message=report.message[:MESSAGE_CHARS] if report else None,
            error_errno=report.errno if report else None,
            error_step=report.step if report else None,
            error_line=line,
            log_usage_error=bool(line and USAGE_ERROR_RE.match(line)),
            worker_signal=worker_signal,
            worker_exit=worker_exit,
            log_cuda_oom=mentions(tail, CUDA_OOM_MARKERS),
            log_enospc=mentions(tail, DISK_FULL_MARKERS),
            cgroup_oom_kill=cgroup_oom,
            kernel_oom_kill=kernel_oom,
        )

    def _oom_killed(self, signal: int | None) -> tuple[bool, bool]:
        """(cgroup counter rose, kernel log names the child), asked only for a SIGKILL."""
        watched = self._watched
        if watched is None or signal != signal_mod.SIGKILL:
            return False, False
        if watched.oom_killed_since():
            return True, False
        return False, watched.kernel_log_oom()


#: argparse's last words: "sft.py: error: argument --max_steps: invalid int value: 'x'".
USAGE_ERROR_RE = re.compile(r"^[\w.\-]+: error: ")
_EXCEPTION_LINE_RE = re.compile(r"^[A-Za-z_][\w.]*(?:: |$)")
#: Longest error line kept: enough for a path and a reason, short enough for a status line.
MAX_ERROR_LINE = 300
#: How launchers report the signal that killed the process they started:
#: ``accelerate launch`` (subprocess.CalledProcessError) and torchrun's agent.
_LAUNCHER_SIGNAL_RES = (
    re.compile(r"died with <Signals\.SIG\w+: (\d+)>"),
    re.compile(r"Signal (\d+) \(SIG\w+\) received by PID"),
    re.compile(r"exitcode\s*:\s*-(\d+)"),
)


def last_error_line(tail: str) -> str | None:
    """Return the line that names the child's fatal error in its log tail, if there is one.

    Python ends an uncaught exception with its traceback, whose first unindented
    line after the frames is ``Type: message``; argparse ends with ``prog: error:
    ...``. A process killed by a signal prints neither, and gets None: nothing
    to recognise it by.
    """
    lines = tail.splitlines()
    start = max((i for i, text in enumerate(lines) if text.startswith("Traceback (")), default=None)
    if start is not None:
        for text in lines[start + 1 :]:
            if text and not text[0].isspace() and _EXCEPTION_LINE_RE.match(text):
                return text.strip()[:MAX_ERROR_LINE]
    for text in reversed(lines[-5:]):
        if USAGE_ERROR_RE.match(text):
            return text.strip()[:MAX_ERROR_LINE]
    return None


#: A launcher's account of a worker's exit status: torchrun's failure summary
#: (its root cause comes last) and ``accelerate launch``'s CalledProcessError.
_LAUNCHER_EXIT_RES = (
    re.compile(r"exitcode\s*:\s*(-?\d+)"),
    re.compile(r"returned non-zero exit status (\d+)"),
)


def launcher_reported_exit(tail: str) -> int | None:
    """Return the exit status a launcher says its (first failed) worker ended with.

    Negative values (a signal) are ``launcher_reported_signal``'s; None then.
    """
    found: tuple[int, int] | None = None
    for pattern in _LAUNCHER_EXIT_RES:
        for match in pattern.finditer(tail):
            if found is None or match.start() > found[0]:
                found = (match.start(), int(match.group(1)))
    return found[1] if found is not None and found[1] >= 0 else None


def launcher_reported_signal(tail: str) -> int | None:
    """Return the signal a launcher says killed its worker, from the log's last words."""
    found: tuple[int, int] | None = None
    for pattern in _LAUNCHER_SIGNAL_RES:
        for match in pattern.finditer(tail):
            if found is None or match.start() > found[0]:
                found = (match.start(), int(match.group(1)))
    return found[1] if found is not None else None


def report_line(report: ErrorReport) -> str:
    """One line for an error.json: ``OSError: the first line of its message``."""
    first = report.message.strip().splitlines()[0] if report.message.strip() else ""
    name = report.type.rsplit(".", 1)[-1]
    return f"{name}: {first}"[:MAX_ERROR_LINE] if first else name
