"""The pure policy, driven by scripted events: every row of its tables (docs/architecture.md)."""

from __future__ import annotations

import dataclasses
import signal

import pytest

from supervisor.core.classify import Outcome
from supervisor.core.model import (
    Action,
    CheckpointEntry,
    ChildExited,
    ChildSpawned,
    Disk,
    Event,
    Evidence,
    Exit,
    ExtendStop,
    FailureKind,
    FailureNote,
    FreeSpace,
    HeartbeatView,
    Integrity,
    Inventory,
    InventoryChanged,
    Launch,
    Mode,
    Persist,
    PolicyConfig,
    PreemptionNoticed,
    PreviousRun,
    Quarantine,
    Record,
    Remove,
    ResumeRejected,
    SendSignal,
    Signal,
    SignalReceived,
    SpawnFailed,
    Started,
    State,
    Tick,
)
from supervisor.core.policy import (
    OUTCOMES,
    REMEDIES,
    TRANSITIONS,
    IllegalTransition,
    decide,
    hang_limit,
    status_line,
)
from trainer_child.protocol import Overrides, Phase

GB = 1 << 30
BIG_DISK = Disk(free=100 * GB, total=200 * GB)
CONFIG = PolicyConfig(
    max_restarts=5,
    window=3600,
    backoff_initial=1,
    backoff_max=8,
    first_failure_at_once=False,
    no_progress_limit=3,
    keep_last=2,
    keep_best=True,
    hang_timeout=10,
    startup_timeout=60,
    kill_grace=5,
    preemption_grace=30,
    micro_batch=8,
    grad_accum=1,
    keep_every=None,
    disk_reserve=None,
    save_timeout=None,
    require_record=True,
    success_needs_final=True,
    step_guard=True,
)


def ckpt(
    step: int,
    integrity: Integrity = Integrity.COMPLETE,
    *,
    size: int = 100,
    best: int | None = None,
    symlink: bool = False,
) -> CheckpointEntry:
    return CheckpointEntry(
        step=step,
        integrity=integrity,
        size_bytes=size,
        problems=() if integrity is Integrity.COMPLETE else ("broken",),
        symlink=symlink,
        has_record=integrity is not Integrity.INCOMPLETE,
        best_step=best,
    )


def inv(
    *entries: CheckpointEntry, final: bool = False, trash: int = 0, quarantine: int = 0
) -> Inventory:
    return Inventory(
        entries=tuple(sorted(entries, key=lambda e: e.step)),
        final_complete=final,
        trash_bytes=trash,
        quarantine_bytes=quarantine,
    )


