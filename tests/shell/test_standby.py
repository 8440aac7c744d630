"""WarmLauncher with real processes: a standby takes the attempt, holds no lock idle, dies with us.

The jobs here are small Python scripts (``imports=()``: the standby imports
nothing ahead), so each test costs interpreter start-ups, not torch imports;
the built-in job and TRL's CLI are exercised warm end to end in tests/e2e.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor.loop import injection_env
from supervisor.shell.launcher import ChildHandle, JobMarker, ProcessLauncher
from supervisor.shell.lock import RunLock, held_by_someone
from supervisor.shell.standby import WarmLauncher, available_memory
from tests.support.processes import REPO_ROOT, wait_for
from trainer_child.protocol import (
    ENV_ATTEMPT,
    ENV_MICRO_BATCH,
    ENV_OUTPUT_DIR,
    ENV_RESUME_FROM,
    ErrorReport,
    Layout,
    StandbyFile,
    read_model,
)

PY = sys.executable
Exits = queue.SimpleQueue[tuple[int, int]]

#: The job: reports what it sees, then exits with argv[1] (or raises, or sleeps).
JOB = """\
import json, os, sys
out = os.environ["TRAINWARDEN_OUTPUT_DIR"]
attempt = os.environ["TRAINWARDEN_ATTEMPT"]
fds = {}
for fd in os.listdir("/proc/self/fd"):
    try:
        fds[fd] = os.readlink("/proc/self/fd/" + fd)
    except OSError:
        pass
report = {
    "argv": sys.argv, "cwd": os.getcwd(), "pid": os.getpid(), "name": __name__,
    "resume": os.environ.get("TRAINWARDEN_RESUME_FROM"), "fds": fds, "path0": sys.path[0],
}
with open(os.path.join(out, "report-" + attempt + ".json"), "w") as handle:
    json.dump(report, handle)
print("attempt", attempt, "says hello", flush=True)
mode = sys.argv[1]
if mode == "raise":
    raise ValueError("bad data in attempt " + attempt)
if mode == "sleep":
    import time
    time.sleep(600)
sys.exit(int(mode))
"""


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    found = Layout(tmp_path / "out")
    found.ensure()
    (tmp_path / "job.py").write_text(JOB)
    return found


@pytest.fixture
def lock(layout: Layout) -> Iterator[RunLock]:
    """The run lock, held as the supervisor holds it."""
    held = RunLock(layout.lock)
    assert held.acquire()
    try:
        yield held
    finally:
        held.release()


def processes(layout: Layout, linger: float = 5.0) -> ProcessLauncher:
    """The inner launcher as ``default_shell`` builds it: what names the run is the job."""
    return ProcessLauncher(linger=linger, marker=JobMarker(ENV_OUTPUT_DIR, str(layout.output_dir)))


@pytest.fixture
def launcher(layout: Layout) -> Iterator[WarmLauncher]:
    warm = WarmLauncher(processes(layout), layout, imports=())
    try:
        yield warm
    finally:
        warm.close()


def attempt_env(layout: Layout, attempt: int, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        ENV_ATTEMPT: str(attempt),
        ENV_OUTPUT_DIR: str(layout.output_dir),
        ENV_RESUME_FROM: "",
        **extra,
    }


def start(
    launcher: WarmLauncher,
    layout: Layout,
    attempt: int,
    mode: str,
    *,
    exits: Exits,
    lock: RunLock,
    **env: str,
) -> ChildHandle:
    """Start ``python job.py MODE`` as attempt ``attempt``."""
    job = layout.output_dir.parent / "job.py"
    return launcher.spawn(
        [PY, str(job), mode],
        env=attempt_env(layout, attempt, **env),
        cwd=layout.output_dir.parent,
        log_path=layout.attempt_log(attempt),
        pass_fds=(lock.fd,),
        on_exit=lambda pid, rc: exits.put((pid, rc)),
    )


def ready_standby(launcher: WarmLauncher, layout: Layout) -> int:
    """Wait for the launcher's standby to say it is ready; return its pid."""

    def ready() -> int | None:
        pid = launcher.standby_pid
        record = read_model(layout.standby, StandbyFile)
        if pid is not None and record is not None and record.pid == pid:
            return pid if record.state == "ready" else None
        return None

    pid: int = wait_for(ready, 120, what="a ready standby")
    return pid


