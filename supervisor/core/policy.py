"""Every decision the supervisor makes, as one pure function driven by three tables.

``decide(state, event, now) -> (state, actions)``. It reads no clock (``now`` is
the shell's monotonic time), touches no file and starts no process; the shell
gathers facts into events and executes the returned actions in order.

Where to look (docs/architecture.md, "The policy table", says the same per failure):

- ``TRANSITIONS`` (bottom of this module): which event each mode accepts and who
  handles it. A pair that is not in it raises ``IllegalTransition``: the shell
  delivered something impossible, which is a bug, never data.
- ``OUTCOMES``: how a child's exit is handled once ``classify.classify_exit`` has
  called it a success, a preemption (exit 75) or a failure.
- ``REMEDIES``: what each failure kind repairs before the next attempt (halve the
  micro-batch, free disk, quarantine the checkpoint that would not load, give up).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from supervisor.core import checkpoints, retention
from supervisor.core.backoff import backoff_delay, prune_window, restarts_in_window
from supervisor.core.classify import Outcome, Verdict, classify_exit
from supervisor.core.model import (
    Action,
    Backoff,
    CheckpointStatus,
    Child,
    ChildExited,
    ChildSpawned,
    Event,
    Exit,
    ExtendStop,
    FailureKind,
    FailureNote,
    FreeSpace,
    HeartbeatView,
    Integrity,
    InventoryChanged,
    Launch,
    Mode,
    Orphan,
    Pace,
    Persist,
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
    Status,
    Stopping,
    Streak,
    Tick,
)
from trainer_child.protocol import (
    EXIT_CONFIG,
    EXIT_GAVE_UP,
    EXIT_OK,
    Overrides,
    Phase,
    checkpoint_name,
)

#: Floors for the automatic hang timeout: a slow first step or a long eval must
#: not be mistaken for a hang when nothing has been measured yet.
AUTO_HANG_FLOOR = 300.0
AUTO_HANG_STEP_FACTOR = 20.0
AUTO_SAVE_FACTOR = 3.0
#: Extra stop time asked of systemd beyond the preemption grace.
STOP_SLACK = 15.0


class IllegalTransition(RuntimeError):
    """An event arrived that the current mode cannot accept: a bug, never data."""


Decision = tuple[State, list[Action]]
replace = dataclasses.replace


# --- shared steps --------------------------------------------------------------------


def _finish(
    state: State, mode: Mode, code: int, text: str, prior: list[Action], *, reason: str = ""
) -> Decision:
    """Enter a terminal mode: say why, persist, and exit with ``code``."""
    assert mode.terminal
    state = replace(state, mode=mode, status=text, exit_code=code, child=None)
    return state, [*prior, Status(text), Persist(), Exit(code, reason or text)]


@dataclass(frozen=True)
class GiveUp:
    """Why the run cannot go on without a human, and the exit code that says so."""

    reason: str
    kind: FailureKind
    code: int = EXIT_GAVE_UP


def _give_up(state: State, why: GiveUp, prior: list[Action]) -> Decision:
    state = replace(state, gave_up=why.reason)
    record = Record(
        "gave_up", {"kind": why.kind.value, "reason": why.reason, "exit_code": why.code}
    )
    text = f"gave up: {why.reason}"
    return _finish(state, Mode.GAVE_UP, why.code, text, [*prior, record], reason=why.reason)


def _stop_child(state: State, stopping: Stopping, text: str) -> State:
    """Enter STOPPING: the child has been (or is about to be) asked to go."""
    return replace(state, mode=Mode.STOPPING, stopping=stopping, status=text)


def _observe(state: State, tick: Tick, now: float) -> State:
    """Take in what every tick carries: free disk and the child's heartbeat."""
    state = replace(state, disk=tick.disk)
    if tick.heartbeat is not None:
        state = _track_timing(state, tick.heartbeat, now)
    return state


# --- start -------------------------------------------------------------------------


def _on_started(state: State, event: Started, now: float) -> Decision:
    state = replace(state, inventory=event.inventory, disk=event.disk)
    state, actions = _restore(state, event.previous, now)
    state = replace(state, newest_valid=_newest_valid(state))
    if state.streak.failures:
        state = replace(state, streak=replace(state.streak, base=state.newest_valid))

    done = _already_complete(state, event)
    if done is not None:
        return _finish(state, Mode.COMPLETED, EXIT_OK, done, [*actions, Record("already_complete")])
    if event.orphan_pid is not None:
        state, waiting = _wait_for_orphan(state, event.orphan_pid, now)
        return state, [*actions, *waiting]
    state, housekeeping = _housekeeping(state, child_alive=False)
    state, launch = _launch(state, now, counted=False)
    return state, [*actions, *housekeeping, *launch]


def _already_complete(state: State, event: Started) -> str | None:
    """Say why the run is already done, if it is: final/ (built-in) or exit 0 (command:)."""
    if event.inventory.final_complete:
        return "run already complete: final/ holds a valid adapter; nothing to do"
    previous = event.previous
    if previous is not None and previous.completed and not state.config.success_needs_final:
        return "run already complete: the command exited 0; nothing to do"
    return None


def _restore(state: State, previous: PreviousRun | None, now: float) -> Decision:
    """Carry over what an earlier supervisor's state.json knew."""
    if previous is None:
        return state, []
    state = replace(
        state,
        attempt=previous.attempts,
        overrides=previous.overrides,
        failures=previous.failures,
        poisoned=frozenset(previous.poisoned_steps),
    )
    if previous.gave_up:
        # A human started us again after a give-up: they changed something,
        # so the budget and the streak start afresh (overrides are kept).
        return state, [Record("resumed_after_give_up", {"previous_reason": previous.gave_up})]
    window = state.config.window
    restart_times = tuple(now - age for age in previous.restart_ages if age < window)
    streak = Streak(failures=previous.consecutive_failures)
    return replace(state, restart_times=restart_times, streak=streak), []


