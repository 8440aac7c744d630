"""Disk-full failures with a real ENOSPC: output_dir on a small tmpfs.

The whole supervisor runs in a private mount namespace (``unshare -m``) whose
shell mounts a tmpfs of a measured size over output_dir and then runs
``python -m supervisor run``; the training child inherits the namespace. The
tmpfs is invisible from the test's own namespace, so the test looks at it
through ``/proc/PID/root/...`` of the namespaced shell: that magic link resolves
paths in *that process's* mount namespace, so reading the journal, listing and
verifying checkpoints, writing the ballast and running ``trainwarden status``
all happen from the test process with no ``nsenter`` and no observer process.
When the supervisor exits the shell copies the tree out (the tmpfs dies with the
namespace), and ``SupervisorProcess.close`` kills the shell, the supervisor and
the child by PID.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from supervisor.core.model import Integrity
from supervisor.shell.verify import verify_checkpoint
from tests.support.capabilities import require
from tests.support.jobs import Job, write_config
from tests.support.outputs import assert_bit_identical, events
from tests.support.processes import wait_for
from tests.support.supervised import SupervisorProcess, status_json, supervisor_process
from trainer_child.errors import ErrorReserve
from trainer_child.protocol import COMMIT_RECORD, RunStateFile, checkpoint_step, read_model

pytestmark = [pytest.mark.slow, pytest.mark.system]

PAGE = os.sysconf("SC_PAGE_SIZE")
#: tmpfs pages used besides checkpoints and final/: the child's error reserve,
#: plus .warden's small files (lock, state, journal, heartbeat and its temp file,
#: job), the attempt logs and HF's README.md in output_dir, measured at 12-24 KiB.
OVERHEAD_BYTES = ErrorReserve.SIZE + 20 * 1024


def _on_tmpfs(mountpoint: Path, size: int, copy_to: Path) -> Callable[[list[str]], list[str]]:
    """Wrap argv: private mount namespace, tmpfs of ``size`` bytes on ``mountpoint``.

    The shell stays the parent (no exec) so that it can copy the tree out once
    the supervisor has exited; it passes the supervisor's exit status on.
    """
    script = (
        f"mount -t tmpfs -o size={size} tmpfs {mountpoint} || exit 111; "
        f'"$@"; code=$?; cp -a {mountpoint}/. {copy_to}/; exit $code'
    )
    return lambda argv: [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
        *argv,
    ]


def _inside(proc: SupervisorProcess, path: Path) -> Path:
    """``path`` as the namespaced shell sees it, reachable from this namespace."""
    return Path(f"/proc/{proc.pid}/root") / path.relative_to("/")


def _allocated(folder: Path) -> int:
    """Bytes a copy of ``folder`` takes on tmpfs: every file rounded up to whole pages."""
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in folder.rglob("*") if p.is_file())


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _complete_steps(output_dir: Path) -> set[int]:
    """Steps whose folder is COMPLETE right now (record, sizes, hashes, CRCs)."""
    steps: set[int] = set()
    for name in os.listdir(output_dir):
        step = checkpoint_step(name)
        if step is None or name != f"checkpoint-{step}":
            continue
        entry = verify_checkpoint(output_dir / name, require_record=True)
        if entry.integrity is Integrity.COMPLETE:
            steps.add(step)
    return steps


def assert_newest_survives_every_event(journal: list[dict[str, Any]]) -> None:
    """Replay the journal: after every event the newest checkpoint committed so far is kept.

    The supervisor journals each commit it notices and each checkpoint it prunes
    or quarantines, right after doing it, so the replay checks the invariant
    after every single action, not at the moments a poller happened to look.
    """
    committed: set[int] = set()
    gone: set[int] = set()
    for index, entry in enumerate(journal):
        if entry["event"] == "checkpoint_committed":
            committed.add(entry["step"])
            gone.discard(entry["step"])
        elif entry["event"] in ("pruned", "quarantined"):
            gone.add(entry["step"])
        if committed:
            newest = max(committed)
            assert newest not in gone, (
                f"checkpoint-{newest}, the newest committed, was removed by event {index}: {entry}"
            )


def _fill(path: Path) -> int:
    """Append zeros to ``path`` until the filesystem says ENOSPC; return the bytes added."""
    added = 0
    with open(path, "ab", buffering=0) as handle:
        for chunk in (64 * 1024, PAGE, 512):
            block = b"\0" * chunk
            while True:
                try:
                    added += handle.write(block) or 0
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return added


def _sizes(reference: Path) -> tuple[int, int]:
    """Measure (checkpoint, final/) sizes on tmpfs from the uninterrupted reference run."""
    checkpoints = [p for p in reference.parent.glob("checkpoint-*") if p.is_dir()]
    assert checkpoints, f"the reference run kept no checkpoint under {reference.parent}"
    return max(_allocated(p) for p in checkpoints), _allocated(reference)


def test_enospc_on_a_tmpfs_too_small_for_keep_last_plus_one(
    tmp_path: Path, env: dict[str, str], reference_final: Callable[..., Path]
) -> None:
    """Real ENOSPC mid-save: the newest valid checkpoint always survives; final is bit-identical."""
    require("root", "unshare")
    reference = reference_final()
    checkpoint, final = _sizes(reference)
    keep_last = 2
    # Room for keep_last checkpoints and final/ beside them, but not for one more
    # checkpoint: the third save of every attempt runs into ENOSPC.
    size = OVERHEAD_BYTES + keep_last * checkpoint + (final + checkpoint) // 2
    assert size < OVERHEAD_BYTES + (keep_last + 1) * checkpoint
    out, copy = tmp_path / "out", tmp_path / "copy"
    out.mkdir()
    copy.mkdir()
    job = write_config(
        tmp_path,
        output_dir=out,
        retention={"keep_last": keep_last, "keep_best": False},
        # No reserve: pruning ahead of time would dodge ENOSPC, which is under test.
        disk={"reserve": 0},
    )
    with supervisor_process(job, env, wrap=_on_tmpfs(out, size, copy)) as proc:
        code = proc.wait(240)
        log = proc.log()

    assert code == 0, log
    journal = events(Job(job.path, copy).layout)
    assert_newest_survives_every_event(journal)
    disk_full = [e for e in journal if e["event"] == "failure"]
    assert disk_full, "the tmpfs never filled up: no ENOSPC was exercised"
    assert {e["kind"] for e in disk_full} == {"disk_full"}, disk_full
    # The child's own error.json said so, not only the supervisor's free-space check.
    assert not [e for e in disk_full if "free space below reserve" in e["evidence"]], disk_full
    print(f"tmpfs {size} B; checkpoint {checkpoint} B, final {final} B on tmpfs")
    assert any(e["event"] == "pruned" and "disk pressure" in e["reason"] for e in journal)
    assert max(e["step"] for e in journal if e["event"] == "checkpoint_committed") == 16
    # And on disk, not only in the journal: what is left verifies, the newest included.
    left = {p.name for p in copy.glob("checkpoint-*")}
    assert {f"checkpoint-{step}" for step in _complete_steps(copy)} == left
    assert "checkpoint-16" in left
    assert_bit_identical(copy / "final", reference)


def test_waits_for_disk_and_resumes_once_space_is_freed(
    tmp_path: Path, env: dict[str, str], reference_final: Callable[..., Path]
) -> None:
    """No room for another checkpoint: wait for disk, surviving ENOSPC itself; resume when freed."""
    require("root", "unshare")
    reference = reference_final()
    checkpoint, final = _sizes(reference)
    # Once the ballast is gone the rest of the run fits: keep_last (3) checkpoints,
    # the one being written, and final/.
    size = OVERHEAD_BYTES + 4 * checkpoint + final + 8 * PAGE
    out, copy = tmp_path / "out", tmp_path / "copy"
    out.mkdir()
    copy.mkdir()
    job = write_config(
        tmp_path,
        output_dir=out,
        disk={"reserve": 0},
        # A pause at the start of step 5 leaves time to fill the disk after checkpoint-4.
        env={"TRAINWARDEN_FAILPOINTS": "slow_step@step=5,seconds=2,times=1"},
    )
    with supervisor_process(job, env, wrap=_on_tmpfs(out, size, copy)) as proc:
        inside = _inside(proc, out)
        view = Job(job.path, inside)
        wait_for(
            lambda: (
                (inside / "checkpoint-4" / COMMIT_RECORD).exists() or proc.proc.poll() is not None
            ),
            120,
        )
        ballast = inside / "ballast"
        _fill(ballast)
        assert _free(inside) < PAGE

        # The next save (or heartbeat) fails with ENOSPC; the child's released error
        # reserve is all that is free then, less than one checkpoint: wait for disk.
        def waiting() -> RunStateFile | None:
            state = read_model(view.layout.state, RunStateFile)
            return state if state and state.status.startswith("waiting for disk") else None

        wait_for(lambda: waiting() or proc.proc.poll() is not None, 120)
        report = status_json(inside, env)
        print(f"tmpfs {size} B; trainwarden status: {report['status']!r}")
        assert report["state"] == "waiting_disk", report
        match = re.fullmatch(r"waiting for disk: need (.+), have (.+)", str(report["status"]))
        assert match, report["status"]
        assert report["restarts_by_kind"] == {"disk_full": 1}, report

        # Take the last free pages too: the supervisor's own state.json and journal
        # writes now hit ENOSPC (its status line changes), and it must keep running.
        def full_reports() -> int:
            return proc.log_path.read_text().count('"journal_disk_full"')

        before = full_reports()
        _fill(ballast)
        wait_for(lambda: full_reports() > before or proc.proc.poll() is not None, 30)
        assert proc.proc.poll() is None, proc.log()
        assert read_model(view.layout.state, RunStateFile) is not None

        ballast.unlink()
        code = proc.wait(180)
        log = proc.log()

    assert code == 0, log
    assert "journal_recovered" in proc.log_path.read_text()
    journal = events(Job(job.path, copy).layout)
    names = [e["event"] for e in journal]
    # The lines held back while the disk was full were written later, in order.
    assert "journal_overflow" not in names
    assert names.index("waiting_for_disk") < names.index("launch", names.index("failure"))
    launches = [e for e in journal if e["event"] == "launch"]
    assert [e["resume_from"] for e in launches] == [None, "checkpoint-4"], launches
    assert names[-1] == "completed"
    assert_bit_identical(copy / "final", reference)