def report(layout: Layout, attempt: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((layout.output_dir / f"report-{attempt}.json").read_text())
    return data


def holds_lock(pid: int, layout: Layout) -> bool:
    """Whether ``pid`` has ``.warden/lock`` open (the flock lives on an open description)."""
    target = str(layout.lock)
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    return target in links


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_ready_standby_runs_the_next_attempt_with_its_argv_env_log_and_lock(
    launcher: WarmLauncher, layout: Layout, lock: RunLock
) -> None:
    """Attempt 2 runs in the standby: as __main__, its argv, env, cwd, log; it holds the lock."""
    exits: Exits = queue.SimpleQueue()
    first = start(launcher, layout, 1, "3", exits=exits, lock=lock)
    assert (first.start, first.start_note) == ("cold", "no standby yet")
    assert exits.get(timeout=60) == (first.pid, 3)
    standby = ready_standby(launcher, layout)
    assert not holds_lock(standby, layout), "an idle standby must not hold the run lock"

    second = start(
        launcher, layout, 2, "5", exits=exits, lock=lock, **{ENV_RESUME_FROM: "/o/checkpoint-4"}
    )
    assert (second.pid, second.start) == (standby, "warm")
    assert f"standby {standby}" in second.start_note
    assert exits.get(timeout=60) == (standby, 5)

    seen = report(layout, 2)
    assert seen["pid"] == standby
    assert seen["name"] == "__main__"
    assert seen["argv"] == [str(layout.output_dir.parent / "job.py"), "5"]
    assert seen["cwd"] == str(layout.output_dir.parent)
    assert seen["path0"] == str(layout.output_dir.parent)
    assert seen["resume"] == "/o/checkpoint-4"
    assert str(layout.lock) in seen["fds"].values(), "the warm child holds the run lock"
    assert seen["fds"]["1"] == seen["fds"]["2"] == str(layout.attempt_log(2))
    assert "attempt 2 says hello" in layout.attempt_log(2).read_text()
    assert launcher.standby_pid not in (None, standby), "a new standby is prepared after go"


def test_an_uncaught_exception_in_a_warm_attempt_is_reported_like_a_cold_one(
    launcher: WarmLauncher, layout: Layout, lock: RunLock
) -> None:
    """Exit 1, the traceback in the attempt log, and (inject_callback) error.json."""
    exits: Exits = queue.SimpleQueue()
    inject = injection_env(dict(os.environ))
    first = start(launcher, layout, 1, "0", exits=exits, lock=lock, **inject)
    assert exits.get(timeout=60) == (first.pid, 0)
    standby = ready_standby(launcher, layout)
    second = start(launcher, layout, 2, "raise", exits=exits, lock=lock, **inject)
    assert second.start == "warm"
    assert exits.get(timeout=60) == (standby, 1)
    assert "ValueError: bad data in attempt 2" in layout.attempt_log(2).read_text()
    error = read_model(layout.error, ErrorReport)
    assert error is not None
    assert error.type.endswith("ValueError")
    assert error.attempt == 2


def test_a_standby_for_other_overrides_is_discarded_not_used(
    launcher: WarmLauncher, layout: Layout, lock: RunLock
) -> None:
    """After an OOM halving the next attempt starts cold; the stale standby is discarded."""
    exits: Exits = queue.SimpleQueue()
    first = start(launcher, layout, 1, "0", exits=exits, lock=lock)
    assert exits.get(timeout=60) == (first.pid, 0)
    stale = ready_standby(launcher, layout)

    second = start(launcher, layout, 2, "0", exits=exits, lock=lock, **{ENV_MICRO_BATCH: "1"})
    assert second.start == "cold"
    assert second.pid != stale
    assert "other settings" in second.start_note
    wait_for(lambda: gone(stale), 30, what="the stale standby to die")
    assert exits.get(timeout=60) == (second.pid, 0)
    fresh = ready_standby(launcher, layout)
    assert fresh != stale
    third = start(launcher, layout, 3, "0", exits=exits, lock=lock, **{ENV_MICRO_BATCH: "1"})
    assert (third.pid, third.start) == (fresh, "warm")
    assert exits.get(timeout=60) == (fresh, 0)


def test_the_idle_standby_is_never_part_of_the_job_it_waits_beside(
    layout: Layout, lock: RunLock
) -> None:
    """It carries the job's marker, yet no stop, wait or stray count of the job reaches it.

    Without that, stopping an attempt would SIGTERM the standby, every child's
    exit would wait ``linger`` for it, and an idle standby's own death (the OOM
    killer's first pick) would SIGKILL the training child after ``linger``.
    """
    linger = 1.0
    warm = WarmLauncher(processes(layout, linger), layout, imports=())
    exits: Exits = queue.SimpleQueue()
    try:
        first = start(warm, layout, 1, "sleep", exits=exits, lock=lock)
        standby = ready_standby(warm, layout)
        assert warm.job_processes(first.pid) == [first.pid]
        assert warm.job_processes(None) == [first.pid]
        warm.stop(first.pid, grace=10)
        assert exits.get(timeout=10)[0] == first.pid
        assert not gone(standby), "stopping the attempt must not reach the idle standby"

        second = start(warm, layout, 2, "sleep", exits=exits, lock=lock)
        assert (second.pid, second.start) == (standby, "warm")
        assert warm.job_processes(None) == [standby], "after go the standby is the job"
        idle = ready_standby(warm, layout)
        os.kill(idle, signal.SIGKILL)  # as the kernel's OOM killer would pick it
        wait_for(lambda: not psutil.pid_exists(idle), 10, what="the idle standby to be reaped")
        time.sleep(linger + 1.0)  # past the moment its exit wait would SIGKILL a member
        assert not gone(second.pid), "an idle standby's death must not take the training child"
        assert exits.empty()
    finally:
        warm.close()


def test_a_standby_that_died_idle_is_not_killed_again_and_says_why(
    launcher: WarmLauncher, layout: Layout, lock: RunLock
) -> None:
    """Reaped while idle (the OOM killer's pick), then an attempt for other settings: cold."""
    exits: Exits = queue.SimpleQueue()
    first = start(launcher, layout, 1, "0", exits=exits, lock=lock)
    assert exits.get(timeout=60) == (first.pid, 0)
    idle = ready_standby(launcher, layout)
    os.kill(idle, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(idle), 10, what="the idle standby to be reaped")
    second = start(launcher, layout, 2, "0", exits=exits, lock=lock, **{ENV_MICRO_BATCH: "1"})
    assert second.start == "cold"
    assert second.start_note == "the standby had exited"
    assert exits.get(timeout=60) == (second.pid, 0)


def test_a_users_package_runs_on_go_only(
    tmp_path: Path, launcher: WarmLauncher, layout: Layout, lock: RunLock
) -> None:
    """``python -m mypkg.train``: the standby does not import mypkg (its __init__) before go."""
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import os, pathlib\n"
        "pathlib.Path(os.environ['TRAINWARDEN_OUTPUT_DIR'], 'init-' + os.getpid().__str__())"
        ".write_text(os.environ['TRAINWARDEN_ATTEMPT'])\n"
    )
    (package / "train.py").write_text("import sys\nsys.exit(0)\n")
    exits: Exits = queue.SimpleQueue()

    def attempt(number: int) -> ChildHandle:
        return launcher.spawn(
            [PY, "-m", "mypkg.train"],
            env=attempt_env(layout, number),
            cwd=tmp_path,
            log_path=layout.attempt_log(number),
            pass_fds=(lock.fd,),
            on_exit=lambda pid, rc: exits.put((pid, rc)),
        )

    first = attempt(1)
    assert exits.get(timeout=60) == (first.pid, 0)
    standby = ready_standby(launcher, layout)
    marker = layout.output_dir / f"init-{standby}"
    assert not marker.exists(), "the user's package ran in the idle standby"
    second = attempt(2)
    assert (second.pid, second.start) == (standby, "warm")
    assert exits.get(timeout=60) == (standby, 0)
    assert marker.read_text() == "2", "on go it runs, with the attempt's environment"


