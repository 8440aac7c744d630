"""Host OOM evidence: cgroup v1/v2 parsers on sample trees, and a real OOM kill under v1."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.shell.launcher import ProcessLauncher
from supervisor.shell.oom import (
    CgroupRef,
    OomEvidence,
    OomWatch,
    cgroup_of,
    kernel_log_oom,
    kmsg_cursor,
    oom_kill_count,
    parse_proc_cgroup,
)
from supervisor.shell.standby import available_memory
from supervisor.shell.testing import FakeOomWatch
from tests.support.capabilities import require

HYBRID = """\
9:name=systemd:/
8:pids:/
4:memory:/process_api/abc123
3:cpuset:/
1:cpu,cpuacct:/user.slice
0::/
"""
PURE_V2 = "0::/system.slice/trainwarden@demo.service\n"
V1_EVENTS = "oom_kill_disable 0\nunder_oom 0\noom_kill {n}\n"
V2_EVENTS = "low 0\nhigh 0\nmax 12\noom 3\noom_kill {n}\noom_group_kill 0\n"


def write(path: Path, text: str) -> None:
    """Create ``path`` with ``text``, making its parents."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_parse_prefers_v1_memory_line_on_hybrid_hosts() -> None:
    """On a hybrid host the v1 memory controller's line names the memory cgroup."""
    assert parse_proc_cgroup(HYBRID) == CgroupRef(version=1, path="/process_api/abc123")


def test_parse_uses_unified_line_on_pure_v2() -> None:
    """On a pure v2 host the 0:: line is the memory cgroup."""
    assert parse_proc_cgroup(PURE_V2) == CgroupRef(
        version=2, path="/system.slice/trainwarden@demo.service"
    )


def test_parse_rejects_text_without_cgroups() -> None:
    """Text with neither a memory line nor a unified line gives None."""
    assert parse_proc_cgroup("") is None
    assert parse_proc_cgroup("garbage\n5:cpu:/x\n") is None


def test_cgroup_of_reads_proc(tmp_path: Path) -> None:
    """cgroup_of reads /proc/PID/cgroup under an injectable root, None for a missing pid."""
    write(tmp_path / "42" / "cgroup", PURE_V2)
    assert cgroup_of(42, str(tmp_path)) == CgroupRef(2, "/system.slice/trainwarden@demo.service")
    assert cgroup_of(43, str(tmp_path)) is None
    assert cgroup_of(os.getpid()) is not None  # the real /proc


def test_v1_counter_is_read_from_memory_oom_control(tmp_path: Path) -> None:
    """v1: oom_kill comes from memory/PATH/memory.oom_control."""
    write(tmp_path / "memory" / "a" / "b" / "memory.oom_control", V1_EVENTS.format(n=4))
    assert oom_kill_count(CgroupRef(1, "/a/b"), str(tmp_path)) == 4


def test_v2_counter_is_read_at_root_or_under_unified(tmp_path: Path) -> None:
    """v2: oom_kill comes from PATH/memory.events at the root (pure) or under unified/ (hybrid)."""
    pure, hybrid = tmp_path / "pure", tmp_path / "hybrid"
    write(pure / "job.slice" / "memory.events", V2_EVENTS.format(n=2))
    write(hybrid / "unified" / "job.slice" / "memory.events", V2_EVENTS.format(n=5))
    assert oom_kill_count(CgroupRef(2, "/job.slice"), str(pure)) == 2
    assert oom_kill_count(CgroupRef(2, "/job.slice"), str(hybrid)) == 5


def test_container_without_cgroup_namespace_finds_its_own_root(tmp_path: Path) -> None:
    """A host path like /docker/ID falls back to the container's own mount root."""
    write(tmp_path / "memory" / "memory.oom_control", V1_EVENTS.format(n=1))
    assert oom_kill_count(CgroupRef(1, "/docker/abc"), str(tmp_path)) == 1


def test_missing_counter_reads_none(tmp_path: Path) -> None:
    """No file (old kernel, no memory controller) gives None, not an error."""
    assert oom_kill_count(CgroupRef(2, "/nowhere"), str(tmp_path)) is None
    write(tmp_path / "memory" / "x" / "memory.oom_control", "oom_kill_disable 0\n")
    assert oom_kill_count(CgroupRef(1, "/x"), str(tmp_path)) is None