def _wait_for_orphan(state: State, pid: int, now: float) -> Decision:
    # A child of a supervisor that died still trains and holds the lock. Ask it
    # for an emergency checkpoint (SIGTERM) rather than racing it; once it exits
    # and the lock is ours, resume with nothing lost.
    text = f"waiting for orphan child {pid} to save and exit"
    orphan = Orphan(pid=pid, deadline=now + state.config.preemption_grace)
    state = replace(state, mode=Mode.WAITING_ORPHAN, orphan=orphan, status=text)
    return state, [
        Record("orphan_found", {"pid": pid}),
        SendSignal(pid, Signal.TERM),
        Status(text),
        Persist(),
    ]


# --- launching ---------------------------------------------------------------------


def _launch(state: State, now: float, *, counted: bool, attempt: int | None = None) -> Decision:
    """Start the next attempt from the newest valid checkpoint, if the disk allows."""
    state, freeing, waiting = _make_room(state)
    if waiting:
        return state, [*freeing, *waiting]
    resume = _newest_valid(state)
    past_end = _resume_past_end(state, resume)
    if past_end is not None:
        return _give_up(state, past_end, freeing)
    state, quarantines = _quarantine_newer_than(state, resume)
    number = attempt if attempt is not None else state.attempt + 1
    restart_times = state.restart_times
    if counted:
        restart_times = (*prune_window(restart_times, now, state.config.window), now)
    where = checkpoint_name(resume) if resume is not None else "scratch"
    text = f"attempt {number}: starting from {where}"
    state = replace(
        state,
        mode=Mode.RUNNING,
        attempt=number,
        launching=number,
        child=None,
        heartbeat=None,
        backoff=None,
        stopping=None,
        restart_times=restart_times,
        status=text,
    )
    fields: dict[str, object] = {
        "resume_from": checkpoint_name(resume) if resume is not None else None,
        "resume_step": resume,
        **_override_fields(state.overrides),
    }
    launch = Launch(number, resume, state.overrides)
    launched = Record("launch", fields, attempt=number)
    return state, [*freeing, *quarantines, launched, Status(text), launch]


def _resume_past_end(state: State, resume: int | None) -> GiveUp | None:
    """Refuse a resume that would train past max_steps (HF takes one more step there).

    With WardenCallback in the child (the built-in job, ``inject_callback``, or a
    commit record proving the script's own) the resume takes no step and lets
    the command finish what it does after training.
    """
    entry = state.inventory.get(resume) if resume is not None else None
    if entry is None or not entry.max_steps or entry.step < entry.max_steps:
        return None
    if state.config.step_guard or entry.has_record:
        return None
    name = checkpoint_name(entry.step)
    reason = (
        f"training reached max_steps {entry.max_steps} ({name}), but the command did not "
        "exit 0 afterwards; a resume from there would train one step past max_steps, so it "
        f"is not restarted. The trained weights are in {name}; set inject_callback: true "
        "(or add WardenCallback) to let trainwarden finish the job"
    )
    return GiveUp(reason, FailureKind.NO_PROGRESS)


def _make_room(state: State) -> tuple[State, list[Action], list[Action]]:
    """Free space for one more checkpoint; return (state, freeing, waiting-for-disk actions)."""
    need = _disk_need(state)
    if state.disk is None or not need or state.disk.free >= need:
        return state, [], []
    state, freeing = _relieve_disk(state, reason="not enough space to start")
    free = _predicted_free(state, freeing)
    if free >= need:
        return state, freeing, []
    text = f"waiting for disk: need {human_size(need)}, have {human_size(free)}"
    state = replace(state, mode=Mode.WAITING_DISK, status=text, child=None)
    return (
        state,
        freeing,
        [
            Record("waiting_for_disk", {"need_bytes": need, "free_bytes": free}),
            Status(text),
            Persist(),
        ],
    )


def _quarantine_newer_than(state: State, resume: int | None) -> Decision:
    """Quarantine complete checkpoints newer than the resume point.

    The new attempt's saves would overwrite them in place; they are suspect
    anyway (we skipped them), so they go to quarantine first.
    """
    if resume is None:
        return state, []
    actions: list[Action] = [
        Quarantine(entry.step, f"newer than resume point {checkpoint_name(resume)}")
        for entry in state.inventory.entries
        if entry.step > resume and not entry.symlink and entry.integrity is Integrity.COMPLETE
    ]
    return _forget(state, {a.step for a in actions if isinstance(a, Quarantine)}), actions


def _on_spawned(state: State, event: ChildSpawned, now: float) -> Decision:
    if state.launching != event.attempt:
        raise IllegalTransition(f"ChildSpawned for attempt {event.attempt} not being launched")
    resume = _newest_valid(state)
    child = Child(pid=event.pid, attempt=event.attempt, resume_from=resume, started_at=now)
    state = replace(state, child=child, launching=None)
    fields = {"pid": event.pid, "start": event.start, "why": event.start_note}
    return state, [Record("child_started", fields), Persist()]


def _on_spawn_failed(state: State, event: SpawnFailed, now: float) -> Decision:
    # The command could not even be executed (missing binary, bad permissions):
    # retrying cannot help, so it is a configuration error.
    state = replace(state, launching=None)
    why = GiveUp(f"could not start the child: {event.message}", FailureKind.CONFIG, EXIT_CONFIG)
    return _give_up(state, why, [])


