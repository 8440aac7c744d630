"""Every decision the supervisor makes, in one pure function.

``decide(state, event, now) -> (state, actions)``. This is where to look for
"what happens on an OOM", "when do we give up", "which checkpoint do we resume
from" and "what gets pruned". It reads no clock (``now`` is the shell's monotonic
time), touches no file and starts no process; the shell gathers facts into events
and executes the returned actions in order.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from supervisor.core import checkpoints, retention
from supervisor.core.backoff import backoff_delay, prune_window, restarts_in_window
from supervisor.core.classify import Outcome, classify_exit
from supervisor.core.model import (
    Action,
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
    Inventory,
    InventoryChanged,
    Launch,
    Mode,
    Persist,
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
    Tick,
)
from trainer_child.protocol import EXIT_CONFIG, EXIT_GAVE_UP, EXIT_OK, Overrides, Phase

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


def decide(state: State, event: Event, now: float) -> Decision:
    """Apply one event to the state; return the new state and the actions to run."""
    if state.mode.terminal:
        return state, []
    if isinstance(event, Started):
        return _on_started(state, event, now)
    if isinstance(event, ChildSpawned):
        return _on_spawned(state, event, now)
    if isinstance(event, SpawnFailed):
        return _on_spawn_failed(state, event)
    if isinstance(event, ChildExited):
        return _on_exited(state, event, now)
    if isinstance(event, InventoryChanged):
        return _on_inventory(state, event.inventory)
    if isinstance(event, ResumeRejected):
        return _on_resume_rejected(state, event, now)
    if isinstance(event, SignalReceived):
        return _on_signal(state, event, now)
    return _on_tick(state, event, now)


# --- start -------------------------------------------------------------------------


def _on_started(state: State, event: Started, now: float) -> Decision:
    if state.mode is not Mode.STARTING:
        raise IllegalTransition(f"Started while {state.mode.value}")
    state = dataclasses.replace(state, inventory=event.inventory, disk=event.disk)
    actions: list[Action] = []
    previous = event.previous
    if previous is not None:
        state = dataclasses.replace(
            state,
            attempt=previous.attempts,
            overrides=previous.overrides,
            failures=previous.failures,
            poisoned=frozenset(previous.poisoned_steps),
        )
        if previous.gave_up:
            # A human started us again after a give-up: they changed something,
            # so the budget and the streak start afresh (overrides are kept).
            actions.append(Record("resumed_after_give_up", {"previous_reason": previous.gave_up}))
        else:
            state = dataclasses.replace(
                state,
                restart_times=tuple(
                    now - age for age in previous.restart_ages if age < state.config.window
                ),
                consecutive_failures=previous.consecutive_failures,
            )
    state = dataclasses.replace(state, newest_valid=_newest_valid(state))
    if state.consecutive_failures:
        state = dataclasses.replace(state, streak_base=state.newest_valid)

    done_before = previous is not None and previous.completed
    if event.inventory.final_complete or (done_before and not state.config.success_needs_final):
        text = (
            "run already complete: final/ holds a valid adapter; nothing to do"
            if event.inventory.final_complete
            else "run already complete: the command exited 0; nothing to do"
        )
        state = dataclasses.replace(state, mode=Mode.COMPLETED, status=text, exit_code=EXIT_OK)
        return state, [*actions, Record("already_complete"), Status(text), Persist(), Exit(0, text)]

    if event.orphan_pid is not None:
        # A child of a supervisor that died still trains and holds the lock.
        # Ask it for an emergency checkpoint (SIGTERM) rather than racing it;
        # once it exits and the lock is ours, resume with nothing lost.
        text = f"waiting for orphan child {event.orphan_pid} to save and exit"
        state = dataclasses.replace(
            state,
            mode=Mode.WAITING_ORPHAN,
            orphan_pid=event.orphan_pid,
            stop_deadline=now + state.config.preemption_grace,
            status=text,
        )
        return state, [
            *actions,
            Record("orphan_found", {"pid": event.orphan_pid}),
            SendSignal(event.orphan_pid, Signal.TERM),
            Status(text),
            Persist(),
        ]

    state, housekeeping = _housekeeping(state, child_alive=False)
    state, launch = _launch(state, now, counted=False)
    return state, [*actions, *housekeeping, *launch]


# --- launching ---------------------------------------------------------------------


def _launch(state: State, now: float, *, counted: bool, attempt: int | None = None) -> Decision:
    """Start the next attempt from the newest valid checkpoint, if the disk allows."""
    actions: list[Action] = []
    disk_need = _disk_need(state)
    free = state.disk.free if state.disk else None
    if free is not None and disk_need and free < disk_need:
        state, freeing = _relieve_disk(state, reason="not enough space to start")
        actions += freeing
        free = _predicted_free(state, freeing)
        if free < disk_need:
            text = f"waiting for disk: need {_size(disk_need)}, have {_size(free)}"
            state = dataclasses.replace(state, mode=Mode.WAITING_DISK, status=text, child=None)
            return state, [
                *actions,
                Record("waiting_for_disk", {"need_bytes": disk_need, "free_bytes": free}),
                Status(text),
                Persist(),
            ]

    resume = _newest_valid(state)
    problem = _resume_past_end(state, resume)
    if problem:
        return _give_up(state, problem, code=EXIT_GAVE_UP, kind=FailureKind.NO_PROGRESS)
    number = attempt if attempt is not None else state.attempt + 1
    restart_times = state.restart_times
    if counted:
        restart_times = (*prune_window(restart_times, now, state.config.window), now)
    # A checkpoint newer than the one we resume from would be overwritten in
    # place by the new attempt's saves; it is suspect anyway (we skipped it),
    # so it goes to quarantine first.
    for entry in state.inventory.entries:
        if (
            resume is not None
            and entry.step > resume
            and not entry.symlink
            and entry.integrity is Integrity.COMPLETE
        ):
            actions.append(Quarantine(entry.step, f"newer than resume point checkpoint-{resume}"))
    state = _forget(state, {a.step for a in actions if isinstance(a, Quarantine)})
    where = f"checkpoint-{resume}" if resume is not None else "scratch"
    text = f"attempt {number}: starting from {where}"
    state = dataclasses.replace(
        state,
        mode=Mode.RUNNING,
        attempt=number,
        launching=number,
        child=None,
        heartbeat=None,
        backoff_until=None,
        stop_reason=None,
        stop_deadline=None,
        killed=False,
        restart_times=restart_times,
        status=text,
    )
    fields: dict[str, object] = {
        "resume_from": f"checkpoint-{resume}" if resume is not None else None,
        "resume_step": resume,
        **_override_fields(state.overrides),
    }
    return state, [
        *actions,
        Record("launch", fields),
        Status(text),
        Launch(number, resume, state.overrides),
    ]


def _resume_past_end(state: State, resume: int | None) -> str | None:
    """Say why resuming from ``resume`` would train past max_steps (None when it would not)."""
    entry = state.inventory.get(resume) if resume is not None else None
    if entry is None or not entry.max_steps or entry.step < entry.max_steps:
        return None
    if state.config.step_guard or entry.has_record:
        return None  # WardenCallback ends train() at once: nothing runs past the end
    return (
        f"training reached max_steps {entry.max_steps} (checkpoint-{entry.step}), but the "
        "command did not exit 0 afterwards; a resume from there would train one step past "
        f"max_steps, so it is not restarted. The trained weights are in checkpoint-{entry.step}; "
        "set inject_callback: true (or add WardenCallback) to let trainwarden finish the job"
    )


def _on_spawned(state: State, event: ChildSpawned, now: float) -> Decision:
    if state.launching != event.attempt:
        raise IllegalTransition(f"ChildSpawned for attempt {event.attempt} not being launched")
    resume = _newest_valid(state)
    child = Child(pid=event.pid, attempt=event.attempt, resume_from=resume, started_at=now)
    state = dataclasses.replace(state, child=child, launching=None)
    return state, [Record("child_started", {"pid": event.pid}), Persist()]


def _on_spawn_failed(state: State, event: SpawnFailed) -> Decision:
    # The command could not even be executed (missing binary, bad permissions):
    # retrying cannot help, so it is a configuration error.
    state = dataclasses.replace(state, launching=None)
    return _give_up(
        state,
        f"could not start the child: {event.message}",
        code=EXIT_CONFIG,
        kind=FailureKind.CONFIG,
    )


def _on_resume_rejected(state: State, event: ResumeRejected, now: float) -> Decision:
    reason = "failed re-verification before resume: " + "; ".join(event.problems)
    state = dataclasses.replace(
        state, poisoned=state.poisoned | {event.step}, launching=None, mode=Mode.BACKOFF
    )
    state = _forget(state, {event.step})
    state = dataclasses.replace(state, newest_valid=_newest_valid(state))
    actions: list[Action] = [
        Record("resume_rejected", {"step": event.step, "problems": list(event.problems)}),
        Quarantine(event.step, reason),
    ]
    state, launch = _launch(state, now, counted=False, attempt=event.attempt)
    return state, [*actions, *launch]


# --- child exit --------------------------------------------------------------------


def _on_exited(state: State, event: ChildExited, now: float) -> Decision:
    child = state.child
    if child is None or child.pid != event.pid:
        return state, []  # a stale exit (an orphan, or an attempt already handled)
    state = dataclasses.replace(state, inventory=event.inventory, disk=event.disk, child=None)
    state, progress = _note_commits(state)
    disk_need = _disk_need(state)
    verdict = classify_exit(
        event.returncode,
        event.signal,
        event.evidence,
        stop_reason=state.stop_reason,
        final_complete=event.inventory.final_complete,
        disk_below_need=bool(disk_need) and event.disk.free < disk_need,
        exit_zero_completes=not state.config.success_needs_final,
    )
    state = dataclasses.replace(state, stop_reason=None, stop_deadline=None, killed=False)
    state, housekeeping = _housekeeping(state, child_alive=False)
    actions: list[Action] = [*progress, *housekeeping]
    # error.json's step is exact; the heartbeat is written at most once a second.
    step = event.evidence.error_step
    if step is None and state.heartbeat is not None:
        step = state.heartbeat.step
    exit_fields: dict[str, object] = {
        "pid": event.pid,
        "returncode": event.returncode,
        "signal": event.signal,
        "step": step,
        "evidence": verdict.evidence,
    }

    if verdict.outcome is Outcome.SUCCESS:
        beat = state.heartbeat
        steps = beat.step if beat is not None and beat.step else state.newest_valid
        text = (
            f"complete: {steps if steps is not None else '?'} steps, final/ written"
            if state.config.success_needs_final
            else f"complete: the command exited 0 at step {steps if steps is not None else '?'}"
        )
        state = dataclasses.replace(state, mode=Mode.COMPLETED, status=text, exit_code=EXIT_OK)
        return state, [
            *actions,
            Record("completed", {**exit_fields, "restarts": len(state.failures)}),
            Status(text),
            Persist(),
            Exit(EXIT_OK, text),
        ]

    if state.preempt_requested:
        newest = state.newest_valid
        text = f"stopped on request; newest checkpoint {newest}"
        state = dataclasses.replace(state, mode=Mode.PREEMPTED, status=text, exit_code=EXIT_OK)
        return state, [
            *actions,
            Record("preempted", {**exit_fields, "kind": "preempted", "checkpoint": newest}),
            Status(text),
            Persist(),
            Exit(EXIT_OK, text),
        ]

    if verdict.outcome is Outcome.PREEMPTED:
        # Someone else SIGTERMed the child (e.g. an operator or the VM); it saved
        # an emergency checkpoint. Resume at once; this is not a failure.
        actions.append(Record("child_preempted", {**exit_fields, "kind": "preempted"}))
        state, launch = _launch(state, now, counted=False)
        return state, [*actions, *launch]

    kind = verdict.kind or FailureKind.CRASH
    note = FailureNote(child.attempt, kind, step, verdict.evidence)
    if state.consecutive_failures == 0:
        state = dataclasses.replace(state, streak_base=state.newest_valid)
    state = dataclasses.replace(
        state,
        failures=(*state.failures, note),
        consecutive_failures=state.consecutive_failures + 1,
    )
    actions.append(
        Record(
            "failure",
            {
                **exit_fields,
                "kind": kind.value,
                "resume_from": child.resume_from,
                "failures_in_a_row": state.consecutive_failures,
            },
        )
    )

    if kind is FailureKind.CONFIG:
        return _give_up(
            state,
            f"configuration or data error: {verdict.evidence}",
            code=EXIT_CONFIG,
            kind=kind,
            prior=actions,
        )
    state, problem = _repeated_startup_failure(state, child, event)
    if problem:
        return _give_up(state, problem, code=EXIT_GAVE_UP, kind=kind, prior=actions)
    if kind in (FailureKind.CUDA_OOM, FailureKind.HOST_OOM):
        state, remedy, problem = _halve_micro_batch(state, kind)
        actions += remedy
        if problem:
            return _give_up(state, problem, code=EXIT_GAVE_UP, kind=kind, prior=actions)
    if kind is FailureKind.RESUME and child.resume_from is not None:
        bad = child.resume_from
        state = dataclasses.replace(state, poisoned=state.poisoned | {bad})
        actions.append(Quarantine(bad, f"failed to resume: {verdict.evidence}"))
        state = _forget(state, {bad})
        state = dataclasses.replace(state, newest_valid=_newest_valid(state))
    if kind is FailureKind.DISK_FULL:
        state, freeing = _relieve_disk(state, reason="disk full")
        if not any(isinstance(a, FreeSpace) for a in freeing) and any(
            isinstance(a, Quarantine) for a in actions
        ):
            # The failed save's partial folder was quarantined just above, after
            # the inventory was taken: it is the first thing to go, or the next
            # attempt runs into the same ENOSPC beside it.
            freeing.insert(0, FreeSpace("disk full"))
        actions += freeing

    budget_used = restarts_in_window(state.restart_times, now, state.config.window)
    if budget_used >= state.config.max_restarts:
        return _give_up(
            state,
            f"restart budget spent: {budget_used} restarts within "
            f"{state.config.window:.0f}s (restart.max_restarts); last failure {kind.value}: "
            f"{verdict.evidence}",
            code=EXIT_GAVE_UP,
            kind=kind,
            prior=actions,
        )

    if state.consecutive_failures >= state.config.no_progress_limit:
        state, fallback, problem = _no_progress(state, note)
        actions += fallback
        if problem:
            return _give_up(
                state, problem, code=EXIT_GAVE_UP, kind=FailureKind.NO_PROGRESS, prior=actions
            )

    delay = backoff_delay(
        state.consecutive_failures,
        state.config.backoff_initial,
        state.config.backoff_max,
        event.jitter,
    )
    text = f"backing off {delay:.0f}s after {kind.value}"
    state = dataclasses.replace(
        state, mode=Mode.BACKOFF, backoff_until=now + delay, status=text, heartbeat=None
    )
    return state, [
        *actions,
        Record("backoff", {"seconds": round(delay, 3)}),
        Status(text),
        Persist(),
    ]


def _repeated_startup_failure(
    state: State, child: Child, event: ChildExited
) -> tuple[State, str | None]:
    """Give up when two attempts in a row fail the same way before training began.

    A wrong model path, a missing dataset or a script bug at import time fails
    identically every time; restarting it until the budget is spent only hides
    the one line the user needs. "Before training began": no heartbeat past
    ``load`` (a script without the callback never has one, so for it this
    means the same error twice from the same checkpoint).
    """
    beat = state.heartbeat
    line = event.evidence.error_line
    before_training = beat is None or beat.phase is Phase.LOAD
    if not line or not before_training:
        return dataclasses.replace(state, startup_failure=None), None
    signature = (line, child.resume_from)
    if state.startup_failure != signature:
        return dataclasses.replace(state, startup_failure=signature), None
    where = f"checkpoint-{child.resume_from}" if child.resume_from is not None else "a fresh start"
    return state, (
        f"the command failed twice in a row before training began, from {where}, with: {line}"
    )


def _halve_micro_batch(state: State, kind: FailureKind) -> tuple[State, list[Action], str | None]:
    """Halve the micro-batch and grow accumulation so the effective batch is kept."""
    micro = state.overrides.per_device_train_batch_size or state.config.micro_batch
    accum = state.overrides.gradient_accumulation_steps or state.config.grad_accum
    if micro <= 0:
        return (
            state,
            [],
            (
                f"{kind.value}: the micro-batch is unknown, so it cannot be halved; set "
                "batch.per_device_train_batch_size in the config for a command: job"
            ),
        )
    if micro == 1:
        return (
            state,
            [],
            (
                f"{kind.value} at per_device_train_batch_size=1: nothing left to halve. "
                "Reduce sft.max_length, enable sft.gradient_checkpointing, use a smaller "
                "model, or give the job more memory"
            ),
        )
    # Largest divisor of micro that is at most half of it keeps micro*accum exact.
    new_micro = max(d for d in range(1, micro // 2 + 1) if micro % d == 0)
    new_accum = accum * (micro // new_micro)
    overrides = Overrides(
        per_device_train_batch_size=new_micro, gradient_accumulation_steps=new_accum
    )
    state = dataclasses.replace(state, overrides=overrides)
    return (
        state,
        [
            Record(
                "remediation",
                {
                    "kind": kind.value,
                    "per_device_train_batch_size": [micro, new_micro],
                    "gradient_accumulation_steps": [accum, new_accum],
                },
            )
        ],
        None,
    )


def _no_progress(state: State, note: FailureNote) -> tuple[State, list[Action], str | None]:
    """After K failures without a new checkpoint: fall back once, then give up."""
    newest = _newest_valid(state)
    older = [s for s in _valid_steps(state) if newest is not None and s < newest]
    base = state.streak_base
    problem = (
        f"no progress: {state.consecutive_failures} failures in a row without a checkpoint "
        f"newer than step {base}; last failure at step {note.step}: "
        f"{note.kind.value}: {note.evidence}"
    )
    if state.fallback_tried or newest is None or not older:
        return state, [], problem
    # The newest checkpoint may itself be what kills every attempt (poisoned
    # optimizer state, a bad RNG position): try the one before it, once.
    state = dataclasses.replace(state, poisoned=state.poisoned | {newest}, fallback_tried=True)
    actions: list[Action] = [
        Record(
            "fallback",
            {"kind": FailureKind.NO_PROGRESS.value, "from_step": newest, "to_step": older[-1]},
        ),
        Quarantine(newest, f"no progress after {state.consecutive_failures} failures from it"),
    ]
    state = _forget(state, {newest})
    return state, actions, None


def _give_up(
    state: State,
    reason: str,
    *,
    code: int,
    kind: FailureKind,
    prior: list[Action] | None = None,
) -> Decision:
    text = f"gave up: {reason}"
    state = dataclasses.replace(
        state, mode=Mode.GAVE_UP, status=text, exit_code=code, gave_up=reason, child=None
    )
    return state, [
        *(prior or []),
        Record("gave_up", {"kind": kind.value, "reason": reason, "exit_code": code}),
        Status(text),
        Persist(),
        Exit(code, reason),
    ]


# --- watching ----------------------------------------------------------------------


def _on_inventory(state: State, inventory: Inventory) -> Decision:
    state = dataclasses.replace(state, inventory=inventory)
    state, actions = _note_commits(state)
    # An orphan is alive too: the folder it is writing (its emergency save,
    # asked for by our SIGTERM) is in progress, not partial.
    alive = state.child is not None or state.mode is Mode.WAITING_ORPHAN
    state, housekeeping = _housekeeping(state, child_alive=alive)
    if actions and state.mode is Mode.RUNNING:
        state = dataclasses.replace(state, status=status_line(state))
        housekeeping.append(Status(state.status))
    return state, [*actions, *housekeeping]


def _note_commits(state: State) -> Decision:
    """Notice newly committed checkpoints; a new one ends a failure streak."""
    newest = _newest_valid(state)
    if newest is None or (state.newest_valid is not None and newest <= state.newest_valid):
        return dataclasses.replace(state, newest_valid=newest), []
    entry = state.inventory.get(newest)
    actions: list[Action] = [
        Record(
            "checkpoint_committed",
            {"step": newest, "bytes": entry.size_bytes if entry else None},
        )
    ]
    state = dataclasses.replace(state, newest_valid=newest)
    if state.consecutive_failures and (state.streak_base is None or newest > state.streak_base):
        state = dataclasses.replace(
            state,
            consecutive_failures=0,
            streak_base=None,
            fallback_tried=False,
            startup_failure=None,
        )
    return state, [*actions, Persist()]


def _on_tick(state: State, tick: Tick, now: float) -> Decision:
    state = dataclasses.replace(state, disk=tick.disk)
    if tick.heartbeat is not None:
        state = _track_timing(state, tick.heartbeat, now)

    if state.mode is Mode.RUNNING and state.child is not None:
        return _check_running(state, tick, now)
    if state.mode is Mode.STOPPING and state.child is not None:
        child = state.child
        if state.stop_deadline is not None and now >= state.stop_deadline and not state.killed:
            state = dataclasses.replace(state, killed=True)
            return state, [
                Record("escalated", {"signal": "SIGKILL", "why": "stop grace ran out"}),
                SendSignal(child.pid, Signal.KILL),
            ]
        return state, []
    if state.mode is Mode.BACKOFF and state.backoff_until is not None:
        if now >= state.backoff_until:
            return _launch(state, now, counted=True)
        return state, []
    if state.mode is Mode.WAITING_DISK:
        need = _disk_need(state)
        if tick.disk.free >= need:
            return _launch(state, now, counted=True)
        text = f"waiting for disk: need {_size(need)}, have {_size(tick.disk.free)}"
        if text != state.status:
            # Persisted too: `trainwarden status` reads state.json, and a failed
            # write (ENOSPC, likely here) is retried by the journal.
            state = dataclasses.replace(state, status=text)
            return state, [Status(text), Persist()]
        return state, []
    if state.mode is Mode.WAITING_ORPHAN:
        return _check_orphan(state, tick, now)
    return state, []


def _track_timing(state: State, beat: HeartbeatView, now: float) -> State:
    """Remember the slowest step and save seen, which the automatic hang limits scale with."""
    slowest = state.slowest_step
    if beat.last_step_seconds is not None:
        slowest = max(slowest or 0.0, beat.last_step_seconds)
    save_started, slowest_save = state.save_started, state.slowest_save
    previous = state.heartbeat.phase if state.heartbeat else None
    if beat.phase is Phase.SAVE and previous is not Phase.SAVE:
        save_started = now - beat.age
    elif beat.phase is not Phase.SAVE and previous is Phase.SAVE and save_started is not None:
        slowest_save = max(slowest_save or 0.0, now - beat.age - save_started)
        save_started = None
    return dataclasses.replace(
        state,
        heartbeat=beat,
        slowest_step=slowest,
        save_started=save_started,
        slowest_save=slowest_save,
    )


def _check_running(state: State, tick: Tick, now: float) -> Decision:
    child = state.child
    assert child is not None
    beat = tick.heartbeat
    phase = beat.phase if beat is not None else Phase.LOAD
    age = beat.age if beat is not None else now - child.started_at
    limit = hang_limit(state, phase)
    actions: list[Action] = []
    if age > limit:
        # A SIGSTOPped child cannot even run its signal handlers: continue it so
        # the stack dump and the SIGTERM land.
        signals = [Signal.CONT] if tick.child_stopped else []
        signals += [Signal.USR1, Signal.TERM]
        state = dataclasses.replace(
            state,
            mode=Mode.STOPPING,
            stop_reason=FailureKind.HANG,
            stop_deadline=now + state.config.kill_grace,
            status=f"child hung in {phase.value} for {age:.0f}s; stopping it",
        )
        return state, [
            Record(
                "hang_detected",
                {
                    "kind": FailureKind.HANG.value,
                    "phase": phase.value,
                    "heartbeat_age": round(age, 3),
                    "timeout": limit,
                    "step": beat.step if beat else None,
                    "stopped": tick.child_stopped,
                },
            ),
            *(SendSignal(child.pid, sig) for sig in signals),
            Status(state.status),
        ]
    disk = state.disk
    if disk is not None:
        reserve = _disk_reserve(state)
        if reserve and disk.free < reserve:
            state, freeing = _relieve_disk(state, reason="free space below reserve")
            if freeing:
                actions.append(
                    Record("disk_low", {"free_bytes": disk.free, "reserve_bytes": reserve})
                )
                actions += freeing
    line = status_line(state)
    if line != state.status:
        state = dataclasses.replace(state, status=line)
        actions.append(Status(line))
    return state, actions


def _check_orphan(state: State, tick: Tick, now: float) -> Decision:
    if tick.lock_acquired:
        state = dataclasses.replace(state, orphan_pid=None, stop_deadline=None)
        if state.inventory.final_complete:
            # The orphan finished the run before it exited: nothing is left to train.
            text = "run complete: the orphan child wrote final/ before it exited"
            state = dataclasses.replace(state, mode=Mode.COMPLETED, status=text, exit_code=EXIT_OK)
            return state, [
                Record("orphan_gone"),
                Record("already_complete"),
                Status(text),
                Persist(),
                Exit(EXIT_OK, text),
            ]
        state, housekeeping = _housekeeping(state, child_alive=False)
        state, launch = _launch(state, now, counted=False)
        return state, [Record("orphan_gone"), *housekeeping, *launch]
    orphan = state.orphan_pid
    if (
        orphan is not None
        and tick.orphan_alive
        and state.stop_deadline is not None
        and now >= state.stop_deadline
        and not state.killed
    ):
        state = dataclasses.replace(state, killed=True)
        return state, [
            Record("escalated", {"signal": "SIGKILL", "pid": orphan}),
            SendSignal(orphan, Signal.KILL),
        ]
    return state, []


def hang_limit(state: State, phase: Phase) -> float:
    """Seconds of heartbeat silence tolerated in ``phase`` before calling it a hang."""
    config = state.config
    if phase is Phase.LOAD:
        return config.startup_timeout
    train = config.hang_timeout
    if train is None:
        train = max(AUTO_HANG_FLOOR, AUTO_HANG_STEP_FACTOR * (state.slowest_step or 0.0))
    if phase is Phase.TRAIN:
        return train
    # save, eval and the final save: a big checkpoint to a slow disk or a long
    # evaluation legitimately outlasts a training step by far.
    if config.save_timeout is not None:
        save = config.save_timeout
    else:
        save = max(AUTO_SAVE_FACTOR * train, 10.0 * (state.slowest_save or 0.0))
    if phase is Phase.DONE:
        # After train() a script may do anything without a heartbeat: save a
        # merged model, evaluate, push to the hub; allow it as long as a start.
        return max(save, config.startup_timeout)
    return save


# --- signals -----------------------------------------------------------------------


def _on_signal(state: State, event: SignalReceived, now: float) -> Decision:
    child = state.child
    if state.mode in (Mode.RUNNING, Mode.STOPPING) and child is not None:
        if state.preempt_requested or state.killed:
            state = dataclasses.replace(state, killed=True)
            return state, [
                Record("escalated", {"signal": "SIGKILL", "why": f"second {event.name}"}),
                SendSignal(child.pid, Signal.KILL),
            ]
        grace = state.config.preemption_grace
        deadline = now + grace
        if state.stop_deadline is not None:
            deadline = min(deadline, state.stop_deadline)
        text = "stopping: child is writing an emergency checkpoint"
        state = dataclasses.replace(
            state,
            mode=Mode.STOPPING,
            preempt_requested=True,
            stop_reason=state.stop_reason or FailureKind.PREEMPTED,
            stop_deadline=deadline,
            status=text,
        )
        return state, [
            Record("preempt_requested", {"kind": "preempted", "signal": event.name}),
            ExtendStop(grace + STOP_SLACK),
            SendSignal(child.pid, Signal.TERM),
            Status(text),
            Persist(),
        ]
    text = f"stopped by {event.name} while {state.mode.value}"
    state = dataclasses.replace(
        state, mode=Mode.PREEMPTED, preempt_requested=True, status=text, exit_code=EXIT_OK
    )
    return state, [
        Record("stopped", {"signal": event.name}),
        Status(text),
        Persist(),
        Exit(0, text),
    ]


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
    return dataclasses.replace(
        state, inventory=dataclasses.replace(state.inventory, entries=entries)
    )


def _housekeeping(state: State, *, child_alive: bool) -> Decision:
    """Quarantine what can never be resumed from, then prune by retention."""
    newest = _newest_valid(state)
    actions: list[Action] = []
    for entry in state.inventory.entries:
        status = checkpoints.status_of(entry, newest, child_alive)
        if status is CheckpointStatus.CORRUPT:
            actions.append(Quarantine(entry.step, "corrupt: " + "; ".join(entry.problems)))
        elif status is CheckpointStatus.PARTIAL:
            actions.append(
                Quarantine(entry.step, "partial: " + "; ".join(entry.problems or ("incomplete",)))
            )
    state = _forget(state, {a.step for a in actions if isinstance(a, Quarantine)})
    doomed = retention.select_for_removal(
        state.inventory,
        keep_last=state.config.keep_last,
        keep_best=state.config.keep_best,
        keep_every=state.config.keep_every,
        protected=_protected(state),
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


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


__all__ = ["Decision", "IllegalTransition", "decide", "hang_limit", "status_line"]