def test_oom_watch_compares_with_the_snapshot_at_spawn(tmp_path: Path) -> None:
    """OomWatch reports a kill only when the counter rose after it was created."""
    proc_root, sysfs = tmp_path / "proc", tmp_path / "sys"
    write(proc_root / "77" / "cgroup", "0::/job\n")
    events = sysfs / "job" / "memory.events"
    write(events, V2_EVENTS.format(n=3))  # kills before the spawn do not count
    kmsg = str(tmp_path / "kmsg")
    watch = OomWatch(77, proc_root=str(proc_root), sysfs_root=str(sysfs), kmsg_path=kmsg)
    assert watch.snapshot.oom_kills == 3
    assert not watch.oom_killed_since()
    events.write_text(V2_EVENTS.format(n=4))
    assert watch.oom_killed_since()


def test_oom_watch_without_evidence_sources_says_no(tmp_path: Path) -> None:
    """A pid with no readable cgroup and no kmsg yields no evidence, never an error."""
    watch = OomWatch(999_999, proc_root=str(tmp_path), kmsg_path=str(tmp_path / "none"))
    assert watch.snapshot.cgroup is None
    assert not watch.oom_killed_since()
    assert not watch.kernel_log_oom()


def test_kernel_log_matches_victim_after_cursor(tmp_path: Path) -> None:
    """Kernel log lines name the OOM victim; records at or before the cursor are ignored."""
    kmsg = tmp_path / "kmsg"
    kmsg.write_text(
        "6,100,5,-;Out of memory: Killed process 4321 (python) total-vm:1kB\n"
        " SUBSYSTEM=memory\n"
        "6,101,6,-;oom-kill:constraint=CONSTRAINT_MEMCG,task=python,pid=555,uid=0\n"
        "3,102,7,-;Memory cgroup out of memory: Killed process 777 (python3) anon-rss:1kB\n"
    )
    assert kmsg_cursor(str(kmsg)) == 102
    assert kernel_log_oom(4321, kmsg_path=str(kmsg))
    assert not kernel_log_oom(4321, after_seq=100, kmsg_path=str(kmsg))  # old record, reused pid
    assert kernel_log_oom(555, after_seq=100, kmsg_path=str(kmsg))
    assert kernel_log_oom(777, kmsg_path=str(kmsg))
    assert not kernel_log_oom(77, kmsg_path=str(kmsg))  # pid 77 is not pid 777
    assert not kernel_log_oom(4321, kmsg_path=str(tmp_path / "unreadable"))


@pytest.mark.parametrize("kind", ["sample_tree", "fake"])
def test_both_watches_answer_no_until_the_kill_then_yes(kind: str, tmp_path: Path) -> None:
    """OomWatch over a sample cgroup tree and kmsg, and its fake, say the same before and after."""
    proc_root, sysfs, kmsg = tmp_path / "proc", tmp_path / "sys", tmp_path / "kmsg"
    write(proc_root / "77" / "cgroup", "0::/job\n")
    write(sysfs / "job" / "memory.events", V2_EVENTS.format(n=3))
    write(kmsg, "6,100,5,-;an older record\n")
    fake = FakeOomWatch(77)
    watch: OomEvidence = (
        fake
        if kind == "fake"
        else OomWatch(77, proc_root=str(proc_root), sysfs_root=str(sysfs), kmsg_path=str(kmsg))
    )
    assert (watch.oom_killed_since(), watch.kernel_log_oom()) == (False, False)
    # The OOM killer strikes: the counter rises and the kernel log names the victim.
    (sysfs / "job" / "memory.events").write_text(V2_EVENTS.format(n=4))
    with kmsg.open("a") as log:
        log.write("6,101,6,-;Memory cgroup out of memory: Killed process 77 (python)\n")
    fake.cgroup_killed = fake.kmsg_killed = True
    assert (watch.oom_killed_since(), watch.kernel_log_oom()) == (True, True)


# --- real OOM kill under a cgroup v1 memory limit -----------------------------------------

V1_MEMORY = Path("/sys/fs/cgroup/memory")


@pytest.fixture
def v1_cgroups() -> Iterator[list[Path]]:
    """Fresh v1 memory cgroups (made by the test), removed at teardown."""
    require("root", "cgroup-v1-memory")
    made: list[Path] = []
    yield made
    for path in made:
        deadline = time.monotonic() + 5
        while True:
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                # EBUSY while the reaped task is still being detached from the cgroup.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def make_cgroup(made: list[Path], limit: int | None) -> Path:
    """Create a memory cgroup, optionally with a hard limit (swap included where possible)."""
    path = V1_MEMORY / f"trainwarden-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    made.append(path)
    if limit is not None:
        (path / "memory.limit_in_bytes").write_text(str(limit))
        memsw = path / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            memsw.write_text(str(limit))
    return path