def _on_resume_rejected(state: State, event: ResumeRejected, now: float) -> Decision:
    reason = "failed re-verification before resume: " + "; ".join(event.problems)
    state = replace(state, poisoned=state.poisoned | {event.step}, launching=None)
    state = _forget(state, {event.step})
    state = replace(state, newest_valid=_newest_valid(state))
    actions: list[Action] = [
        Record("resume_rejected", {"step": event.step, "problems": list(event.problems)}),
        Quarantine(event.step, reason),
    ]
    state, launch = _launch(state, now, counted=False, attempt=event.attempt)
    return state, [*actions, *launch]


# --- child exit --------------------------------------------------------------------


@dataclass(frozen=True)
class Ended:
    """One child's exit, classified, as the outcome handlers and remedies see it."""

    child: Child
    verdict: Verdict
    #: error.json's step is exact; else the last heartbeat's (written at most once a second).
    step: int | None
    #: What every journal record about this exit carries.
    fields: dict[str, object]
    jitter: float
    #: Journal records and housekeeping already decided for this exit, in order.
    prior: list[Action]
    #: The error's own last line, when the child left one (not for a signal death).
    error_line: str | None = None

    @property
    def quarantined_now(self) -> bool:
        """Whether housekeeping just quarantined a folder (a failed save's partial one)."""
        return any(isinstance(action, Quarantine) for action in self.prior)


def _on_exited(state: State, event: ChildExited, now: float) -> Decision:
    child = state.child
    if child is None or child.pid != event.pid:
        raise IllegalTransition(f"ChildExited for pid {event.pid}, which is not our child")
    stopping = state.stopping
    state = replace(state, inventory=event.inventory, disk=event.disk, child=None, stopping=None)
    state, progress = _note_commits(state)
    need = _disk_need(state)
    verdict = classify_exit(
        event.returncode,
        event.signal,
        event.evidence,
        stop_reason=stopping.reason if stopping is not None else None,
        final_complete=event.inventory.final_complete,
        disk_below_need=bool(need) and event.disk.free < need,
        exit_zero_completes=not state.config.success_needs_final,
    )
    state, housekeeping = _housekeeping(state, child_alive=False)
    step = event.evidence.error_step
    if step is None and state.heartbeat is not None:
        step = state.heartbeat.step
    fields: dict[str, object] = {
        "pid": event.pid,
        "returncode": event.returncode,
        "signal": event.signal,
        "step": step,
        "evidence": verdict.evidence,
    }
    ended = Ended(
        child,
        verdict,
        step,
        fields,
        event.jitter,
        [*progress, *housekeeping],
        error_line=event.evidence.error_line,
    )
    if stopping is not None and stopping.requested and verdict.outcome is not Outcome.SUCCESS:
        state, actions = _stopped_on_request(state, ended)
    else:
        state, actions = OUTCOMES[verdict.outcome](state, ended, now)
    # Executed once the state may name the next attempt: what is said of this
    # exit stays with the attempt that ended (``launch`` names its own).
    return state, [_about(action, child.attempt) for action in actions]


def _completed(state: State, ended: Ended, now: float) -> Decision:
    beat = state.heartbeat
    steps = beat.step if beat is not None and beat.step else state.newest_valid
    shown = "?" if steps is None else steps
    text = (
        f"complete: {shown} steps, final/ written"
        if state.config.success_needs_final
        else f"complete: the command exited 0 at step {shown}"
    )
    record = Record("completed", {**ended.fields, "restarts": len(state.failures)})
    return _finish(state, Mode.COMPLETED, EXIT_OK, text, [*ended.prior, record])


def _stopped_on_request(state: State, ended: Ended) -> Decision:
    """We asked the child to stop because a stop signal reached us: now we go too."""
    newest = state.newest_valid
    text = f"stopped on request; newest checkpoint {newest}"
    record = Record("preempted", {**ended.fields, "kind": "preempted", "checkpoint": newest})
    return _finish(state, Mode.PREEMPTED, EXIT_OK, text, [*ended.prior, record])


def _resume_after_preemption(state: State, ended: Ended, now: float) -> Decision:
    # Someone else SIGTERMed the child (e.g. an operator or the VM); it saved an
    # emergency checkpoint and exited 75. Resume at once: this is not a failure.
    record = Record("child_preempted", {**ended.fields, "kind": "preempted"})
    state, launch = _launch(state, now, counted=False)
    return state, [*ended.prior, record, *launch]


@dataclass(frozen=True)
class Failure:
    """One counted failure, as a remedy sees it."""

    note: FailureNote
    ended: Ended

    @property
    def kind(self) -> FailureKind:
        return self.note.kind


def _failed(state: State, ended: Ended, now: float) -> Decision:
    """Count the failure, apply its remedy, then give up or back off."""
    kind = ended.verdict.kind or FailureKind.CRASH
    failure = Failure(
        FailureNote(ended.child.attempt, kind, ended.step, ended.verdict.evidence), ended
    )
    state, actions = _count_failure(state, failure)
    state, fix, why = REMEDIES[kind](state, failure)
    actions += fix
    if why is None:
        state, why = _repeated_startup_failure(state, failure)
    if why is None:
        why = _budget_spent(state, failure, now)
    if why is None and state.streak.failures >= state.config.no_progress_limit:
        state, fallback, why = REMEDIES[FailureKind.NO_PROGRESS](state, failure)
        actions += fallback
    if why is not None:
        return _give_up(state, why, actions)
    return _back_off(state, kind, ended.jitter, now, actions)


