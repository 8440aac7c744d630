"""The main loop with every seam faked: what it spawns, records, persists and says.

``Supervisor.run()`` runs for real in the test's (main) thread, over the fakes
of ``supervisor/shell/testing.py``: no process, no file, no ``/proc``. The
scripted launcher decides each child's fate inside ``spawn`` and reports the
exit through the loop's own ``on_exit`` callback, exactly as the waiter thread
would, so the loop meets every event in the order the real shell delivers it
and no thread is started. The monotonic clock is fake and jumps on every
reading, so a backoff of seconds passes in a few loop turns.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisor.config import parse_config
from supervisor.core.model import (
    CheckpointEntry,
    Disk,
    Evidence,
    Integrity,
    Inventory,
    InventoryChanged,
    Mode,
    Started,
    Tick,
)
from supervisor.loop import Shell, Supervisor
from supervisor.shell.launcher import ChildHandle, ExitCallback
from supervisor.shell.preemption_notice import PreemptionNotice, Provider
from supervisor.shell.testing import (
    FakeCheckpointStore,
    FakeDisk,
    FakeEvidence,
    FakeHeartbeat,
    FakeJournal,
    FakeLauncher,
    FakeLock,
    FakeNotices,
    FakeNotifier,
    FakeObserver,
    FakePeers,
    FakeRunDir,
    FakeSignals,
    FakeSpawn,
    FakeWatchers,
)
from trainer_child.protocol import (
    ENV_ATTEMPT,
    ENV_GRAD_ACCUM,
    ENV_MICRO_BATCH,
    ENV_OUTPUT_DIR,
    ENV_RESUME_FROM,
    EXIT_PREEMPTED,
    Layout,
)

#: Seconds the fake monotonic clock advances per reading: fast, but ordered.
CLOCK_STEP = 0.5
MICRO_BATCH = 2
#: The fake run lock's descriptor, which every child must inherit.
LOCK_FD = 99
#: Never created: every seam is faked, so nothing may touch it.
OUTPUT_DIR = Path("/nonexistent/trainwarden-unit/out")


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
        messages = list(self.notifier.messages) if self.notifier else []
        self.seen.append(SpawnSeen(spawn=spawn, clock=self.clock.now, notifier_messages=messages))
        fate = self.fates.pop(0)
        # The waiter thread would call on_exit once the child is reaped: it only
        # enqueues, so the loop handles ChildSpawned first, then this exit.
        self.exit(handle.pid, fate(spawn))
        return handle


@dataclass
class Rig:
    """A supervisor whose every seam is a fake."""

    supervisor: Supervisor
    launcher: ScriptedLauncher
    store: FakeCheckpointStore
    journal: FakeJournal
    notifier: FakeNotifier
    run_dir: FakeRunDir
    lock: FakeLock
    evidence: FakeEvidence
    watchers: FakeWatchers
    signals: FakeSignals
    clock: FakeClock
    layout: Layout

    def events(self, name: str) -> list[dict[str, object]]:
        return [e for e in self.journal.entries if e["event"] == name]


def make_rig(fates: list[Callable[[FakeSpawn], int]], **sections: object) -> Rig:
    """A supervisor over fakes; ``sections`` add top-level config keys (``restart=...``)."""
    config = parse_config(
        {
            "output_dir": str(OUTPUT_DIR),
            "train": {
                "sft": {
                    "max_steps": 8,
                    "save_steps": 4,
                    "per_device_train_batch_size": MICRO_BATCH,
                }
            },
            **sections,
        }
    )
    clock = FakeClock()
    launcher = ScriptedLauncher(clock, fates)
    notifier = FakeNotifier()
    launcher.notifier = notifier
    shell = Shell(
        launcher=launcher,
        store=FakeCheckpointStore(),
        journal=FakeJournal(wall_clock=lambda: clock.now),
        disk=FakeDisk(),
        notifier=notifier,
        run_dir=FakeRunDir(OUTPUT_DIR),
        lock=FakeLock(fd=LOCK_FD),
        peers=FakePeers(),
        heartbeat=FakeHeartbeat(clock=clock),
        evidence=FakeEvidence(),
        watcher=FakeWatchers(),
        observer=FakeObserver(),
        signals=FakeSignals(),
        clock=clock,
        wall=lambda: 1_700_000_000.0 + clock.now,
        rand=lambda: 0.5,
    )
    assert isinstance(shell.store, FakeCheckpointStore)
    assert isinstance(shell.journal, FakeJournal)
    assert isinstance(shell.run_dir, FakeRunDir)
    assert isinstance(shell.lock, FakeLock)
    assert isinstance(shell.evidence, FakeEvidence)
    assert isinstance(shell.watcher, FakeWatchers)
    assert isinstance(shell.signals, FakeSignals)
    return Rig(
        Supervisor(config, shell),
        launcher,
        shell.store,
        shell.journal,
        notifier,
        shell.run_dir,
        shell.lock,
        shell.evidence,
        shell.watcher,
        shell.signals,
        clock,
        Layout(OUTPUT_DIR),
    )


@pytest.fixture
def systemd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend systemd started us: these must never reach the training child."""
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))