def of(actions: list[Action], kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def records(actions: list[Action]) -> list[str]:
    return [a.event for a in actions if isinstance(a, Record)]


class Run:
    """Drive decide() like the loop does, with a manual clock and a fake pid counter."""

    def __init__(self, config: PolicyConfig = CONFIG) -> None:
        self.state = State(config=config)
        self.now = 1000.0
        self.next_pid = 100

    def feed(self, event: Event) -> list[Action]:
        self.state, actions = decide(self.state, event, self.now)
        follow: list[Action] = []
        for action in actions:
            if isinstance(action, Launch):
                self.next_pid += 1
                follow += self.feed(ChildSpawned(action.attempt, self.next_pid))
        return actions + follow

    def start(self, inventory: Inventory | None = None, **kw: object) -> list[Action]:
        inventory = inventory if inventory is not None else inv()
        return self.feed(Started(inventory=inventory, disk=kw.pop("disk", BIG_DISK), **kw))  # type: ignore[arg-type]

    @property
    def pid(self) -> int:
        assert self.state.child is not None
        return self.state.child.pid

    def exit(
        self,
        returncode: int | None = 1,
        sig: int | None = None,
        inventory: Inventory | None = None,
        disk: Disk = BIG_DISK,
        jitter: float = 0.5,
        **evidence: object,
    ) -> list[Action]:
        return self.feed(
            ChildExited(
                attempt=self.state.attempt,
                pid=self.pid,
                returncode=returncode,
                signal=sig,
                evidence=Evidence(**evidence),  # type: ignore[arg-type]
                inventory=inventory if inventory is not None else self.state.inventory,
                disk=disk,
                jitter=jitter,
            )
        )

    def tick(self, advance: float = 0.0, **kw: object) -> list[Action]:
        self.now += advance
        kw.setdefault("disk", BIG_DISK)
        return self.feed(Tick(**kw))  # type: ignore[arg-type]

    def after_backoff(self, **kw: object) -> list[Action]:
        assert self.state.mode is Mode.BACKOFF
        assert self.state.backoff is not None
        return self.tick(self.state.backoff.until - self.now + 0.01, **kw)


def launches(actions: list[Action]) -> list[Launch]:
    return of(actions, Launch)


# --- start -------------------------------------------------------------------------


def test_fresh_start_launches_from_scratch() -> None:
    """A run with no checkpoints starts attempt 1 from scratch at once."""
    run = Run()
    actions = run.start()
    assert launches(actions) == [Launch(1, None, Overrides())]
    assert run.state.mode is Mode.RUNNING
    assert run.state.child is not None


def test_start_resumes_from_newest_valid_and_quarantines_partial() -> None:
    """On start the newest complete checkpoint is used; a newer partial one is quarantined."""
    run = Run()
    actions = run.start(inv(ckpt(2), ckpt(4), ckpt(6, Integrity.INCOMPLETE)))
    assert launches(actions)[0].resume_from == 4
    assert Quarantine(6, "partial: broken") in actions


def test_start_quarantines_corrupt_and_skips_it() -> None:
    """A corrupt newest checkpoint is quarantined and the older valid one resumed."""
    run = Run()
    actions = run.start(inv(ckpt(2), ckpt(4, Integrity.CORRUPT)))
    assert any(isinstance(a, Quarantine) and a.step == 4 for a in actions)
    assert launches(actions)[0].resume_from == 2


def test_symlink_is_never_resumed_from_nor_touched() -> None:
    """A symlink named checkpoint-N is neither resumed from, pruned nor quarantined."""
    run = Run()
    actions = run.start(inv(ckpt(2), ckpt(4), ckpt(8, symlink=True)))
    assert launches(actions)[0].resume_from == 4
    touched = [a for a in actions if isinstance(a, Quarantine | Remove) and a.step == 8]
    assert touched == []


def test_completed_run_exits_zero_without_training() -> None:
    """A valid final/ makes the supervisor exit 0 at once, so restarts never retrain."""
    run = Run()
    actions = run.start(inv(ckpt(10), final=True))
    assert launches(actions) == []
    assert of(actions, Exit) == [Exit(0, of(actions, Exit)[0].reason)]
    assert "already_complete" in records(actions)
    assert run.state.mode is Mode.COMPLETED


def test_started_twice_is_illegal() -> None:
    """A second Started is a bug in the shell and raises."""
    run = Run()
    run.start()
    with pytest.raises(IllegalTransition):
        run.start()


def _in_mode(mode: Mode) -> Run:
    """A Run driven by real events into ``mode``."""
    run = Run()
    if mode is Mode.STARTING:
        return run
    if mode is Mode.WAITING_ORPHAN:
        run.start(inv(ckpt(4)), orphan_pid=4321)
    elif mode is Mode.WAITING_DISK:
        run.start(inv(ckpt(6, size=1000)), disk=Disk(free=10, total=2000))
    elif mode is Mode.COMPLETED:
        run.start(inv(final=True))
    else:
        run.start()
        if mode is Mode.STOPPING:
            run.feed(SignalReceived("SIGTERM"))
        elif mode is Mode.BACKOFF:
            run.exit(1)
        elif mode is Mode.GAVE_UP:
            run.exit(78)
        elif mode is Mode.PREEMPTED:
            run.exit(1)
            run.feed(SignalReceived("SIGTERM"))
    assert run.state.mode is mode
    return run


SAMPLE_EVENTS: dict[type, Event] = {
    Started: Started(inventory=inv(), disk=BIG_DISK),
    ChildSpawned: ChildSpawned(attempt=99, pid=999),
    SpawnFailed: SpawnFailed(attempt=99, message="no such file"),
    ChildExited: ChildExited(99, 999, 1, None, Evidence(), inv(), BIG_DISK),
    InventoryChanged: InventoryChanged(inv()),
    Tick: Tick(disk=BIG_DISK),
    ResumeRejected: ResumeRejected(attempt=99, step=4, problems=("bad",)),
    SignalReceived: SignalReceived("SIGTERM"),
    PreemptionNoticed: PreemptionNoticed("gcp", "preempted"),
}
ILLEGAL = [
    (mode, kind) for mode in Mode for kind in SAMPLE_EVENTS if (mode, kind) not in TRANSITIONS
]


def test_the_transition_table_names_a_handler_for_every_event_a_live_mode_can_meet() -> None:
    """Ticks, inventory notices and stop signals are legal in every mode after start-up."""
    for mode in Mode:
        if mode is Mode.STARTING:
            continue
        for kind in (Tick, InventoryChanged, SignalReceived, PreemptionNoticed):
            assert (mode, kind) in TRANSITIONS, (mode, kind)
    assert set(SAMPLE_EVENTS) == set(Event.__args__)
    assert len(ILLEGAL) > 30


@pytest.mark.parametrize(("mode", "kind"), ILLEGAL, ids=lambda v: getattr(v, "__name__", str(v)))
def test_an_event_not_allowed_in_a_mode_raises_illegal_transition(mode: Mode, kind: type) -> None:
    """Every (mode, event) pair missing from TRANSITIONS raises, and the state is untouched."""
    run = _in_mode(mode)
    before = run.state
    with pytest.raises(IllegalTransition, match=f"{kind.__name__} while {mode.value}"):
        decide(run.state, SAMPLE_EVENTS[kind], run.now)
    assert run.state is before


def test_an_exit_of_a_process_that_is_not_our_child_raises() -> None:
    """A ChildExited for another pid is a shell bug, not a stale event to drop."""
    run = Run()
    run.start()
    stranger = ChildExited(1, run.pid + 1, 1, None, Evidence(), inv(), BIG_DISK)
    with pytest.raises(IllegalTransition, match="not our child"):
        run.feed(stranger)


def test_every_failure_kind_has_one_remedy_and_every_outcome_a_handler() -> None:
    """REMEDIES covers each failure kind (a preemption is not a failure); OUTCOMES each outcome."""
    assert set(REMEDIES) == set(FailureKind) - {FailureKind.PREEMPTED}
    assert set(OUTCOMES) == set(Outcome)


# --- crash, backoff, budget --------------------------------------------------------------


def test_crash_backs_off_then_resumes_from_newest_valid() -> None:
    """A crash is journaled with its kind, backs off, then resumes from the newest valid."""
    run = Run()
    run.start()
    run.feed(InventoryChanged(inv(ckpt(2), ckpt(4))))
    actions = run.exit(1)
    failure = next(a for a in actions if isinstance(a, Record) and a.event == "failure")
    assert failure.fields["kind"] == "crash"
    assert run.state.mode is Mode.BACKOFF
    assert run.tick(0.1) == [] or run.state.mode is Mode.BACKOFF
    relaunch = launches(run.after_backoff())
    assert relaunch == [Launch(2, 4, Overrides())]


def test_backoff_grows_exponentially_and_is_capped() -> None:
    """Consecutive failures double the delay (with jitter fixed) up to backoff_max."""
    run = Run(dataclasses.replace(CONFIG, no_progress_limit=100, max_restarts=100))
    run.start()
    delays = []
    for _ in range(6):
        run.exit(1, jitter=0.5)
        assert run.state.backoff is not None
        delays.append(round(run.state.backoff.until - run.now, 6))
        run.after_backoff()
    assert delays == [1, 2, 4, 8, 8, 8]


def test_jitter_spreads_delay_within_bounds() -> None:
    """Jitter moves the delay within +-25% but never below backoff_initial."""
    for jitter in (0.0, 0.999):
        run = Run()
        run.start()
        run.exit(1)
        run.after_backoff()
        run.exit(1, jitter=jitter)
        assert run.state.backoff is not None
        assert run.state.backoff.until - run.now == pytest.approx(2 * (0.75 + 0.5 * jitter))


def test_restart_budget_exhaustion_gives_up_76() -> None:
    """max_restarts restarts within the window, then the next failure gives up with 76."""
    run = Run(dataclasses.replace(CONFIG, max_restarts=3, no_progress_limit=100))
    run.start()
    for _ in range(3):
        run.exit(1)
        run.after_backoff()
    actions = run.exit(1)
    exits = of(actions, Exit)
    assert exits
    assert exits[0].code == 76
    assert "restart budget spent" in exits[0].reason
    assert run.state.mode is Mode.GAVE_UP


def test_restart_budget_window_slides() -> None:
    """Restarts older than the window no longer count against the budget."""
    run = Run(dataclasses.replace(CONFIG, max_restarts=2, window=100, no_progress_limit=100))
    run.start()
    for _ in range(2):
        run.exit(1)
        run.after_backoff()
    run.now += 200
    run.exit(1)
    assert run.state.mode is Mode.BACKOFF


def test_progress_resets_the_failure_streak() -> None:
    """A newly committed checkpoint ends the streak: backoff starts small again."""
    run = Run()
    run.start()
    run.exit(1)
    run.after_backoff()
    run.exit(1)
    assert run.state.streak.failures == 2
    run.after_backoff()
    actions = run.feed(InventoryChanged(inv(ckpt(2))))
    assert "checkpoint_committed" in records(actions)
    assert run.state.streak.failures == 0
    run.exit(1)
    assert run.state.backoff is not None
    assert run.state.backoff.until == pytest.approx(run.now + 1)


def test_first_failure_since_progress_restarts_at_once_then_backs_off() -> None:
    """first_failure_at_once: no backoff after progress; a repeat without progress backs off."""
    run = Run(dataclasses.replace(CONFIG, first_failure_at_once=True, no_progress_limit=10))
    run.start()
    run.feed(InventoryChanged(inv(ckpt(2))))
    actions = run.exit(1)
    assert launches(actions) == [Launch(2, 2, Overrides())]
    assert run.state.mode is Mode.RUNNING
    pinned = {a.event: a.attempt for a in actions if isinstance(a, Record)}
    assert pinned["failure"] == 1, "the failure belongs to the attempt that failed"
    assert pinned["backoff"] == 1
    assert pinned["launch"] == 2, "the launch belongs to the attempt it starts"
    assert len(run.state.restart_times) == 1, "an immediate restart still counts"
    run.exit(1, jitter=0.5)
    backoff = run.state.backoff
    assert backoff is not None, "a second failure without progress backs off"
    assert backoff.until - run.now == pytest.approx(CONFIG.backoff_initial)
    run.after_backoff()
    run.feed(InventoryChanged(inv(ckpt(2), ckpt(4))))
    assert launches(run.exit(1))[0].resume_from == 4


def test_child_started_says_how_the_child_began() -> None:
    """A warm start (a standby took the attempt) and its reason reach the journal."""
    state, actions = decide(State(config=CONFIG), Started(inventory=inv(), disk=BIG_DISK), 0.0)
    (launch,) = launches(actions)
    spawned = ChildSpawned(launch.attempt, 4242, "warm", "standby 4242 ready")
    state, actions = decide(state, spawned, 0.0)
    (record,) = [a for a in actions if isinstance(a, Record) and a.event == "child_started"]
    assert record.fields == {"pid": 4242, "start": "warm", "why": "standby 4242 ready"}


# --- no progress and poisoned checkpoints ---------------------------------------------------


def test_no_progress_falls_back_once_then_gives_up() -> None:
    """K failures at one step: try the previous checkpoint once, then exit 76 naming the step."""
    run = Run()
    run.start(inv(ckpt(4), ckpt(6)))
    for _ in range(2):
        run.exit(1, error_type="RuntimeError", error_message="boom at 7", error_step=7)
        run.after_backoff()
    actions = run.exit(1, error_type="RuntimeError", error_message="boom at 7", error_step=7)
    assert "fallback" in records(actions)
    assert any(isinstance(a, Quarantine) and a.step == 6 for a in actions)
    relaunch = launches(run.after_backoff())
    assert relaunch[0].resume_from == 4
    # The fallback attempt re-commits step 6 (no newer step) and dies again.
    run.feed(InventoryChanged(inv(ckpt(4), ckpt(6))))
    actions = run.exit(1, error_type="RuntimeError", error_message="boom at 7", error_step=7)
    exits = of(actions, Exit)
    assert exits[0].code == 76
    assert "no progress" in exits[0].reason
    assert "step 7" in exits[0].reason
    assert "boom at 7" in exits[0].reason


def test_resume_failure_quarantines_and_falls_back_to_older() -> None:
    """A child that fails while loading checkpoint-6 gets it quarantined; the next uses 4."""
    run = Run()
    run.start(inv(ckpt(4), ckpt(6)))
    actions = run.exit(1, error_kind="resume", error_type="KeyError", error_message="state")
    assert any(isinstance(a, Quarantine) and a.step == 6 for a in actions)
    relaunch = launches(run.after_backoff())
    assert relaunch[0].resume_from == 4
    assert 6 in run.state.poisoned


def test_resume_rejected_before_launch_uses_the_next_older() -> None:
    """A checkpoint failing re-verification at launch is quarantined; the attempt is retried."""
    run = Run()
    run.state, actions = decide(run.state, Started(inv(ckpt(4), ckpt(6)), BIG_DISK), run.now)
    launch = launches(actions)[0]
    assert launch.resume_from == 6
    run.state, actions = decide(run.state, ResumeRejected(launch.attempt, 6, ("hash",)), run.now)
    assert any(isinstance(a, Quarantine) and a.step == 6 for a in actions)
    assert launches(actions) == [Launch(launch.attempt, 4, Overrides())]


def test_spawn_failure_gives_up_as_config() -> None:
    """A command that cannot be executed is a configuration error (78), not a restart loop."""
    run = Run()
    run.state, actions = decide(run.state, Started(inv(), BIG_DISK), run.now)
    run.state, actions = decide(run.state, SpawnFailed(1, "no such file"), run.now)
    assert of(actions, Exit)[0].code == 78


# --- OOM --------------------------------------------------------------------------------


def test_cuda_oom_halves_micro_batch_and_doubles_accumulation() -> None:
    """cuda_oom: per_device_train_batch_size 8->4, accumulation 1->2, kept in later launches."""
    run = Run()
    run.start()
    actions = run.exit(1, error_kind="cuda_oom", error_type="OutOfMemoryError")
    assert "remediation" in records(actions)
    relaunch = launches(run.after_backoff())[0]
    assert relaunch.overrides == Overrides(
        per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    run.exit(1)
    assert launches(run.after_backoff())[0].overrides == relaunch.overrides


def test_odd_micro_batch_keeps_effective_batch_exactly() -> None:
    """Micro-batch 3 becomes 1 with accumulation x3, so micro x accumulation stays 3."""
    run = Run(dataclasses.replace(CONFIG, micro_batch=3))
    run.start()
    run.exit(1, error_kind="cuda_oom")
    overrides = launches(run.after_backoff())[0].overrides
    assert overrides == Overrides(per_device_train_batch_size=1, gradient_accumulation_steps=3)


def test_oom_at_micro_batch_one_gives_up_with_advice() -> None:
    """OOM at micro-batch 1 cannot be halved: exit 76 saying what to change."""
    run = Run(dataclasses.replace(CONFIG, micro_batch=1))
    run.start()
    actions = run.exit(1, error_kind="cuda_oom")
    exit_ = of(actions, Exit)[0]
    assert exit_.code == 76
    assert "max_length" in exit_.reason


def test_log_evidence_gives_cuda_oom_without_error_json() -> None:
    """'CUDA out of memory' in the log is enough to call it cuda_oom."""
    run = Run()
    run.start()
    actions = run.exit(1, log_cuda_oom=True)
    failure = next(a for a in actions if isinstance(a, Record) and a.event == "failure")
    assert failure.fields["kind"] == "cuda_oom"


def test_sigkill_with_oom_counter_is_host_oom_and_remediated() -> None:
    """SIGKILL + a risen cgroup oom_kill count is host_oom, with the same remediation."""
    run = Run()
    run.start()
    actions = run.exit(None, signal.SIGKILL, cgroup_oom_kill=True)
    failure = next(a for a in actions if isinstance(a, Record) and a.event == "failure")
    assert failure.fields["kind"] == "host_oom"
    assert launches(run.after_backoff())[0].overrides.per_device_train_batch_size == 4


def test_plain_sigkill_is_a_crash() -> None:
    """A SIGKILL with no OOM evidence is a plain crash."""
    run = Run()
    run.start()
    actions = run.exit(None, signal.SIGKILL)
    failure = next(a for a in actions if isinstance(a, Record) and a.event == "failure")
    assert failure.fields["kind"] == "crash"
    assert "SIGKILL" in str(failure.fields["evidence"])


# --- config ---------------------------------------------------------------------------


def test_child_config_error_is_not_retried() -> None:
    """A child exiting 78 gives up with 78 after one attempt, with the child's message."""
    run = Run()
    run.start()
    actions = run.exit(
        78, error_kind="config", error_type="ConfigError", error_message="unknown sft field 'lr'"
    )
    exit_ = of(actions, Exit)[0]
    assert exit_.code == 78
    assert "unknown sft field 'lr'" in exit_.reason
    assert launches(actions) == []


# --- disk ------------------------------------------------------------------------------


def test_disk_full_prunes_to_newest_and_restarts() -> None:
    """ENOSPC: trash/quarantine freed, older checkpoints removed, never the newest valid."""
    run = Run()
    run.start()
    entries = inv(ckpt(2), ckpt(4), ckpt(6), trash=50, quarantine=50)
    run.feed(InventoryChanged(entries))
    actions = run.exit(
        1, inventory=entries, error_kind="disk_full", disk=Disk(free=400, total=1000)
    )
    assert of(actions, FreeSpace)
    removed = {a.step for a in of(actions, Remove)}
    assert removed == {2, 4}
    assert 6 not in {a.step for a in actions if isinstance(a, Quarantine | Remove)}
    assert launches(run.after_backoff())[0].resume_from == 6


def test_disk_full_waits_when_even_pruning_is_not_enough() -> None:
    """When one more checkpoint cannot fit, status says waiting for disk; freed space resumes it."""
    run = Run()
    run.start()
    entries = inv(ckpt(6, size=1000))
    run.feed(InventoryChanged(entries))
    run.exit(1, inventory=entries, error_kind="disk_full", disk=Disk(free=10, total=2000))
    actions = run.after_backoff(disk=Disk(free=10, total=2000))
    assert run.state.mode is Mode.WAITING_DISK
    assert "waiting for disk: need" in run.state.status
    assert launches(actions) == []
    assert launches(run.tick(1, disk=Disk(free=500, total=2000))) == []
    relaunch = launches(run.tick(1, disk=Disk(free=1500, total=2000)))
    assert relaunch[0].resume_from == 6


def test_low_disk_while_running_prunes_early() -> None:
    """Free space below the reserve while training prunes down to the newest valid early."""
    run = Run(dataclasses.replace(CONFIG, keep_last=3))
    run.start()
    run.feed(InventoryChanged(inv(ckpt(2), ckpt(4), ckpt(6))))
    actions = run.tick(1, disk=Disk(free=150, total=1000))
    assert "disk_low" in records(actions)
    assert {a.step for a in of(actions, Remove)} == {2, 4}


# --- hang ------------------------------------------------------------------------------


def beat(step: int, age: float, phase: Phase = Phase.TRAIN) -> HeartbeatView:
    return HeartbeatView(step=step, max_steps=100, phase=phase, age=age, last_step_seconds=0.1)


def test_stale_heartbeat_is_a_hang_dump_stacks_then_term_then_kill() -> None:
    """Heartbeat older than hang.timeout: SIGUSR1 (stacks), SIGTERM, SIGKILL after the grace."""
    run = Run()
    run.start()
    assert run.tick(1, heartbeat=beat(5, 9.0)) == [] or run.state.mode is Mode.RUNNING
    actions = run.tick(1, heartbeat=beat(5, 10.5))
    sent = [a.signal for a in of(actions, SendSignal)]
    assert sent == [Signal.USR1, Signal.TERM]
    assert "hang_detected" in records(actions)
    assert of(run.tick(4, heartbeat=beat(5, 14.5)), SendSignal) == []
    assert [a.signal for a in of(run.tick(1.1, heartbeat=beat(5, 15.6)), SendSignal)] == [
        Signal.KILL
    ]
    actions = run.exit(None, signal.SIGKILL)
    failure = next(a for a in actions if isinstance(a, Record) and a.event == "failure")
    assert failure.fields["kind"] == "hang"
    assert launches(run.after_backoff())


def test_a_stop_signal_after_a_hangs_sigkill_still_stops_the_supervisor() -> None:
    """systemctl stop while a hung child is being killed: exit 0 once it is gone, no restart."""
    run = Run()
    run.start()
    run.tick(1, heartbeat=beat(5, 10.5))
    run.tick(5.1, heartbeat=beat(5, 15.6))  # the grace ran out: SIGKILL sent
    run.feed(SignalReceived("SIGTERM"))
    actions = run.exit(None, signal.SIGKILL)
    assert of(actions, Exit)[0].code == 0
    assert run.state.mode is Mode.PREEMPTED
    assert launches(actions) == []


def test_stopped_child_is_continued_before_the_stack_dump() -> None:
    """A SIGSTOPped child gets SIGCONT first so its handlers can run."""
    run = Run()
    run.start()
    actions = run.tick(1, heartbeat=beat(5, 11), child_stopped=True)
    assert [a.signal for a in of(actions, SendSignal)] == [Signal.CONT, Signal.USR1, Signal.TERM]


def test_load_and_save_phases_get_their_own_allowance() -> None:
    """Loading uses startup_timeout; saving gets a longer allowance than a train step."""
    state = State(config=CONFIG)
    assert hang_limit(state, Phase.LOAD) == 60
    assert hang_limit(state, Phase.TRAIN) == 10
    assert hang_limit(state, Phase.SAVE) == 30
    run = Run()
    run.start()
    assert of(run.tick(20, heartbeat=beat(5, 20, Phase.SAVE)), SendSignal) == []
    assert run.state.mode is Mode.RUNNING


def test_no_heartbeat_yet_counts_from_spawn_against_startup_timeout() -> None:
    """A child that never heartbeats is hung once startup_timeout passes since spawn."""
    run = Run()
    run.start()
    assert of(run.tick(59), SendSignal) == []
    assert of(run.tick(2), SendSignal)


def test_auto_hang_timeout_scales_with_slowest_step() -> None:
    """hang.timeout auto is max(floor, 20 x slowest step seen)."""
    run = Run(dataclasses.replace(CONFIG, hang_timeout=None))
    run.start()
    run.tick(1, heartbeat=HeartbeatView(1, 10, Phase.TRAIN, 0.0, last_step_seconds=30.0))
    assert hang_limit(run.state, Phase.TRAIN) == 600
    assert hang_limit(State(config=run.state.config), Phase.TRAIN) == 300


# --- preemption -----------------------------------------------------------------------


def test_sigterm_forwards_and_exits_zero_after_emergency_checkpoint() -> None:
    """SIGTERM: forward to the child, extend the stop timeout, exit 0 once it exits 75."""
    run = Run()
    run.start()
    pid = run.pid
    actions = run.feed(SignalReceived("SIGTERM"))
    assert SendSignal(pid, Signal.TERM) in actions
    assert of(actions, ExtendStop)
    actions = run.exit(75, inventory=inv(ckpt(7)))
    assert of(actions, Exit) == [Exit(0, of(actions, Exit)[0].reason)]
    assert run.state.mode is Mode.PREEMPTED
    assert "preempted" in records(actions)


def test_second_sigterm_escalates_to_sigkill() -> None:
    """A second SIGTERM during the emergency save SIGKILLs the child."""
    run = Run()
    run.start()
    run.feed(SignalReceived("SIGTERM"))
    actions = run.feed(SignalReceived("SIGTERM"))
    assert [a.signal for a in of(actions, SendSignal)] == [Signal.KILL]


def test_preemption_grace_running_out_escalates_to_sigkill() -> None:
    """No exit within preemption.grace: SIGKILL, then exit 0."""
    run = Run()
    run.start()
    run.feed(SignalReceived("SIGTERM"))
    assert of(run.tick(29), SendSignal) == []
    assert [a.signal for a in of(run.tick(2), SendSignal)] == [Signal.KILL]
    assert of(run.exit(None, signal.SIGKILL), Exit)[0].code == 0


def test_a_preemption_notice_starts_the_emergency_save_and_the_clouds_sigterm_is_expected() -> None:
    """The notice asks for the save; the cloud's SIGTERM after it does not escalate, a 2nd does."""
    run = Run()
    run.start()
    pid = run.pid
    actions = run.feed(PreemptionNoticed("aws", "terminate", deadline_wall_time=1e9))
    assert SendSignal(pid, Signal.TERM) in actions
    assert of(actions, ExtendStop)
    (notice,) = [a for a in of(actions, Record) if a.event == "preemption_notice"]
    assert notice.fields == {"provider": "aws", "action": "terminate", "deadline": 1e9}
    (asked,) = [a for a in of(actions, Record) if a.event == "preempt_requested"]
    assert asked.fields["signal"] == "preemption notice (aws terminate)"

    actions = run.feed(SignalReceived("SIGTERM"))
    assert of(actions, SendSignal) == []
    assert records(actions) == ["stop_signal_after_notice"]
    actions = run.feed(SignalReceived("SIGTERM"))
    assert [a.signal for a in of(actions, SendSignal)] == [Signal.KILL]
    assert of(run.exit(None, signal.SIGKILL), Exit)[0].code == 0


def test_a_notice_after_sigterm_changes_nothing_and_one_between_failures_exits() -> None:
    """Already saving: the notice is only journaled. Backing off: nothing to save, exit 0."""
    run = Run()
    run.start()
    run.feed(SignalReceived("SIGTERM"))
    actions = run.feed(PreemptionNoticed("gcp", "preempted"))
    assert records(actions) == ["preemption_notice"]
    assert of(run.exit(75, inventory=inv(ckpt(7))), Exit)[0].code == 0

    run = Run()
    run.start()
    run.exit(1)
    actions = run.feed(PreemptionNoticed("gcp", "preempted"))
    assert of(actions, Exit)[0].code == 0
    assert run.state.mode is Mode.PREEMPTED


def test_sigterm_while_backing_off_exits_at_once() -> None:
    """With no child alive, SIGTERM ends the supervisor immediately with 0."""
    run = Run()
    run.start()
    run.exit(1)
    actions = run.feed(SignalReceived("SIGTERM"))
    assert of(actions, Exit)[0].code == 0


def test_child_exit_75_without_our_request_resumes_at_once() -> None:
    """A child preempted by someone else resumes immediately and it is not a failure."""
    run = Run()
    run.start()
    actions = run.exit(75, inventory=inv(ckpt(7)))
    assert launches(actions)[0].resume_from == 7
    assert run.state.failures == ()
    # Journaled after the state names attempt 2: each record says whose it is.
    pinned = {a.event: a.attempt for a in actions if isinstance(a, Record)}
    assert pinned["child_preempted"] == pinned["checkpoint_committed"] == 1
    assert pinned["launch"] == 2


def test_exit_zero_without_final_is_a_crash() -> None:
    """Exit 0 with no valid final/ is not success."""
    run = Run()
    run.start()
    actions = run.exit(0)
    assert run.state.mode is Mode.BACKOFF
    assert "failure" in records(actions)


def test_success_exits_zero() -> None:
    """Exit 0 with a valid final/ completes the run."""
    run = Run()
    run.start()
    actions = run.exit(0, inventory=inv(ckpt(10), final=True))
    assert of(actions, Exit)[0].code == 0
    assert run.state.mode is Mode.COMPLETED


# --- retention ------------------------------------------------------------------------


def test_retention_keeps_last_best_and_every_and_protects_resume_point() -> None:
    """After a commit keep the last N, the best and every keep_every; never touch a symlink."""
    config = dataclasses.replace(CONFIG, keep_last=2, keep_best=True, keep_every=10)
    run = Run(config)
    run.start(inv(ckpt(4)))
    assert run.state.child is not None
    assert run.state.child.resume_from == 4
    entries = inv(
        ckpt(2, best=6),
        ckpt(4, best=6),
        ckpt(6, best=6),
        ckpt(8, best=6),
        ckpt(10, best=6),
        ckpt(12, best=6),
        ckpt(14, best=6),
        ckpt(16, symlink=True),
    )
    actions = run.feed(InventoryChanged(entries))
    removed = sorted(a.step for a in of(actions, Remove))
    assert removed == [2, 4, 8]  # kept: 6 (best), 10 (every), 12, 14 (last 2), symlink 16


def test_resume_point_protected_until_a_newer_commit() -> None:
    """The checkpoint a running child resumed from survives pruning until a newer one commits."""
    run = Run(dataclasses.replace(CONFIG, keep_last=1, keep_best=False))
    run.start(inv(ckpt(4)))
    actions = run.feed(InventoryChanged(inv(ckpt(4), ckpt(5, Integrity.INCOMPLETE))))
    assert of(actions, Remove) == []
    assert of(actions, Quarantine) == []  # 5 is in progress while the child lives
    actions = run.feed(InventoryChanged(inv(ckpt(4), ckpt(5))))
    assert [a.step for a in of(actions, Remove)] == [4]


# --- orphan & restore ---------------------------------------------------------------------


def test_orphan_is_asked_to_save_then_resumed_after_it_releases_the_lock() -> None:
    """An orphan child holding the lock gets SIGTERM; no launch until the lock is ours."""
    run = Run()
    actions = run.start(inv(ckpt(4)), orphan_pid=4242)
    assert SendSignal(4242, Signal.TERM) in actions
    assert launches(actions) == []
    assert launches(run.tick(1, orphan_alive=True)) == []
    relaunch = launches(run.tick(1, lock_acquired=True, orphan_alive=False))
    assert relaunch[0].resume_from == 4


def test_orphan_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    """An orphan still alive after preemption.grace is SIGKILLed."""
    run = Run()
    run.start(inv(), orphan_pid=4242)
    actions = run.tick(31, orphan_alive=True)
    assert SendSignal(4242, Signal.KILL) in actions


def test_previous_state_restores_overrides_and_budget() -> None:
    """A restarted supervisor keeps the OOM overrides and counts earlier restarts."""
    previous = PreviousRun(
        attempts=3,
        overrides=Overrides(per_device_train_batch_size=2, gradient_accumulation_steps=4),
        failures=(FailureNote(1, FailureKind.CUDA_OOM, 3, "oom"),),
        restart_ages=(10.0, 20.0),
        consecutive_failures=1,
        poisoned_steps=(),
        gave_up=None,
    )
    run = Run()
    actions = run.start(inv(ckpt(4)), previous=previous)
    launch = launches(actions)[0]
    assert launch.attempt == 4
    assert launch.overrides.per_device_train_batch_size == 2
    assert len(run.state.restart_times) == 2


def test_previous_give_up_resets_budget_when_started_again() -> None:
    """Starting again after a give-up (a human intervened) resets the streak and budget."""
    previous = PreviousRun(
        attempts=5,
        overrides=Overrides(),
        failures=(),
        restart_ages=(1.0, 2.0, 3.0),
        consecutive_failures=3,
        poisoned_steps=(),
        gave_up="no progress",
    )
    run = Run()
    actions = run.start(inv(ckpt(4)), previous=previous)
    assert "resumed_after_give_up" in records(actions)
    assert run.state.restart_times == ()
    assert run.state.streak.failures == 0


def test_status_line_reads_like_a_human_wrote_it() -> None:
    """Status: step, newest checkpoint and restarts by kind."""
    run = Run()
    run.start()
    run.feed(InventoryChanged(inv(ckpt(1000))))
    run.exit(1, error_kind="cuda_oom")
    run.after_backoff()
    run.tick(1, heartbeat=HeartbeatView(1200, 5000, Phase.TRAIN, 0.1))
    assert (
        status_line(run.state) == "step 1200/5000, newest checkpoint 1000, 1 restart (1 cuda_oom)"
    )


def test_terminal_state_ignores_further_events() -> None:
    """After exit nothing more happens."""
    run = Run()
    run.start(inv(final=True))
    assert run.tick(1) == []


def test_disk_full_frees_the_partial_it_just_quarantined() -> None:
    """A failed save's partial folder is quarantined and then freed, or ENOSPC repeats."""
    run = Run()
    run.start()
    entries = inv(ckpt(4), ckpt(8, Integrity.INCOMPLETE))
    run.feed(InventoryChanged(inv(ckpt(4))))
    actions = run.exit(1, inventory=entries, error_kind="disk_full", disk=Disk(10_000, 20_000))
    kinds = [type(a) for a in actions if isinstance(a, Quarantine | FreeSpace)]
    assert kinds.index(Quarantine) < kinds.index(FreeSpace)


def test_waiting_for_disk_status_is_persisted() -> None:
    """A changed waiting-for-disk line is written to state.json, which status reads."""
    run = Run()
    run.start()
    entries = inv(ckpt(6, size=1000))
    run.feed(InventoryChanged(entries))
    run.exit(1, inventory=entries, error_kind="disk_full", disk=Disk(free=10, total=2000))
    run.after_backoff(disk=Disk(free=10, total=2000))
    actions = run.tick(1, disk=Disk(free=20, total=2000))
    assert any(isinstance(a, Persist) for a in actions)
    assert "have 20 B" in run.state.status


def test_failure_step_comes_from_error_report_when_there_is_one() -> None:
    """The journal's failure step is error.json's exact step, not the sampled heartbeat."""
    run = Run()
    run.start()
    run.tick(1, heartbeat=beat(5, 0.1))
    actions = run.exit(1, error_type="RuntimeError", error_message="x", error_step=7)
    failure = next(a for a in actions if isinstance(a, Record) and a.event == "failure")
    assert failure.fields["step"] == 7
