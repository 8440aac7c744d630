"""The main loop with every side effect faked: what it spawns, records, persists and says.

``Supervisor.run()`` runs for real in the test's (main) thread. The scripted
launcher decides each child's fate inside ``spawn`` and reports the exit
through the loop's own ``on_exit`` callback, exactly as the waiter thread
would, so the loop meets every event in the order the real shell delivers it
and no thread is started. The monotonic clock is fake and jumps on every
reading, so a backoff of seconds passes in a few loop turns.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisor.config import parse_config
from supervisor.core.model import (
    CheckpointEntry,
    Disk,
    Integrity,
    Inventory,
    InventoryChanged,
    Mode,
    Started,
    Tick,
)
from supervisor.loop import Shell, Supervisor
from supervisor.shell.disk import FakeDisk
from supervisor.shell.journal import FakeJournal
from supervisor.shell.launcher import ChildHandle, ExitCallback, FakeLauncher, FakeSpawn
from supervisor.shell.store import FakeCheckpointStore
from supervisor.shell.systemd import FakeNotifier
from trainer_child.protocol import (
    ENV_ATTEMPT,
    ENV_GRAD_ACCUM,
    ENV_MICRO_BATCH,
    ENV_OUTPUT_DIR,
    ENV_RESUME_FROM,
    ErrorKind,
    ErrorReport,
    JobFile,
    Layout,
    atomic_write_model,
    read_model,
)

#: Seconds the fake monotonic clock advances per reading: fast, but ordered.
CLOCK_STEP = 0.5
MICRO_BATCH = 2


class FakeClock:
    """A monotonic clock that moves ``step`` seconds every time it is read."""

    def __init__(self, step: float = CLOCK_STEP) -> None:
        self.now = 1000.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def complete(step: int) -> CheckpointEntry:
    return CheckpointEntry(step, Integrity.COMPLETE, size_bytes=1000, has_record=True)


@dataclass
class SpawnSeen:
    """What the test saw at the moment of one spawn, before the child's fate was sealed."""

    spawn: FakeSpawn
    clock: float
    notifier_messages: list[str]
    fd_targets: list[str]


class ScriptedLauncher(FakeLauncher):
    """A FakeLauncher whose every child meets the fate the test scripted for its attempt."""

    def __init__(self, clock: FakeClock, fates: list[Callable[[FakeSpawn], int]]) -> None:
        super().__init__(clock=clock)
        self.clock = clock
        self.fates = list(fates)
        self.seen: list[SpawnSeen] = []
        self.notifier: FakeNotifier | None = None

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
        handle = super().spawn(
            argv, env=env, cwd=cwd, log_path=log_path, pass_fds=pass_fds, on_exit=on_exit
        )
        spawn = self.spawns[-1]
        self.seen.append(
            SpawnSeen(
                spawn=spawn,
                clock=self.clock.now,
                notifier_messages=list(self.notifier.messages) if self.notifier else [],
                fd_targets=[os.readlink(f"/proc/self/fd/{fd}") for fd in pass_fds],
            )
        )
        fate = self.fates.pop(0)
        # The waiter thread would call on_exit once the child is reaped: it only
        # enqueues, so the loop handles ChildSpawned first, then this exit.
        self.exit(handle.pid, fate(spawn))
        return handle


@dataclass
class Rig:
    """A supervisor over a real tmp output_dir with every interface faked."""

    supervisor: Supervisor
    launcher: ScriptedLauncher
    store: FakeCheckpointStore
    journal: FakeJournal
    notifier: FakeNotifier
    clock: FakeClock
    layout: Layout

    def events(self, name: str) -> list[dict[str, object]]:
        return [e for e in self.journal.entries if e["event"] == name]


def make_rig(tmp_path: Path, fates: list[Callable[[FakeSpawn], int]]) -> Rig:
    output_dir = tmp_path / "out"
    config = parse_config(
        {
            "output_dir": str(output_dir),
            "train": {
                "sft": {
                    "max_steps": 8,
                    "save_steps": 4,
                    "per_device_train_batch_size": MICRO_BATCH,
                }
            },
        }
    )
    clock = FakeClock()
    launcher = ScriptedLauncher(clock, fates)
    store = FakeCheckpointStore()
    journal = FakeJournal(wall_clock=lambda: clock.now)
    notifier = FakeNotifier()
    launcher.notifier = notifier
    shell = Shell(
        launcher=launcher,
        store=store,
        journal=journal,
        disk=FakeDisk(),
        notifier=notifier,
        clock=clock,
        wall=lambda: 1_700_000_000.0 + clock.now,
        rand=lambda: 0.5,
        watch_fs=False,
    )
    supervisor = Supervisor(config, shell)
    return Rig(supervisor, launcher, store, journal, notifier, clock, Layout(output_dir))


