"""FileEvidence on real files: this child's error.json only, log words, OOM traces on SIGKILL."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from supervisor.shell.evidence import FileEvidence, log_tail
from supervisor.shell.rundir import FileRunDir
from supervisor.shell.testing import FakeOomWatch
from trainer_child.protocol import ErrorKind, ErrorReport, Layout, atomic_write_model


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    result = Layout(tmp_path / "out")
    FileRunDir(result).prepare()
    return result


def report(pid: int, attempt: int, kind: ErrorKind = ErrorKind.CUDA_OOM) -> ErrorReport:
    return ErrorReport(
        type="torch.OutOfMemoryError",
        message="CUDA out of memory. " + "x" * 1000,
        kind=kind,
        step=3,
        pid=pid,
        attempt=attempt,
    )


def test_error_report_of_this_child_is_read_and_cut(layout: Layout) -> None:
    """error.json naming this pid (or attempt) gives the kind, type, step and a short message."""
    atomic_write_model(layout.error, report(pid=11, attempt=2))
    found = FileEvidence(layout).gather(11, 2, None)
    assert found.error_kind == "cuda_oom"
    assert found.error_type == "torch.OutOfMemoryError"
    assert found.error_step == 3
    assert found.error_message is not None
    assert len(found.error_message) == 500
    # The attempt alone identifies it too: under torchrun a rank, not our pid, writes it.
    assert FileEvidence(layout).gather(99, 2, None).error_kind == "cuda_oom"


def test_error_report_of_an_earlier_attempt_is_ignored_and_forget_removes_it(
    layout: Layout,
) -> None:
    """A stale error.json (other pid, other attempt) is not this failure's evidence."""
    atomic_write_model(layout.error, report(pid=11, attempt=1))
    evidence = FileEvidence(layout)
    assert evidence.gather(12, 2, None).error_kind is None
    evidence.forget()
    assert not layout.error.exists()
    evidence.forget()  # absent is fine


@pytest.mark.parametrize(
    ("line", "cuda", "enospc"),
    [
        ("RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate", 1, 0),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB", 1, 0),
        ("OSError: [Errno 28] No space left on device", 0, 1),
        ("terminate called: basic_ios::clear: iostream error", 0, 1),
        ("loss 0.25 step 12", 0, 0),
    ],
)
def test_log_words_are_the_protocols(layout: Layout, line: str, cuda: int, enospc: int) -> None:
    """The log tail is searched for the same markers the child's classifier uses."""
    layout.attempt_log(3).write_text(f"step 1\n{line}\n")
    found = FileEvidence(layout).gather(5, 3, None)
    assert (found.log_cuda_oom, found.log_enospc) == (bool(cuda), bool(enospc))


def test_the_supervisors_own_notes_are_not_evidence(layout: Layout) -> None:
    """A path in our attempt header (a run dir named enospc-repro) does not read as ENOSPC."""
    run_dir = FileRunDir(layout)
    run_dir.note(1, "attempt 1: resume_from=/data/enospc-repro/checkpoint-4 argv=['python']")
    with layout.attempt_log(1).open("a") as log:
        log.write("Traceback (most recent call last):\nValueError: bad\n")
    assert not FileEvidence(layout).gather(5, 1, None).log_enospc
    assert "ValueError: bad" in log_tail(layout.attempt_log(1))
    assert "enospc-repro" not in log_tail(layout.attempt_log(1))


def test_oom_traces_are_asked_only_after_sigkill(layout: Layout) -> None:
    """The cgroup counter wins; the kernel log is the fallback; any other end asks neither."""
    watches: dict[int, FakeOomWatch] = {}

    def make(pid: int) -> FakeOomWatch:
        watches[pid] = FakeOomWatch(pid, cgroup_killed=True, kmsg_killed=True)
        return watches[pid]

    evidence = FileEvidence(layout, oom_watch=make)
    evidence.watch(21)
    assert watches[21].pid == 21
    killed = evidence.gather(21, 1, signal.SIGKILL)
    assert (killed.cgroup_oom_kill, killed.kernel_oom_kill) == (True, False)
    watches[21].cgroup_killed = False
    killed = evidence.gather(21, 1, signal.SIGKILL)
    assert (killed.cgroup_oom_kill, killed.kernel_oom_kill) == (False, True)
    crashed = evidence.gather(21, 1, None)
    assert (crashed.cgroup_oom_kill, crashed.kernel_oom_kill) == (False, False)