def _count_failure(state: State, failure: Failure) -> Decision:
    streak = state.streak
    if streak.failures == 0:
        streak = replace(streak, base=state.newest_valid)
    streak = replace(streak, failures=streak.failures + 1)
    state = replace(state, failures=(*state.failures, failure.note), streak=streak)
    fields = {
        **failure.ended.fields,
        "kind": failure.kind.value,
        "resume_from": failure.ended.child.resume_from,
        "failures_in_a_row": streak.failures,
    }
    return state, [*failure.ended.prior, Record("failure", fields)]


def _repeated_startup_failure(state: State, failure: Failure) -> tuple[State, GiveUp | None]:
    """Give up when two attempts in a row fail the same way before training began.

    A wrong model path, a missing dataset or a script bug at import time fails
    identically every time; restarting it until the budget is spent only hides
    the one line the user needs. "Before training began": no heartbeat past
    ``load`` (a script without the callback never writes one, so for it this
    means the same error line twice from the same checkpoint). A death by a
    signal has no error line and never counts, and neither does a failure whose
    remedy changes the next attempt (an OOM halves the batch).
    """
    beat = state.heartbeat
    line = failure.ended.error_line
    streak = state.streak
    started = beat is not None and beat.phase is not Phase.LOAD
    if not line or started or failure.kind is not FailureKind.CRASH:
        return replace(state, streak=replace(streak, startup_failure=None)), None
    resume = failure.ended.child.resume_from
    signature = (line, resume)
    if streak.startup_failure != signature:
        return replace(state, streak=replace(streak, startup_failure=signature)), None
    where = checkpoint_name(resume) if resume is not None else "a fresh start"
    reason = f"the command failed twice in a row before training began, from {where}, with: {line}"
    return state, GiveUp(reason, failure.kind)


def _budget_spent(state: State, failure: Failure, now: float) -> GiveUp | None:
    used = restarts_in_window(state.restart_times, now, state.config.window)
    if used < state.config.max_restarts:
        return None
    return GiveUp(
        f"restart budget spent: {used} restarts within {state.config.window:.0f}s "
        f"(restart.max_restarts); last failure {failure.kind.value}: {failure.note.evidence}",
        failure.kind,
    )


def _back_off(
    state: State, kind: FailureKind, jitter: float, now: float, prior: list[Action]
) -> Decision:
    """Pause before the next attempt; or, for the first failure since progress, restart now.

    A failure after new progress is most often a one-off (a kill, a lost node,
    a flaky read): every second of backoff is lost training, and with a warm
    standby the restart itself costs well under one (bench/, "warm standby":
    goodput measured both ways). A second failure without progress in between
    is not a one-off: it backs off, from ``backoff_initial`` on.
    """
    config = state.config
    failures = state.streak.failures
    if config.first_failure_at_once:
        if failures <= 1:
            why = Record("backoff", {"seconds": 0.0, "why": "first failure since progress"})
            saying = Status(f"restarting at once after {kind.value}")
            state, launch = _launch(state, now, counted=True)
            return state, [*prior, why, saying, *launch]
        failures -= 1
    delay = backoff_delay(failures, config.backoff_initial, config.backoff_max, jitter)
    text = f"backing off {delay:.0f}s after {kind.value}"
    state = replace(
        state, mode=Mode.BACKOFF, backoff=Backoff(until=now + delay), status=text, heartbeat=None
    )
    return state, [*prior, Record("backoff", {"seconds": round(delay, 3)}), Status(text), Persist()]


def _about(action: Action, attempt: int) -> Action:
    """Pin a journal record to ``attempt`` (see ``Record.attempt``)."""
    if isinstance(action, Record) and action.attempt is None:
        return replace(action, attempt=attempt)
    return action


# --- remedies: one per failure kind ------------------------------------------------------

Remedy = Callable[[State, Failure], tuple[State, list[Action], GiveUp | None]]


def _restart_only(state: State, failure: Failure) -> tuple[State, list[Action], GiveUp | None]:
    """Nothing to repair: the next attempt resumes from the newest valid checkpoint."""
    return state, [], None


def _never_retry(state: State, failure: Failure) -> tuple[State, list[Action], GiveUp | None]:
    """A configuration or data error fails the same way every time: give up with 78."""
    reason = f"configuration or data error: {failure.note.evidence}"
    return state, [], GiveUp(reason, failure.kind, EXIT_CONFIG)