def test_no_standby_without_the_memory_for_one(layout: Layout, lock: RunLock) -> None:
    """auto keeps none when twice its expected size is not available, and says so."""
    exits: Exits = queue.SimpleQueue()
    launcher = WarmLauncher(ProcessLauncher(), layout, imports=(), memory=lambda: 64 << 20)
    try:
        first = start(launcher, layout, 1, "0", exits=exits, lock=lock)
        assert exits.get(timeout=60) == (first.pid, 0)
        assert launcher.standby_pid is None
        assert "MiB of host memory available" in launcher.off_reason
        second = start(launcher, layout, 2, "0", exits=exits, lock=lock)
        assert second.start == "cold"
        assert "MiB of host memory available" in second.start_note
        assert exits.get(timeout=60) == (second.pid, 0)
    finally:
        launcher.close()


def test_available_memory_is_what_meminfo_and_the_cgroup_leave() -> None:
    """MemAvailable, or the memory cgroup's headroom when that is smaller: never above total."""
    total = psutil.virtual_memory().total
    available = available_memory()
    assert available is not None
    assert 0 < available <= total


#: A supervisor in miniature: a cold attempt, a warm one, then it waits to be killed.
SUPERVISOR = """\
import json, os, queue, signal, sys, time
from pathlib import Path
from supervisor.shell.launcher import ProcessLauncher
from supervisor.shell.lock import RunLock
from supervisor.shell.standby import WarmLauncher, available_memory
from trainer_child.protocol import Layout, StandbyFile, read_model

layout = Layout(sys.argv[1])
job = sys.argv[2]
lock = RunLock(layout.lock)
assert lock.acquire()
launcher = WarmLauncher(ProcessLauncher(), layout, imports=())
exits = queue.SimpleQueue()

def spawn(attempt):
    env = {**os.environ, "TRAINWARDEN_ATTEMPT": str(attempt),
           "TRAINWARDEN_OUTPUT_DIR": str(layout.output_dir), "TRAINWARDEN_RESUME_FROM": ""}
    return launcher.spawn([sys.executable, job, "sleep"], env=env, cwd=os.getcwd(),
                          log_path=layout.attempt_log(attempt), pass_fds=(lock.fd,),
                          on_exit=lambda pid, rc: exits.put((pid, rc)))

def ready():
    while True:
        record = read_model(layout.standby, StandbyFile)
        pid = launcher.standby_pid
        if record is not None and record.pid == pid and record.state == "ready":
            return pid
        time.sleep(0.02)

first = spawn(1)
ready()
os.kill(first.pid, signal.SIGKILL)
exits.get(timeout=60)
second = spawn(2)
third = ready()
report = {"warm": second.pid, "start": second.start, "standby": third}
(layout.output_dir / "supervisor.json").write_text(json.dumps(report))
time.sleep(600)
"""