def start_in_cgroup(
    launcher: ProcessLauncher, tmp_path: Path, cgroup: Path, code: str, exits: queue.SimpleQueue
) -> int:
    """Spawn a shell that joins ``cgroup``, waits for tmp_path/go, then execs python ``code``.

    The child moves itself, so OomWatch must be created after the move: wait for it.
    """
    go = tmp_path / "go"
    script = (
        f"echo $$ > {cgroup}/cgroup.procs && "
        f"while [ ! -e {go} ]; do sleep 0.01; done; "
        f'exec {sys.executable} -c "{code}"'
    )
    handle = launcher.spawn(
        ["sh", "-c", script],
        env=dict(os.environ),
        cwd=tmp_path,
        log_path=tmp_path / "child.log",
        pass_fds=(),
        on_exit=lambda pid, rc: exits.put((pid, rc)),
    )
    deadline = time.monotonic() + 10
    while cgroup_of(handle.pid) != CgroupRef(1, f"/{cgroup.name}"):
        assert time.monotonic() < deadline, "child never joined its cgroup"
        time.sleep(0.01)
    return handle.pid


@pytest.mark.system
@pytest.mark.serial
def test_real_oom_kill_is_counted_and_plain_sigkill_is_not(
    v1_cgroups: list[Path], tmp_path: Path
) -> None:
    """A child OOM-killed under a 64 MiB limit is seen by the counter; a plain SIGKILL is not."""
    launcher = ProcessLauncher()
    exits: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
    pids: list[int] = []
    kmsg_readable = os.access("/dev/kmsg", os.R_OK)
    try:
        limited = make_cgroup(v1_cgroups, 64 << 20)
        pid = start_in_cgroup(launcher, tmp_path, limited, "b = bytearray(512 << 20)", exits)
        pids.append(pid)
        watch = OomWatch(pid)
        assert watch.snapshot.oom_kills == 0
        (tmp_path / "go").touch()
        assert exits.get(timeout=30) == (pid, -signal.SIGKILL)
        assert watch.oom_killed_since()
        if kmsg_readable:
            assert watch.kernel_log_oom()

        (tmp_path / "go").unlink()
        fresh = make_cgroup(v1_cgroups, None)
        pid = start_in_cgroup(launcher, tmp_path, fresh, "import time; time.sleep(60)", exits)
        pids.append(pid)
        watch = OomWatch(pid)
        (tmp_path / "go").touch()
        launcher.signal_group(pid, signal.SIGKILL)
        assert exits.get(timeout=30) == (pid, -signal.SIGKILL)
        assert not watch.oom_killed_since()
        assert not watch.kernel_log_oom()
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        launcher.close(grace=0.5)


def test_a_cgroups_reclaimable_page_cache_counts_as_available_memory(
    v1_cgroups: list[Path], tmp_path: Path
) -> None:
    """A child that wrote 96 MiB of file data in a 512 MiB cgroup: that cache is not "used".

    ``available_memory`` decides whether a warm standby fits; counting the page
    cache of the model and checkpoints read once as used would turn standbys off
    in every container whose limit the files fill.
    """
    launcher = ProcessLauncher()
    exits: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
    limit = 512 << 20
    written = 96 << 20
    pid = 0
    try:
        cgroup = make_cgroup(v1_cgroups, limit)
        code = (
            "import os, time; f = open('cache.bin', 'wb'); "
            f"f.write(bytes({written})); f.flush(); os.fsync(f.fileno()); f.close(); "
            "open('written', 'w').close(); time.sleep(60)"
        )
        pid = start_in_cgroup(launcher, tmp_path, cgroup, code, exits)
        (tmp_path / "go").touch()
        deadline = time.monotonic() + 30
        while not (tmp_path / "written").exists():
            assert time.monotonic() < deadline, (tmp_path / "child.log").read_text()
            time.sleep(0.05)
        usage = int((cgroup / "memory.usage_in_bytes").read_text())
        assert usage > written, "the file's pages are charged to the cgroup"
        available = available_memory(pid)
        assert available is not None
        assert available > limit - usage + written // 2, (available, limit, usage)
        assert available <= limit
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        launcher.close(grace=0.5)