@pytest.fixture
def systemd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend systemd started us: these must never reach the training child."""
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))


def test_crash_then_success_runs_two_attempts(tmp_path: Path, systemd_env: None) -> None:
    """exit(1) after a commit -> backoff -> respawn from that checkpoint -> exit(0) completes."""
    rig: Rig

    def crash_after_commit(spawn: FakeSpawn) -> int:
        rig.store.put(complete(4))
        return 1

    def finish(spawn: FakeSpawn) -> int:
        rig.store.put(complete(8))
        rig.store.final_complete = True
        return 0

    rig = make_rig(tmp_path, [crash_after_commit, finish])
    assert rig.supervisor.run() == 0

    first, second = rig.launcher.seen
    assert first.spawn.env[ENV_RESUME_FROM] == ""
    assert first.spawn.env[ENV_ATTEMPT] == "1"
    assert "--resume-from" not in first.spawn.argv
    resume = str(rig.layout.checkpoint(4))
    assert second.spawn.env[ENV_RESUME_FROM] == resume
    assert second.spawn.env[ENV_ATTEMPT] == "2"
    assert second.spawn.argv[-2:] == ["--resume-from", resume]
    for seen in (first, second):
        assert seen.spawn.env[ENV_OUTPUT_DIR] == str(rig.layout.output_dir)
        assert seen.fd_targets == [str(rig.layout.lock)], "the run lock must be inherited"
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            assert name not in seen.spawn.env

    (failure,) = rig.events("failure")
    assert failure["kind"] == "crash"
    assert failure["returncode"] == 1
    assert failure["attempt"] == 1
    (backoff,) = rig.events("backoff")
    assert isinstance(backoff["seconds"], float)
    assert second.clock - first.clock >= backoff["seconds"], "respawned before the backoff ended"
    launches = rig.events("launch")
    assert [(e["attempt"], e["resume_from"]) for e in launches] == [
        (1, None),
        (2, "checkpoint-4"),
    ]
    assert rig.journal.events()[-1] == "completed"
    assert rig.journal.states[-1].completed
    assert rig.launcher.closed


def test_notifier_ready_before_first_spawn_then_status(tmp_path: Path) -> None:
    """READY=1 precedes the first spawn; STATUS= follows the run; STOPPING=1 ends it."""
    rig: Rig

    def crash(spawn: FakeSpawn) -> int:
        return 1

    def finish(spawn: FakeSpawn) -> int:
        rig.store.final_complete = True
        return 0

    rig = make_rig(tmp_path, [crash, finish])
    assert rig.supervisor.run() == 0

    at_first_spawn = rig.launcher.seen[0].notifier_messages
    assert at_first_spawn, "nothing was sent before the first spawn"
    assert at_first_spawn[0].startswith("READY=1\n")
    statuses = rig.notifier.statuses
    assert "attempt 1: starting from scratch" in statuses
    assert any(s.startswith("backing off") and "crash" in s for s in statuses), statuses
    assert statuses[-1].startswith("complete:"), statuses
    assert rig.notifier.messages[-1] == "STOPPING=1"
    assert sum(m.startswith("READY=1") for m in rig.notifier.messages) == 1


def test_cuda_oom_persists_halved_micro_batch(tmp_path: Path) -> None:
    """After a cuda_oom, state.json and the next child carry micro-batch/2 and accumulation*2."""
    rig: Rig

    def oom(spawn: FakeSpawn) -> int:
        report = ErrorReport(
            type="torch.OutOfMemoryError",
            message="CUDA out of memory. Tried to allocate 2.00 GiB",
            kind=ErrorKind.CUDA_OOM,
            step=3,
            pid=spawn.pid,
            attempt=1,
        )
        atomic_write_model(rig.layout.error, report)
        return 1

    def finish(spawn: FakeSpawn) -> int:
        rig.store.final_complete = True
        return 0

    rig = make_rig(tmp_path, [oom, finish])
    assert rig.supervisor.run() == 0

    (failure,) = rig.events("failure")
    assert failure["kind"] == "cuda_oom"
    (remedy,) = rig.events("remediation")
    assert remedy["per_device_train_batch_size"] == [MICRO_BATCH, MICRO_BATCH // 2]
    after_oom = next(s for s in rig.journal.states if s.failures)
    assert after_oom.overrides.per_device_train_batch_size == MICRO_BATCH // 2
    assert after_oom.overrides.gradient_accumulation_steps == 2
    assert rig.journal.states[-1].overrides == after_oom.overrides

    second = rig.launcher.seen[1].spawn
    assert second.env[ENV_MICRO_BATCH] == str(MICRO_BATCH // 2)
    assert second.env[ENV_GRAD_ACCUM] == "2"
    job = read_model(rig.layout.job, JobFile)
    assert job is not None
    assert job.overrides.per_device_train_batch_size == MICRO_BATCH // 2
    launch = rig.events("launch")[1]
    assert launch["gradient_accumulation_steps"] == 2


def test_orphan_save_in_progress_is_not_quarantined(tmp_path: Path) -> None:
    """While waiting for an orphan, its half-written emergency checkpoint is left alone."""
    rig = make_rig(tmp_path, [])
    supervisor = rig.supervisor
    disk = Disk(free=100 << 30, total=200 << 30)
    supervisor._process(Started(Inventory((complete(4),)), disk, orphan_pid=4321))
    assert supervisor.state.mode is Mode.WAITING_ORPHAN
    writing = CheckpointEntry(7, Integrity.INCOMPLETE, problems=("no commit record",))
    supervisor._process(InventoryChanged(Inventory((complete(4), writing))))
    assert rig.store.quarantined == []
    assert supervisor.state.mode is Mode.WAITING_ORPHAN
    assert rig.launcher.spawns == []


OrphanRigFactory = Callable[[list[Callable[[FakeSpawn], int]]], Rig]


@pytest.fixture
def orphan_rig(tmp_path: Path) -> Iterator[OrphanRigFactory]:
    """Make rigs whose supervisor found an orphan holding the lock; release the lock after."""
    made: list[Rig] = []

    def make(fates: list[Callable[[FakeSpawn], int]]) -> Rig:
        rig = make_rig(tmp_path, fates)
        made.append(rig)
        rig.store.put(complete(4))
        disk = Disk(free=100 << 30, total=200 << 30)
        rig.supervisor._process(Started(rig.store.inventory(), disk, orphan_pid=4321))
        assert rig.supervisor.state.mode is Mode.WAITING_ORPHAN
        return rig

    yield make
    for rig in made:
        rig.supervisor.lock.release()


def tick(rig: Rig) -> None:
    """Run timer turns of the loop until one was a plain Tick (a turn may be a rescan)."""
    rig.supervisor._last_rescan = rig.clock.now  # no periodic rescan in between
    for _ in range(3):
        event = rig.supervisor._tick()
        rig.supervisor._process(event)
        if isinstance(event, Tick):
            return
    raise AssertionError("the timer never produced a Tick")


def test_orphan_emergency_checkpoint_is_resumed_from(orphan_rig: OrphanRigFactory) -> None:
    """Once the orphan is gone, the checkpoint it committed last is the resume point."""
    rig = orphan_rig([lambda spawn: 1])
    # The orphan's emergency save committed, then it exited and released the
    # lock, before any watcher notice of the new folder reached the loop.
    rig.store.put(complete(7))
    tick(rig)
    (seen,) = rig.launcher.seen
    assert seen.spawn.env[ENV_RESUME_FROM] == str(rig.layout.checkpoint(7))
    assert rig.store.quarantined == []


def test_orphan_that_finished_the_run_is_not_followed_by_a_child(
    orphan_rig: OrphanRigFactory,
) -> None:
    """An orphan that wrote final/ before exiting leaves the run complete: exit 0, no spawn."""
    rig = orphan_rig([])
    rig.store.put(complete(8))
    rig.store.final_complete = True
    tick(rig)
    assert rig.launcher.spawns == []
    assert rig.supervisor.exit_code == 0
    assert rig.supervisor.state.mode is Mode.COMPLETED
    assert rig.journal.states[-1].completed