def _halve_micro_batch(state: State, failure: Failure) -> tuple[State, list[Action], GiveUp | None]:
    """Halve the micro-batch and grow accumulation so the effective batch is kept."""
    kind = failure.kind
    micro = state.overrides.per_device_train_batch_size or state.config.micro_batch
    accum = state.overrides.gradient_accumulation_steps or state.config.grad_accum
    if micro <= 0:
        reason = (
            f"{kind.value}: the micro-batch is unknown, so it cannot be halved; set "
            "batch.per_device_train_batch_size in the config for a command: job"
        )
        return state, [], GiveUp(reason, kind)
    if micro == 1:
        reason = (
            f"{kind.value} at per_device_train_batch_size=1: nothing left to halve. "
            "Reduce sft.max_length, enable sft.gradient_checkpointing, use a smaller "
            "model, or give the job more memory"
        )
        return state, [], GiveUp(reason, kind)
    # Largest divisor of micro that is at most half of it keeps micro*accum exact.
    new_micro = max(d for d in range(1, micro // 2 + 1) if micro % d == 0)
    new_accum = accum * (micro // new_micro)
    overrides = Overrides(
        per_device_train_batch_size=new_micro, gradient_accumulation_steps=new_accum
    )
    record = Record(
        "remediation",
        {
            "kind": kind.value,
            "per_device_train_batch_size": [micro, new_micro],
            "gradient_accumulation_steps": [accum, new_accum],
        },
    )
    return replace(state, overrides=overrides), [record], None


def _free_disk(state: State, failure: Failure) -> tuple[State, list[Action], GiveUp | None]:
    """Prune down to the newest valid checkpoint, emptying trash and quarantine first."""
    state, freeing = _relieve_disk(state, reason="disk full")
    if failure.ended.quarantined_now and not any(isinstance(a, FreeSpace) for a in freeing):
        # The failed save's partial folder was quarantined just now, after the
        # inventory was taken: it is the first thing to go, or the next attempt
        # runs into the same ENOSPC beside it.
        freeing.insert(0, FreeSpace("disk full"))
    return state, freeing, None


def _quarantine_resume_point(
    state: State, failure: Failure
) -> tuple[State, list[Action], GiveUp | None]:
    """The checkpoint would not load: quarantine it, so the next attempt takes an older one."""
    bad = failure.ended.child.resume_from
    if bad is None:
        return state, [], None
    state = replace(state, poisoned=state.poisoned | {bad})
    state = _forget(state, {bad})
    state = replace(state, newest_valid=_newest_valid(state))
    return state, [Quarantine(bad, f"failed to resume: {failure.note.evidence}")], None


def _fall_back_once(state: State, failure: Failure) -> tuple[State, list[Action], GiveUp | None]:
    """After K failures without a new checkpoint: try the previous checkpoint once, then give up."""
    newest = _newest_valid(state)
    older = [s for s in _valid_steps(state) if newest is not None and s < newest]
    streak = state.streak
    note = failure.note
    reason = (
        f"no progress: {streak.failures} failures in a row without a checkpoint "
        f"newer than step {streak.base}; last failure at step {note.step}: "
        f"{note.kind.value}: {note.evidence}"
    )
    if streak.fallback_tried or newest is None or not older:
        return state, [], GiveUp(reason, FailureKind.NO_PROGRESS)
    # The newest checkpoint may itself be what kills every attempt (poisoned
    # optimizer state, a bad RNG position): try the one before it, once.
    state = replace(
        state, poisoned=state.poisoned | {newest}, streak=replace(streak, fallback_tried=True)
    )
    actions: list[Action] = [
        Record(
            "fallback",
            {"kind": FailureKind.NO_PROGRESS.value, "from_step": newest, "to_step": older[-1]},
        ),
        Quarantine(newest, f"no progress after {streak.failures} failures from it"),
    ]
    return _forget(state, {newest}), actions, None


# --- watching ----------------------------------------------------------------------


def _on_inventory(state: State, event: InventoryChanged, now: float) -> Decision:
    state = replace(state, inventory=event.inventory)
    state, actions = _note_commits(state)
    # An orphan is alive too: the folder it is writing (its emergency save,
    # asked for by our SIGTERM) is in progress, not partial.
    alive = state.child is not None or state.mode is Mode.WAITING_ORPHAN
    state, housekeeping = _housekeeping(state, child_alive=alive)
    if actions and state.mode is Mode.RUNNING:
        state = replace(state, status=status_line(state))
        housekeeping.append(Status(state.status))
    return state, [*actions, *housekeeping]


def _note_commits(state: State) -> Decision:
    """Notice newly committed checkpoints; a new one ends a failure streak."""
    newest = _newest_valid(state)
    if newest is None or (state.newest_valid is not None and newest <= state.newest_valid):
        return replace(state, newest_valid=newest), []
    entry = state.inventory.get(newest)
    record = Record(
        "checkpoint_committed", {"step": newest, "bytes": entry.size_bytes if entry else None}
    )
    state = replace(state, newest_valid=newest)
    streak = state.streak
    if streak.failures and (streak.base is None or newest > streak.base):
        state = replace(state, streak=Streak())
    return state, [record, Persist()]


def _track_timing(state: State, beat: HeartbeatView, now: float) -> State:
    """Remember the slowest step and save seen, which the automatic hang limits scale with."""
    pace = state.pace
    slowest = pace.slowest_step
    if beat.last_step_seconds is not None:
        slowest = max(slowest or 0.0, beat.last_step_seconds)
    save_started, slowest_save = pace.save_started, pace.slowest_save
    previous = state.heartbeat.phase if state.heartbeat else None
    if beat.phase is Phase.SAVE and previous is not Phase.SAVE:
        save_started = now - beat.age
    elif beat.phase is not Phase.SAVE and previous is Phase.SAVE and save_started is not None:
        slowest_save = max(slowest_save or 0.0, now - beat.age - save_started)
        save_started = None
    pace = Pace(slowest_step=slowest, slowest_save=slowest_save, save_started=save_started)
    return replace(state, heartbeat=beat, pace=pace)


# --- timer, per mode -------------------------------------------------------------------


def _tick_running(state: State, tick: Tick, now: float) -> Decision:
    state = _observe(state, tick, now)
    child = state.child
    if child is None:
        raise IllegalTransition("Tick while running with no child: ChildSpawned never came")
    beat = tick.heartbeat
    phase = beat.phase if beat is not None else Phase.LOAD
    age = beat.age if beat is not None else now - child.started_at
    limit = hang_limit(state, phase)
    if age > limit:
        return _stop_hung_child(
            state, child=child, tick=tick, phase=phase, age=age, limit=limit, now=now
        )
    state, actions = _prune_early(state)
    line = status_line(state)
    if line != state.status:
        state = replace(state, status=line)
        actions.append(Status(line))
    return state, actions


def _stop_hung_child(
    state: State, *, child: Child, tick: Tick, phase: Phase, age: float, limit: float, now: float
) -> Decision:
    """Dump the stacks of a child whose heartbeat went stale, then TERM it (KILL later)."""
    # A SIGSTOPped child cannot even run its signal handlers: continue it so
    # the stack dump and the SIGTERM land.
    signals = [Signal.CONT] if tick.child_stopped else []
    signals += [Signal.USR1, Signal.TERM]
    text = f"child hung in {phase.value} for {age:.0f}s; stopping it"
    stopping = Stopping(FailureKind.HANG, deadline=now + state.config.kill_grace)
    state = _stop_child(state, stopping, text)
    beat = tick.heartbeat
    fields: dict[str, object] = {
        "kind": FailureKind.HANG.value,
        "phase": phase.value,
        "heartbeat_age": round(age, 3),
        "timeout": limit,
        "step": beat.step if beat else None,
        "stopped": tick.child_stopped,
    }
    return state, [
        Record("hang_detected", fields),
        *(SendSignal(child.pid, sig) for sig in signals),
        Status(text),
    ]


def _prune_early(state: State) -> Decision:
    """Free space below ``disk.reserve`` while the child trains, before a save hits ENOSPC."""
    disk = state.disk
    reserve = _disk_reserve(state)
    if disk is None or not reserve or disk.free >= reserve:
        return state, []
    state, freeing = _relieve_disk(state, reason="free space below reserve")
    if not freeing:
        return state, []
    record = Record("disk_low", {"free_bytes": disk.free, "reserve_bytes": reserve})
    return state, [record, *freeing]


def _tick_stopping(state: State, tick: Tick, now: float) -> Decision:
    state = _observe(state, tick, now)
    child, stopping = state.child, state.stopping
    if child is None or stopping is None:
        raise IllegalTransition("Tick while stopping with no child to stop")
    if now < stopping.deadline or stopping.killed:
        return state, []
    state = replace(state, stopping=replace(stopping, killed=True))
    return state, [
        Record("escalated", {"signal": "SIGKILL", "why": "stop grace ran out"}),
        SendSignal(child.pid, Signal.KILL),
    ]


def _tick_backoff(state: State, tick: Tick, now: float) -> Decision:
    state = _observe(state, tick, now)
    if state.backoff is not None and now >= state.backoff.until:
        return _launch(state, now, counted=True)
    return state, []


def _tick_waiting_disk(state: State, tick: Tick, now: float) -> Decision:
    state = _observe(state, tick, now)
    need = _disk_need(state)
    if tick.disk.free >= need:
        return _launch(state, now, counted=True)
    text = f"waiting for disk: need {human_size(need)}, have {human_size(tick.disk.free)}"
    if text == state.status:
        return state, []
    # Persisted too: `trainwarden status` reads state.json, and a failed write
    # (ENOSPC, likely here) is retried by the journal.
    return replace(state, status=text), [Status(text), Persist()]


def _tick_waiting_orphan(state: State, tick: Tick, now: float) -> Decision:
    state = _observe(state, tick, now)
    if tick.lock_acquired:
        return _orphan_gone(state, now)
    orphan = state.orphan
    if orphan is None or not tick.orphan_alive or now < orphan.deadline or orphan.killed:
        return state, []
    state = replace(state, orphan=replace(orphan, killed=True))
    return state, [
        Record("escalated", {"signal": "SIGKILL", "pid": orphan.pid}),
        SendSignal(orphan.pid, Signal.KILL),
    ]


def _orphan_gone(state: State, now: float) -> Decision:
    state = replace(state, orphan=None)
    if state.inventory.final_complete:
        # The orphan finished the run before it exited: nothing is left to train.
        text = "run complete: the orphan child wrote final/ before it exited"
        records: list[Action] = [Record("orphan_gone"), Record("already_complete")]
        return _finish(state, Mode.COMPLETED, EXIT_OK, text, records)
    state, housekeeping = _housekeeping(state, child_alive=False)
    state, launch = _launch(state, now, counted=False)
    return state, [Record("orphan_gone"), *housekeeping, *launch]


def hang_limit(state: State, phase: Phase) -> float:
    """Seconds of heartbeat silence tolerated in ``phase`` before calling it a hang."""
    config = state.config
    if phase is Phase.LOAD:
        return config.startup_timeout
    train = config.hang_timeout
    if train is None:
        train = max(AUTO_HANG_FLOOR, AUTO_HANG_STEP_FACTOR * (state.pace.slowest_step or 0.0))
    if phase is Phase.TRAIN:
        return train
    # save, eval and the final save: a big checkpoint to a slow disk or a long
    # evaluation legitimately outlasts a training step by far.
    if config.save_timeout is not None:
        save = config.save_timeout
    else:
        save = max(AUTO_SAVE_FACTOR * train, 10.0 * (state.pace.slowest_save or 0.0))
    if phase is Phase.DONE:
        # After train() a script may do anything without a heartbeat: save a
        # merged model, evaluate, push to the hub; allow it as long as a start.
        return max(save, config.startup_timeout)
    return save


# --- stop signals (SIGTERM, SIGINT, SIGHUP) ------------------------------------------------


#: A stop signal, or the cloud's notice that one is coming.
StopRequest = SignalReceived | PreemptionNoticed


def _on_stop_signal(state: State, event: StopRequest, now: float) -> Decision:
    """Ask our child for an emergency checkpoint; a second signal (or a killed child) escalates.

    The cloud's preemption notice starts the same stop before its SIGTERM; that
    SIGTERM, when it follows, is expected and does not count as a second signal.
    """
    child, stopping = state.child, state.stopping
    if child is None:
        return _stop_at_once(state, event, now)
    notice = _notice_records(event)
    if stopping is not None and (stopping.requested or stopping.killed):
        if notice:
            return state, notice  # already saving (or killed): the notice changes nothing
        if stopping.noticed:
            state = replace(state, stopping=replace(stopping, noticed=False))
            return state, [Record("stop_signal_after_notice", {"signal": event.name})]
        # Once the child is gone, so are we: also after a hang's SIGKILL, which
        # had not been asked for by a signal (else the exit would restart).
        state = replace(state, stopping=replace(stopping, killed=True, requested=True))
        return state, [
            Record("escalated", {"signal": "SIGKILL", "why": f"second {event.name}"}),
            SendSignal(child.pid, Signal.KILL),
        ]
    grace = state.config.preemption_grace
    deadline = now + grace
    if stopping is not None:
        deadline = min(deadline, stopping.deadline)
    reason = stopping.reason if stopping is not None else FailureKind.PREEMPTED
    text = "stopping: child is writing an emergency checkpoint"
    request = Stopping(reason, deadline, requested=True, noticed=bool(notice))
    state = _stop_child(state, request, text)
    return state, [
        *notice,
        Record("preempt_requested", {"kind": "preempted", "signal": event.name}),
        ExtendStop(grace + STOP_SLACK),
        SendSignal(child.pid, Signal.TERM),
        Status(text),
        Persist(),
    ]


def _notice_records(event: StopRequest) -> list[Action]:
    """The journal line of a preemption notice (none for a plain signal)."""
    if not isinstance(event, PreemptionNoticed):
        return []
    fields = {"provider": event.provider, "action": event.action}
    return [Record("preemption_notice", {**fields, "deadline": event.deadline_wall_time})]


def _stop_at_once(state: State, event: StopRequest, now: float) -> Decision:
    """No child of ours is running: there is nothing to save, so exit 0 now."""
    text = f"stopped by {event.name} while {state.mode.value}"
    records = [*_notice_records(event), Record("stopped", {"signal": event.name})]
    return _finish(state, Mode.PREEMPTED, EXIT_OK, text, records)


def _ignore(state: State, event: Event, now: float) -> Decision:
    """A terminal mode: the loop is exiting; late ticks, notices and signals change nothing."""
    return state, []


# --- checkpoints, retention, disk --------------------------------------------------------


def _valid_steps(state: State) -> list[int]:
    return checkpoints.valid_steps(state.inventory, exclude=state.poisoned)


def _newest_valid(state: State) -> int | None:
    return checkpoints.newest_valid(state.inventory, exclude=state.poisoned)


def _forget(state: State, steps: set[int]) -> State:
    """Drop entries we just acted on, so the next decision does not act twice."""
    if not steps:
        return state
    entries = tuple(e for e in state.inventory.entries if e.step not in steps)
    return replace(state, inventory=replace(state.inventory, entries=entries))


def _housekeeping(state: State, *, child_alive: bool) -> Decision:
    """Quarantine what can never be resumed from, then prune by retention."""
    newest = _newest_valid(state)
    actions: list[Action] = []
    for entry in state.inventory.entries:
        status = checkpoints.status_of(entry, newest, child_alive)
        if status is CheckpointStatus.CORRUPT:
            actions.append(Quarantine(entry.step, "corrupt: " + "; ".join(entry.problems)))
        elif status is CheckpointStatus.PARTIAL:
            problems = entry.problems or ("incomplete",)
            actions.append(Quarantine(entry.step, "partial: " + "; ".join(problems)))
    state = _forget(state, {a.step for a in actions if isinstance(a, Quarantine)})
    doomed = retention.select_for_removal(
        state.inventory,
        keep_last=state.config.keep_last,
        keep_best=state.config.keep_best,
        keep_every=state.config.keep_every,
        protected=_protected(state) | state.inventory.uploading,
        exclude=state.poisoned,
    )
    actions += [Remove(step, "retention") for step in doomed]
    return _forget(state, set(doomed)), actions


def _protected(state: State) -> frozenset[int]:
    newest = _newest_valid(state)
    protected = {newest} if newest is not None else set()
    child = state.child
    # The checkpoint a running child resumed from stays until a newer one commits.
    if (
        child is not None
        and child.resume_from is not None
        and (newest is None or newest <= child.resume_from)
    ):
        protected.add(child.resume_from)
    return frozenset(protected)


def _relieve_disk(state: State, *, reason: str) -> Decision:
    """Free space: trash and quarantine first, then every valid checkpoint but the newest."""
    actions: list[Action] = []
    if state.inventory.trash_bytes or state.inventory.quarantine_bytes:
        actions.append(FreeSpace(reason))
    doomed = retention.select_for_removal(
        state.inventory,
        keep_last=1,
        keep_best=False,
        keep_every=None,
        protected=_protected(state),
        exclude=state.poisoned,
        aggressive=True,
    )
    actions += [Remove(step, f"disk pressure: {reason}") for step in doomed]
    return state, actions


def _predicted_free(state: State, freeing: list[Action]) -> int:
    free = state.disk.free if state.disk else 0
    for action in freeing:
        if isinstance(action, FreeSpace):
            free += state.inventory.trash_bytes + state.inventory.quarantine_bytes
        elif isinstance(action, Remove):
            entry = state.inventory.get(action.step)
            free += entry.size_bytes if entry else 0
    return free


def _disk_need(state: State) -> int:
    """Bytes one more checkpoint needs, estimated from the largest seen (0 if none)."""
    return checkpoints.estimated_checkpoint_bytes(state.inventory)


def _disk_reserve(state: State) -> int:
    if state.config.disk_reserve is not None:
        return state.config.disk_reserve
    return checkpoints.auto_reserve(state.inventory)


# --- status ------------------------------------------------------------------------


def status_line(state: State) -> str:
    """One human line, e.g. ``step 1200/5000, newest checkpoint 1000, 2 restarts (1 cuda_oom)``."""
    beat: HeartbeatView | None = state.heartbeat
    parts = []
    if beat is not None:
        total = f"/{beat.max_steps}" if beat.max_steps else ""
        parts.append(f"step {beat.step}{total}")
        if beat.phase not in (Phase.TRAIN,):
            parts[-1] += f" ({beat.phase.value})"
    else:
        parts.append("loading")
    newest = state.newest_valid
    parts.append(f"newest checkpoint {newest}" if newest is not None else "no checkpoint yet")
    if state.failures:
        counts = Counter(f.kind.value for f in state.failures)
        kinds = ", ".join(f"{n} {k}" for k, n in counts.most_common())
        plural = "s" if len(state.failures) != 1 else ""
        parts.append(f"{len(state.failures)} restart{plural} ({kinds})")
    else:
        parts.append("0 restarts")
    return ", ".join(parts)


def _override_fields(overrides: Overrides) -> dict[str, object]:
    return {k: v for k, v in overrides.model_dump().items() if v is not None}


def human_size(n: int) -> str:
    """Bytes for people: ``512 B``, ``1.5 MiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


# --- the tables --------------------------------------------------------------------------

Handler = Callable[[State, Any, float], Decision]

#: How an exit is handled once classified (a stop we were asked for comes first).
OUTCOMES: Mapping[Outcome, Callable[[State, Ended, float], Decision]] = MappingProxyType(
    {
        Outcome.SUCCESS: _completed,
        Outcome.PREEMPTED: _resume_after_preemption,
        Outcome.FAILED: _failed,
    }
)

#: What each failure kind repairs before the backoff; a GiveUp ends the run instead.
#: PREEMPTED is not a failure (see OUTCOMES and the SignalReceived rows below).
REMEDIES: Mapping[FailureKind, Remedy] = MappingProxyType(
    {
        FailureKind.CRASH: _restart_only,
        FailureKind.HANG: _restart_only,  # stacks dumped and child killed on detection
        FailureKind.CUDA_OOM: _halve_micro_batch,
        FailureKind.HOST_OOM: _halve_micro_batch,
        FailureKind.DISK_FULL: _free_disk,
        FailureKind.RESUME: _quarantine_resume_point,
        FailureKind.CONFIG: _never_retry,
        FailureKind.NO_PROGRESS: _fall_back_once,  # when the streak reaches the limit
    }
)

_ALIVE_MODES = (Mode.WAITING_ORPHAN, Mode.RUNNING, Mode.STOPPING, Mode.BACKOFF, Mode.WAITING_DISK)

#: Every (mode, event type) the supervisor can meet, and its handler. Nothing else is legal.
TRANSITIONS: Mapping[tuple[Mode, type], Handler] = MappingProxyType(
    {
        (Mode.STARTING, Started): _on_started,
        # A child of ours: launched (spawned at once, or not), running, exiting.
        (Mode.RUNNING, ChildSpawned): _on_spawned,
        (Mode.RUNNING, SpawnFailed): _on_spawn_failed,
        (Mode.RUNNING, ResumeRejected): _on_resume_rejected,
        (Mode.RUNNING, ChildExited): _on_exited,
        (Mode.STOPPING, ChildExited): _on_exited,
        # The timer, per mode.
        (Mode.WAITING_ORPHAN, Tick): _tick_waiting_orphan,
        (Mode.RUNNING, Tick): _tick_running,
        (Mode.STOPPING, Tick): _tick_stopping,
        (Mode.BACKOFF, Tick): _tick_backoff,
        (Mode.WAITING_DISK, Tick): _tick_waiting_disk,
        # SIGTERM/SIGINT/SIGHUP: with a child, ask it to save; without one, go now.
        (Mode.RUNNING, SignalReceived): _on_stop_signal,
        (Mode.STOPPING, SignalReceived): _on_stop_signal,
        (Mode.WAITING_ORPHAN, SignalReceived): _stop_at_once,
        (Mode.BACKOFF, SignalReceived): _stop_at_once,
        (Mode.WAITING_DISK, SignalReceived): _stop_at_once,
        # The cloud's preemption notice: the same stop, before its SIGTERM.
        (Mode.RUNNING, PreemptionNoticed): _on_stop_signal,
        (Mode.STOPPING, PreemptionNoticed): _on_stop_signal,
        (Mode.WAITING_ORPHAN, PreemptionNoticed): _stop_at_once,
        (Mode.BACKOFF, PreemptionNoticed): _stop_at_once,
        (Mode.WAITING_DISK, PreemptionNoticed): _stop_at_once,
        # Checkpoint folders changed: notice commits, quarantine, prune.
        **{(mode, InventoryChanged): _on_inventory for mode in _ALIVE_MODES},
        # Terminal: the loop is on its way out.
        **{
            (mode, event): _ignore
            for mode in Mode
            if mode.terminal
            for event in (Tick, InventoryChanged, SignalReceived, PreemptionNoticed, ChildExited)
        },
    }
)


def decide(state: State, event: Event, now: float) -> Decision:
    """Apply one event to the state; return the new state and the actions to run."""
    handler = TRANSITIONS.get((state.mode, type(event)))
    if handler is None:
        raise IllegalTransition(f"{type(event).__name__} while {state.mode.value}")
    return handler(state, event, now)


__all__ = [
    "OUTCOMES",
    "REMEDIES",
    "TRANSITIONS",
    "Decision",
    "GiveUp",
    "IllegalTransition",
    "decide",
    "hang_limit",
    "human_size",
    "status_line",
]
