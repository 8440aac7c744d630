"""Turn what is known about a child's exit into one FailureKind (or success).

The order of the checks is the policy: the most specific evidence wins, and a
supervisor-initiated stop (hang, preemption) is judged by why *we* stopped it,
not by how the child died of it.
"""

from __future__ import annotations

import enum
import signal as signal_mod
from dataclasses import dataclass

from supervisor.core.model import Evidence, FailureKind
from trainer_child.protocol import EXIT_CONFIG, EXIT_OK, EXIT_PREEMPTED, ErrorKind

#: argparse's exit status for a bad command line.
EXIT_USAGE = 2


class Outcome(enum.Enum):
    """How an attempt ended, before any remediation is chosen."""

    SUCCESS = "success"
    PREEMPTED = "preempted"
    FAILED = "failed"


@dataclass(frozen=True)
class Verdict:
    """The classification of one exit, with the evidence in words for the journal."""

    outcome: Outcome
    kind: FailureKind | None
    evidence: str


_HINTS = {
    ErrorKind.CUDA_OOM.value: FailureKind.CUDA_OOM,
    ErrorKind.HOST_OOM.value: FailureKind.HOST_OOM,
    ErrorKind.DISK_FULL.value: FailureKind.DISK_FULL,
    ErrorKind.CONFIG.value: FailureKind.CONFIG,
    ErrorKind.DATA.value: FailureKind.CONFIG,
    ErrorKind.RESUME.value: FailureKind.RESUME,
}


def describe_exit(returncode: int | None, signal: int | None) -> str:
    """Say how a process ended, e.g. ``exit 1`` or ``killed by SIGKILL``."""
    if signal is not None:
        try:
            return f"killed by {signal_mod.Signals(signal).name}"
        except ValueError:
            return f"killed by signal {signal}"
    return f"exit {returncode}"


def classify_exit(
    returncode: int | None,
    signal: int | None,
    evidence: Evidence,
    *,
    stop_reason: FailureKind | None,
    final_complete: bool,
    disk_below_need: bool,
    exit_zero_completes: bool = False,
) -> Verdict:
    """Classify one child exit (docs/architecture.md, "Failure kinds")."""
    how = describe_exit(returncode, signal)
    if signal is None and evidence.worker_signal is not None:
        # Behind a launcher: the rank that died first, not the peer that then
        # failed in a collective (whose error.json may be all there is).
        how += f"; a worker was {describe_exit(None, evidence.worker_signal)}"
    if final_complete:
        # final/ carries its own commit record: the run is done, however the
        # process ended afterwards (a slow exit stopped as a hang, a kill).
        return Verdict(Outcome.SUCCESS, None, how)
    if stop_reason is FailureKind.HANG:
        return Verdict(Outcome.FAILED, FailureKind.HANG, f"heartbeat went stale; {how}")
    if stop_reason is FailureKind.PREEMPTED:
        return Verdict(Outcome.PREEMPTED, FailureKind.PREEMPTED, f"stopped on request; {how}")
    if returncode == EXIT_OK and signal is None:
        if exit_zero_completes:
            return Verdict(Outcome.SUCCESS, None, how)
        return Verdict(
            Outcome.FAILED, FailureKind.CRASH, "exit 0 but final/ has no valid commit record"
        )
    by_status = _by_exit_status(returncode, evidence, how)
    if by_status is not None:
        return by_status
    return _by_evidence(signal, evidence, how, disk_below_need=disk_below_need)


def _error_text(evidence: Evidence) -> str:
    if evidence.error_type:
        return f"; {evidence.error_type}: {evidence.error_message or ''}".rstrip(": ")
    if evidence.error_line:
        return f"; {evidence.error_line}"
    return ""


def _by_exit_status(returncode: int | None, evidence: Evidence, how: str) -> Verdict | None:
    """The contract's reserved exit codes (75, 78), argparse's 2, and error.json's preempted."""
    # A launcher (torchrun, accelerate) exits 1 whatever its workers said; what
    # it reported of them stands in for the child's own exit status.
    worker = f"; worker exit {evidence.worker_exit}" if evidence.worker_exit is not None else ""
    exits = (returncode, evidence.worker_exit)
    if EXIT_PREEMPTED in exits or evidence.error_kind == ErrorKind.PREEMPTED.value:
        # SIGTERM from someone else (a VM shutting down, an operator): the child
        # saved an emergency checkpoint; resuming is not a failure. A launcher
        # in between loses the 75; error.json says it instead.
        return Verdict(
            Outcome.PREEMPTED, FailureKind.PREEMPTED, f"{how}{worker} (emergency checkpoint)"
        )
    if EXIT_CONFIG in exits:
        return Verdict(Outcome.FAILED, FailureKind.CONFIG, f"{how}{worker}{_error_text(evidence)}")
    if returncode == EXIT_USAGE and evidence.log_usage_error:
        # argparse rejected the command line: the same on every attempt.
        return Verdict(Outcome.FAILED, FailureKind.CONFIG, f"{how}; {evidence.error_line}")
    return None


def _by_evidence(
    signal: int | None, evidence: Evidence, how: str, *, disk_below_need: bool
) -> Verdict:
    """The most specific evidence wins: error.json's hint, OOM traces, the log, the disk."""
    error = _error_text(evidence)
    hinted = _HINTS.get(evidence.error_kind or "")
    if hinted is not None:
        return Verdict(Outcome.FAILED, hinted, f"{how}{error}")
    killed_by = signal if signal is not None else evidence.worker_signal
    if killed_by == signal_mod.SIGKILL and (evidence.cgroup_oom_kill or evidence.kernel_oom_kill):
        source = "cgroup oom_kill counter rose" if evidence.cgroup_oom_kill else "kernel log"
        return Verdict(Outcome.FAILED, FailureKind.HOST_OOM, f"{how}; {source}")
    if evidence.log_cuda_oom:
        return Verdict(Outcome.FAILED, FailureKind.CUDA_OOM, f"{how}; log says CUDA out of memory")
    if evidence.log_enospc:
        return Verdict(Outcome.FAILED, FailureKind.DISK_FULL, f"{how}; log says no space left")
    if disk_below_need:
        return Verdict(Outcome.FAILED, FailureKind.DISK_FULL, f"{how}; free space below reserve")
    return Verdict(Outcome.FAILED, FailureKind.CRASH, f"{how}{error}")