def test_crash_then_success_runs_two_attempts(systemd_env: None) -> None:
    """exit(1) after a commit -> backoff -> respawn from that checkpoint -> exit(0) completes."""
    rig: Rig

    def crash_after_commit(spawn: FakeSpawn) -> int:
        rig.store.put(complete(4))
        return 1

    def finish(spawn: FakeSpawn) -> int:
        rig.store.put(complete(8))
        rig.store.final_complete = True
        return 0

    rig = make_rig([crash_after_commit, finish])
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
        assert seen.spawn.pass_fds == (LOCK_FD,), "the run lock must be inherited"
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


def test_every_seam_is_used_for_its_part() -> None:
    """The watcher runs for the loop's life; each child is watched for evidence and noted."""
    rig: Rig

    def finish(spawn: FakeSpawn) -> int:
        rig.store.final_complete = True
        return 0

    rig = make_rig([finish])
    assert rig.supervisor.run() == 0
    ((watched_dir, watcher),) = rig.watchers.made
    assert watched_dir == OUTPUT_DIR
    assert watcher.starts == 1
    assert not watcher.running
    (spawn,) = rig.launcher.spawns
    assert rig.evidence.forgotten == 1, "an earlier attempt's error.json must not survive"
    assert rig.evidence.watched == [spawn.pid]
    assert rig.evidence.gathered == [(spawn.pid, 1, None)]
    assert rig.run_dir.prepared == 1
    ((attempt, note),) = rig.run_dir.notes
    assert attempt == 1
    assert note.startswith("attempt 1: resume_from=- argv=")
    assert rig.signals.installed == rig.signals.restored == 1
    assert rig.lock.releases == 1


def test_the_observer_hears_every_record_and_names_the_tracking_run() -> None:
    """Records reach the observer; every child and state.json carry one tracking run id."""
    rig: Rig

    def crash(spawn: FakeSpawn) -> int:
        return 1

    def finish(spawn: FakeSpawn) -> int:
        rig.store.final_complete = True
        return 0

    rig = make_rig([crash, finish])
    observer = rig.supervisor.shell.observer
    assert isinstance(observer, FakeObserver)
    assert rig.supervisor.run() == 0
    events = [event for event, _, _ in observer.records]
    assert events == rig.journal.events()
    first, second = rig.launcher.spawns
    assert first.env["WANDB_RUN_ID"] == second.env["WANDB_RUN_ID"] == observer.tracking_run_id
    assert {state.tracking_run_id for state in rig.journal.states} == {observer.tracking_run_id}
    assert observer.views[-1].mode is Mode.COMPLETED
    assert observer.closed


def test_a_preemption_notice_stops_the_child_like_sigterm_and_its_watch_is_closed() -> None:
    """The watch starts with the loop; its notice reaches the policy; it is closed at the end."""
    rig: Rig
    notices = FakeNotices()

    def noticed_then_saves(spawn: FakeSpawn) -> int:
        notices.deliver(PreemptionNotice(Provider.GCP, "preempted", None, "TRUE"))
        rig.store.put(complete(6))
        return 75  # its emergency checkpoint, after the SIGTERM the notice sent

    rig = make_rig([noticed_then_saves])
    rig.supervisor.shell.notices = notices
    assert rig.supervisor.run() == 0
    (spawn,) = rig.launcher.spawns
    assert (spawn.pid, signal.SIGTERM) in rig.launcher.signals
    (notice,) = rig.events("preemption_notice")
    assert (notice["provider"], notice["action"]) == ("gcp", "preempted")
    (asked,) = rig.events("preempt_requested")
    assert asked["signal"] == "preemption notice (gcp preempted)"
    assert rig.events("preempted")
    assert (notices.started, notices.closed) == (1, 1)


