"""The mirror wired into the main loop, over ``FakeMirror``: no storage, no file, no thread.

What the loop promises (docs/mirror.md, "How the supervisor uses it"): a probe
before anything is created; a restore, holding the lock with no orphan, before
the first inventory; every new newest checkpoint, every state.json and a
complete final/ handed to the worker; the worker's outcomes journaled from the
loop's queue; the lag in STATUS= and state.json; and a drain on the way out
whose result is journaled. Retention spares the checkpoint being uploaded, disk
pressure does not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from supervisor.config import parse_config
from supervisor.core.model import (
    Disk,
    Inventory,
    InventoryChanged,
    Remove,
    SignalReceived,
    Started,
    State,
)
from supervisor.core.policy import decide
from supervisor.loop import Shell, Supervisor
from supervisor.mirror_sync import MIN_DRAIN_SECONDS
from supervisor.shell.mirror import MirrorError, ProbeFailed, RestoreReport
from supervisor.shell.mirror.worker import DrainResult, Job, JobKind
from supervisor.shell.preemption_notice import PreemptionNotice, Provider
from supervisor.shell.testing import (
    FakeCheckpointStore,
    FakeDisk,
    FakeEvidence,
    FakeHeartbeat,
    FakeJournal,
    FakeLock,
    FakeMirror,
    FakeNotices,
    FakeNotifier,
    FakeObserver,
    FakePeers,
    FakeRunDir,
    FakeSignals,
    FakeSpawn,
    FakeWatchers,
)
from tests.unit.test_loop import OUTPUT_DIR, FakeClock, ScriptedLauncher, complete
from trainer_child.protocol import ENV_RESUME_FROM, EXIT_PREEMPTED, Layout

GRACE = 30.0
Fate = Callable[[FakeSpawn], int]


@dataclasses.dataclass
class Rig:
    supervisor: Supervisor
    launcher: ScriptedLauncher
    store: FakeCheckpointStore
    journal: FakeJournal
    notifier: FakeNotifier
    mirror: FakeMirror
    watchers: FakeWatchers
    signals: FakeSignals
    run_dir: FakeRunDir
    lock: FakeLock
    peers: FakePeers
    clock: FakeClock

    def events(self, name: str) -> list[dict[str, object]]:
        return [e for e in self.journal.entries if e["event"] == name]

    def commit(self, step: int) -> None:
        """The child commits ``checkpoint-N`` and the watcher notices it."""
        self.store.put(complete(step))
        self.watchers.made[0][1].trigger()

    def finish(self, step: int) -> int:
        self.store.put(complete(step))
        self.store.final_complete = True
        return 0


def make_rig(fates: list[Fate], *, lock: FakeLock | None = None) -> Rig:
    config = parse_config(
        {
            "output_dir": str(OUTPUT_DIR),
            "train": {"sft": {"max_steps": 8, "save_steps": 4}},
            "retention": {"keep_last": 1, "keep_best": False},
            "preemption": {"grace": GRACE},
            "mirror": {"url": "file:///nonexistent/trainwarden-unit/mirror"},
            # The scripted children end at once: the backoff gives the loop the
            # ticks a training attempt would, in which the metrics see the lag.
            "restart": {"first_failure": "backoff"},
        }
    )
    clock = FakeClock()
    launcher = ScriptedLauncher(clock, fates)
    shell = Shell(
        launcher=launcher,
        store=FakeCheckpointStore(),
        journal=FakeJournal(wall_clock=lambda: clock.now),
        disk=FakeDisk(),
        notifier=FakeNotifier(),
        run_dir=FakeRunDir(OUTPUT_DIR),
        lock=lock or FakeLock(),
        peers=FakePeers(),
        heartbeat=FakeHeartbeat(clock=clock),
        evidence=FakeEvidence(),
        watcher=FakeWatchers(),
        observer=FakeObserver(),
        mirror=FakeMirror(),
        signals=FakeSignals(),
        clock=clock,
        wall=lambda: 1_700_000_000.0 + clock.now,
        rand=lambda: 0.5,
    )
    for seam, fake in (
        (shell.store, FakeCheckpointStore),
        (shell.journal, FakeJournal),
        (shell.notifier, FakeNotifier),
        (shell.mirror, FakeMirror),
        (shell.watcher, FakeWatchers),
        (shell.signals, FakeSignals),
        (shell.run_dir, FakeRunDir),
        (shell.lock, FakeLock),
        (shell.peers, FakePeers),
    ):
        assert isinstance(seam, fake)
    return Rig(
        Supervisor(config, shell),
        launcher,
        shell.store,  # type: ignore[arg-type]
        shell.journal,  # type: ignore[arg-type]
        shell.notifier,  # type: ignore[arg-type]
        shell.mirror,  # type: ignore[arg-type]
        shell.watcher,  # type: ignore[arg-type]
        shell.signals,  # type: ignore[arg-type]
        shell.run_dir,  # type: ignore[arg-type]
        shell.lock,  # type: ignore[arg-type]
        shell.peers,  # type: ignore[arg-type]
        clock,
    )


CHECKPOINT_4 = Job(JobKind.CHECKPOINT, 4)
CHECKPOINT_8 = Job(JobKind.CHECKPOINT, 8)


# --- start ------------------------------------------------------------------------------


def test_a_failed_probe_stops_the_start_before_anything_is_created() -> None:
    """ProbeFailed (exit 78) propagates before the run dir, the lock or a child exist."""
    rig = make_rig([])
    rig.mirror.probe_error = ProbeFailed("mirror s3://bucket/run: cannot write a probe object")
    with pytest.raises(ProbeFailed) as caught:
        rig.supervisor.run()
    assert caught.value.exit_code == 78
    assert rig.run_dir.prepared == 0
    assert rig.lock.acquires == 0
    assert rig.launcher.spawns == []
    assert rig.mirror.restores == 0


def test_restore_runs_before_the_first_inventory_and_sets_the_resume_point() -> None:
    """A checkpoint brought back from the remote is what the first attempt resumes from."""
    rig = make_rig([])
    rig.launcher.fates.append(lambda spawn: rig.finish(8))
    rig.mirror.restore_entries = (complete(6),)
    rig.mirror.restore_report = RestoreReport(local_newest=None, remote_newest=6, downloaded=6)
    assert rig.supervisor.run() == 0
    (spawn,) = rig.launcher.spawns
    assert spawn.env[ENV_RESUME_FROM] == str(Layout(OUTPUT_DIR).checkpoint(6))
    (restored,) = rig.events("mirror_restored")
    assert (restored["downloaded"], restored["remote_newest"]) == (6, 6)
    assert restored["url"] == rig.mirror.url
    assert rig.mirror.submitted[0] == Job(JobKind.PRUNE), "a predecessor's partial is cleaned"


def test_a_run_complete_remotely_is_complete_here_without_a_child() -> None:
    """final/ restored: exit 0, nothing trained, final/ handed back (already remote)."""
    rig = make_rig([])
    rig.mirror.restore_final = True
    rig.mirror.restore_report = RestoreReport(
        local_newest=None, remote_newest=8, final_restored=True, remote_final_complete=True
    )
    assert rig.supervisor.run() == 0
    assert rig.launcher.spawns == []
    assert "already_complete" in rig.journal.events()
    assert Job(JobKind.FINAL) in rig.mirror.landed


def test_restored_state_json_is_read_again() -> None:
    """state.json that came from the remote (overrides, budget) is what the run continues."""
    rig = make_rig([])
    rig.launcher.fates.append(lambda spawn: rig.finish(8))
    previous_attempts = 5

    def restore_state(store: object) -> RestoreReport:
        from trainer_child.protocol import RunStateFile

        rig.journal.previous = RunStateFile(attempts=previous_attempts)
        return RestoreReport(local_newest=None, remote_newest=None, state_restored=True)

    rig.mirror.restore = restore_state  # type: ignore[method-assign]
    assert rig.supervisor.run() == 0
    assert rig.launcher.spawns[0].env["TRAINWARDEN_ATTEMPT"] == str(previous_attempts + 1)


def test_no_restore_while_an_orphan_child_trains_on_the_disk() -> None:
    """With an orphan holding the lock, restore is skipped; uploads still start."""

    class ReleasedLater(FakeLock):
        def acquire(self) -> bool:
            if self.acquires >= 2:
                self.holder = None
            return super().acquire()

    lock = ReleasedLater()
    lock.holder = 4321
    rig = make_rig([], lock=lock)
    rig.peers.orphan = 4321
    rig.launcher.fates.append(lambda spawn: rig.finish(8))
    assert rig.supervisor.run() == 0
    assert rig.mirror.restores == 0
    assert "orphan_found" in rig.journal.events()
    assert CHECKPOINT_8 in rig.mirror.landed


def test_restore_failing_with_nothing_local_refuses_to_train_from_scratch() -> None:
    """Storage failing at restore, with no local checkpoint: the start fails (exit 1), no child."""
    rig = make_rig([])
    rig.mirror.restore_error = MirrorError("mirror s3://bucket/run: restore failed (timeout)")
    with pytest.raises(MirrorError):
        rig.supervisor.run()
    assert rig.launcher.spawns == []
    assert rig.lock.releases == 1
    assert rig.mirror.closed


def test_restore_failing_with_a_local_checkpoint_carries_on_from_it() -> None:
    """Storage failing at restore with a valid local checkpoint: journaled, training resumes."""
    rig = make_rig([])
    rig.store.put(complete(4))
    rig.launcher.fates.append(lambda spawn: rig.finish(8))
    rig.mirror.restore_error = MirrorError("mirror s3://bucket/run: restore failed (timeout)")
    assert rig.supervisor.run() == 0
    (failed,) = rig.events("mirror_restore_failed")
    assert "timeout" in str(failed["error"])
    assert rig.launcher.spawns[0].env[ENV_RESUME_FROM].endswith("checkpoint-4")


# --- while training ---------------------------------------------------------------------


def test_commits_state_and_final_are_uploaded_and_journaled() -> None:
    """Each new newest checkpoint, state.json and final/ go to the worker; DONE is journaled."""
    rig = make_rig([])

    def commit_then_crash(spawn: FakeSpawn) -> int:
        rig.commit(4)
        return 1

    rig.launcher.fates += [commit_then_crash, lambda spawn: rig.finish(8)]
    rig.mirror.auto_land = True
    assert rig.supervisor.run() == 0

    kinds = {job.kind for job in rig.mirror.submitted}
    assert kinds == {JobKind.PRUNE, JobKind.CHECKPOINT, JobKind.STATE, JobKind.FINAL}
    checkpoints = [j.step for j in rig.mirror.submitted if j.kind is JobKind.CHECKPOINT]
    assert checkpoints == [4, 8]
    uploaded = [(e["what"], e.get("step")) for e in rig.events("mirror_uploaded")]
    assert uploaded == [("checkpoint", 4), ("checkpoint", 8), ("final", None)]
    (drained,) = rig.events("mirror_drained")
    assert drained["complete"] is True
    assert drained["newest_is_remote"] is True
    final_state = rig.journal.states[-1]
    assert final_state.completed
    assert final_state.mirror_lag == 0
    assert final_state.mirror_status == "remote: checkpoint-8, up to date"


def test_an_outage_shows_in_status_and_state_and_is_journaled_once() -> None:
    """Storage down: one mirror_retrying, the lag in STATUS= and state.json; recovery journaled."""
    rig = make_rig([])

    def commit_while_down(spawn: FakeSpawn) -> int:
        rig.commit(4)
        return 1

    def storage_back(spawn: FakeSpawn) -> int:
        rig.mirror.reachable = True
        return rig.finish(8)

    rig.launcher.fates += [commit_while_down, storage_back]
    rig.mirror.auto_land = True
    rig.mirror.reachable = False
    assert rig.supervisor.run() == 0

    (retrying,) = rig.events("mirror_retrying")
    assert retrying["error"] == "EndpointConnectionError: Could not connect"
    behind = [s for s in rig.notifier.statuses if "1 behind, retrying in" in s]
    assert behind, rig.notifier.statuses
    lag = f"; remote: no checkpoint yet, 1 behind, retrying in 8s ({retrying['error']})"
    assert behind[0].endswith(lag)
    lagging = [s for s in rig.journal.states if s.mirror_lag]
    assert lagging
    assert lagging[0].mirror_status is not None
    assert "1 behind" in lagging[0].mirror_status
    assert rig.events("mirror_recovered")
    assert rig.journal.states[-1].mirror_lag == 0
    observer = rig.supervisor.shell.observer
    assert isinstance(observer, FakeObserver)
    lags = [view.mirror_lag_checkpoints for view in observer.views]
    assert 1 in lags, "the metrics never saw the lag"
    assert lags[-1] == 0


def test_the_step_being_uploaded_is_spared_by_retention() -> None:
    """keep_last=1: the checkpoint mid-upload stays until its upload ends, then goes."""
    rig = make_rig([])

    def two_commits(spawn: FakeSpawn) -> int:
        rig.commit(4)
        rig.mirror.in_flight = 4
        rig.commit(8)
        return 1

    removed_while_uploading: list[int] = []

    def upload_ended(spawn: FakeSpawn) -> int:
        removed_while_uploading.extend(step for step, _ in rig.store.removed)
        rig.mirror.in_flight = None
        return rig.finish(12)

    rig.launcher.fates += [two_commits, upload_ended]
    assert rig.supervisor.run() == 0
    assert 4 not in removed_while_uploading
    assert 4 in [step for step, _ in rig.store.removed]


# --- on the way out -----------------------------------------------------------------------


def preempt_after_commit(rig: Rig, stop: Callable[[], None]) -> None:
    """Script one attempt: ``stop`` (a signal, the cloud's notice), commit step 3, exit 75."""

    def preempted(spawn: FakeSpawn) -> int:
        stop()
        rig.store.put(complete(3))
        return EXIT_PREEMPTED

    rig.launcher.fates.append(preempted)


def test_preemption_drains_within_the_grace_counted_from_the_signal() -> None:
    """SIGTERM: the emergency checkpoint is uploaded before exit 0; the journal says so."""
    rig = make_rig([])
    preempt_after_commit(rig, lambda: rig.signals.deliver("SIGTERM"))
    assert rig.supervisor.run() == 0
    signalled = rig.supervisor._mirror.signalled_at
    assert signalled is not None
    assert rig.mirror.drains
    assert rig.mirror.drains[0] <= signalled + GRACE
    assert Job(JobKind.CHECKPOINT, 3) in rig.mirror.landed
    (drained,) = rig.events("mirror_drained")
    assert drained["complete"] is True
    assert drained["step"] == drained["newest_local"] == 3
    assert drained["newest_is_remote"] is True
    assert drained["mode"] == "preempted"


def test_a_drain_against_dead_storage_ends_at_its_deadline_and_says_so() -> None:
    """Storage down on the way out: exit 0 after the deadline, complete false, watchdog fed."""
    rig = make_rig([])
    preempt_after_commit(rig, lambda: rig.signals.deliver("SIGTERM"))
    rig.mirror.reachable = False
    pings_before = rig.notifier.pings
    assert rig.supervisor.run() == 0
    (drained,) = rig.events("mirror_drained")
    assert drained["complete"] is False
    assert drained["newest_is_remote"] is False
    assert "upload checkpoint 3" in drained["left"]  # type: ignore[operator]
    assert float(drained["seconds"]) >= MIN_DRAIN_SECONDS  # type: ignore[arg-type]
    assert rig.notifier.pings > pings_before
    assert rig.mirror.closed


@pytest.mark.parametrize("notice_after", [False, True], ids=["signal", "signal_then_notice"])
def test_a_second_signal_ends_the_drain(notice_after: bool) -> None:
    """Ctrl-C twice: the loop stops waiting for the mirror at once.

    Also when the cloud's notice came after the first signal: that notice began
    nothing, so it promises no signal, and the second Ctrl-C is a second one.
    """
    rig = make_rig([])
    notices = FakeNotices()
    rig.supervisor.shell.notices = notices

    def stop() -> None:
        rig.signals.deliver("SIGINT")
        if notice_after:
            notices.deliver(PreemptionNotice(Provider.GCP, "preempted", None, "TRUE"))

    preempt_after_commit(rig, stop)
    rig.mirror.reachable = False
    real_drain = rig.mirror.drain

    def drain_then_interrupt(deadline: float) -> DrainResult:
        result = real_drain(deadline)
        rig.supervisor.queue.put(SignalReceived("SIGINT"))
        return result

    rig.mirror.drain = drain_then_interrupt  # type: ignore[method-assign]
    assert rig.supervisor.run() == 0
    (drained,) = rig.events("mirror_drained")
    assert drained["interrupted"] is True
    assert len(rig.mirror.drains) == 1


def test_the_clouds_sigterm_after_its_notice_does_not_end_the_drain() -> None:
    """Preempted by the notice, storage down: its SIGTERM is expected; a second one ends it."""
    rig = make_rig([])
    notices = FakeNotices()
    rig.supervisor.shell.notices = notices
    preempt_after_commit(
        rig, lambda: notices.deliver(PreemptionNotice(Provider.AWS, "terminate", None, "{}"))
    )
    rig.mirror.reachable = False
    real_drain = rig.mirror.drain
    slices: list[float] = []

    def drain_while_signalled(deadline: float) -> DrainResult:
        slices.append(deadline)
        if len(slices) <= 2:  # the cloud's SIGTERM, then (after a slice) a human's Ctrl-C
            rig.supervisor.queue.put(SignalReceived("SIGTERM" if len(slices) == 1 else "SIGINT"))
        return real_drain(deadline)

    rig.mirror.drain = drain_while_signalled  # type: ignore[method-assign]
    assert rig.supervisor.run() == 0
    assert [e["signal"] for e in rig.events("stop_signal_after_notice")] == ["SIGTERM"]
    (drained,) = rig.events("mirror_drained")
    assert drained["interrupted"] is True
    assert len(slices) == 2, "the first signal must not end the drain, the second must"
    assert (notices.started, notices.closed) == (1, 1)


# --- the policy's one fact about the mirror -------------------------------------------------


def test_retention_spares_an_upload_in_flight_but_disk_pressure_does_not() -> None:
    """Inventory.uploading protects from keep_last; a disk-full prune still takes it."""
    config = parse_config(
        {
            "output_dir": str(OUTPUT_DIR),
            "train": {"sft": {}},
            "retention": {"keep_last": 1, "keep_best": False},
        }
    ).policy()
    disk = Disk(free=100 << 30, total=200 << 30)
    state, _ = decide(State(config=config), Started(Inventory((complete(4),)), disk), 0.0)
    inventory = Inventory((complete(4), complete(8)), uploading=frozenset({4}))
    state, actions = decide(state, InventoryChanged(inventory), 1.0)
    assert [a for a in actions if isinstance(a, Remove)] == []
    without = dataclasses.replace(inventory, uploading=frozenset())
    _, actions = decide(state, InventoryChanged(without), 2.0)
    assert [a.step for a in actions if isinstance(a, Remove)] == [4]