def test_a_supervisor_sigkill_takes_the_idle_standby_but_not_the_warm_child(
    tmp_path: Path, layout: Layout
) -> None:
    """The idle standby dies with its supervisor (and held no lock); the warm child keeps it."""
    script = tmp_path / "mini_supervisor.py"
    script.write_text(textwrap.dedent(SUPERVISOR))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    helper = subprocess.Popen(
        [PY, str(script), str(layout.output_dir), str(tmp_path / "job.py")],
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    warm = idle = 0
    try:
        found = wait_for(
            lambda: (layout.output_dir / "supervisor.json").exists() or helper.poll() is not None,
            180,
        )
        assert found is True
        assert helper.poll() is None, "the helper supervisor died"
        seen = json.loads((layout.output_dir / "supervisor.json").read_text())
        warm, idle = seen["warm"], seen["standby"]
        assert seen["start"] == "warm"
        assert holds_lock(warm, layout)
        assert not holds_lock(idle, layout)

        helper.kill()
        helper.wait(10)
        wait_for(lambda: gone(idle), 10, what="the idle standby to die with its supervisor")
        assert not gone(warm), "the warm child must outlive its supervisor (orphan hand-over)"
        assert held_by_someone(layout.lock)
        os.kill(warm, signal.SIGKILL)
        wait_for(lambda: gone(warm), 10)
        assert not held_by_someone(layout.lock), "nothing else may hold the lock"
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait(10)
        for pid in (warm, idle):
            with contextlib.suppress(ProcessLookupError):
                if pid:
                    os.kill(pid, signal.SIGKILL)