def test_child_started_journals_how_the_launcher_started_the_child() -> None:
    """A warm start reported by the launcher (a standby took the attempt) reaches the journal."""
    rig: Rig

    def crash_after_commit(spawn: FakeSpawn) -> int:
        rig.store.put(complete(4))
        rig.launcher.start_as = ("warm", "standby 10001 (the built-in job), ready")
        return 1

    def finish(spawn: FakeSpawn) -> int:
        rig.store.final_complete = True
        return 0

    rig = make_rig([crash_after_commit, finish])
    assert rig.supervisor.run() == 0
    started = rig.events("child_started")
    assert [(e["start"], e["why"]) for e in started] == [
        ("cold", ""),
        ("warm", "standby 10001 (the built-in job), ready"),
    ]


def test_notifier_ready_before_first_spawn_then_status() -> None:
    """READY=1 precedes the first spawn; STATUS= follows the run; STOPPING=1 ends it."""
    rig: Rig

    def crash(spawn: FakeSpawn) -> int:
        return 1

    def finish(spawn: FakeSpawn) -> int:
        rig.store.final_complete = True
        return 0

    rig = make_rig([crash, finish])
    assert rig.supervisor.run() == 0

    at_first_spawn = rig.launcher.seen[0].notifier_messages
    assert at_first_spawn, "nothing was sent before the first spawn"
    assert at_first_spawn[0].startswith("READY=1\n")
    statuses = rig.notifier.statuses
    assert "attempt 1: starting from scratch" in statuses
    # The first failure since progress restarts at once (restart.first_failure).
    assert any(s.startswith("restarting at once") and "crash" in s for s in statuses), statuses
    assert statuses[-1].startswith("complete:"), statuses
    assert rig.notifier.messages[-1] == "STOPPING=1"
    assert sum(m.startswith("READY=1") for m in rig.notifier.messages) == 1


def test_cuda_oom_persists_halved_micro_batch() -> None:
    """After a cuda_oom, state.json and the next child carry micro-batch/2 and accumulation*2."""
    rig: Rig

    def oom(spawn: FakeSpawn) -> int:
        rig.evidence.by_attempt[1] = Evidence(
            error_kind="cuda_oom",
            error_type="torch.OutOfMemoryError",
            error_message="CUDA out of memory. Tried to allocate 2.00 GiB",
            error_step=3,
        )
        return 1

    def finish(spawn: FakeSpawn) -> int:
        rig.store.final_complete = True
        return 0

    rig = make_rig([oom, finish])
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
    job = rig.run_dir.jobs[-1]
    assert job.overrides.per_device_train_batch_size == MICRO_BATCH // 2
    launch = rig.events("launch")[1]
    assert launch["gradient_accumulation_steps"] == 2


def test_ctrl_c_forwards_sigterm_and_exits_zero_once_the_child_saved() -> None:
    """SIGINT reaches the child as SIGTERM; its exit 75 ends the run with 0, no failure."""
    rig: Rig

    def interrupted(spawn: FakeSpawn) -> int:
        rig.signals.deliver("SIGINT")  # queued before the child's exit, as in real life
        rig.store.put(complete(3))
        return EXIT_PREEMPTED

    rig = make_rig([interrupted])
    assert rig.supervisor.run() == 0
    (spawn,) = rig.launcher.spawns
    assert (spawn.pid, signal.SIGTERM) in rig.launcher.signals
    assert rig.events("preempt_requested")[0]["signal"] == "SIGINT"
    assert rig.events("failure") == []
    (preempted,) = rig.events("preempted")
    assert preempted["checkpoint"] == 3
    assert rig.journal.states[-1].mode == "preempted"


def test_another_supervisor_on_the_output_dir_is_refused() -> None:
    """A lock held by a live supervisor is a LockedError; nothing is spawned."""
    from supervisor.errors import LockedError

    rig = make_rig([])
    rig.lock.holder = 777
    assert isinstance(rig.supervisor.shell.peers, FakePeers)
    rig.supervisor.shell.peers.supervisor = True
    with pytest.raises(LockedError, match="another trainwarden supervisor"):
        rig.supervisor.run()
    assert rig.launcher.spawns == []


def test_orphan_save_in_progress_is_not_quarantined() -> None:
    """While waiting for an orphan, its half-written emergency checkpoint is left alone."""
    rig = make_rig([])
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
def orphan_rig() -> OrphanRigFactory:
    """Make rigs whose supervisor found an orphan holding the lock, which it then released."""

    def make(fates: list[Callable[[FakeSpawn], int]]) -> Rig:
        rig = make_rig(fates)
        rig.store.put(complete(4))
        disk = Disk(free=100 << 30, total=200 << 30)
        rig.supervisor._process(Started(rig.store.inventory(), disk, orphan_pid=4321))
        assert rig.supervisor.state.mode is Mode.WAITING_ORPHAN
        return rig

    return make


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
