"""Fold the journal into what a night cost: restarts, failures, time and steps lost, goodput.

Pure: no clock, no files. ``Ledger`` is fed journal entries (``events.jsonl``
lines) and progress samples (step seen at a wall time) in time order and
summarises them on demand; ``account()`` replays a finished journal in one go.
The metrics exporter, ``trainwarden status`` and ``trainwarden report`` all read
the same numbers from here, so they never disagree.

Definitions (wall-clock seconds, from journal ``ts``):

* **spans**: the run's wall time split into ``training`` (a child launched and not
  yet gone), ``restarting`` (a failure or preemption until the next launch:
  backoff), ``waiting`` (for disk, for an orphan child) and ``down`` (no
  supervisor ran: between a stop and the next start, or after a supervisor died
  with no closing event, from the last thing heard of its attempt).
* **steps lost** by a failure: the step the heartbeat last showed before it,
  minus the step the next attempt resumed from (0 from scratch). Steps re-done.
* **time lost** by a failure: from when it began (the failure record; for a hang,
  the last heartbeat before it) until a later attempt is seen at that step
  again (interpolated between two samples of that attempt), minus ``down`` time.
  A failure not yet regained keeps costing until ``now``. Overlapping losses
  (a second crash before the first is regained) are counted once.
* **goodput**: the share of supervised time (wall minus ``down``) that was
  neither lost to a failure nor spent waiting.

How the loop feeds it (live metrics)::

    ledger = Ledger()
    for entry in read_events(layout):          # at start: history from disk
        ledger.add_entry(entry)
    ...
    ledger.add_entry(JournalEntry(ts=wall, event=name, attempt=n, **fields))  # each Record
    ledger.add_progress(wall, heartbeat.step, attempt)                      # each Tick
    summary = ledger.summary(now=wall)

Samples only need to arrive when the step changes; the ledger keeps one per attempt.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from trainer_child.protocol import JournalEntry

__all__ = [
    "Accounting",
    "Activity",
    "Commit",
    "FailureCost",
    "Ledger",
    "ProgressSample",
    "RunResult",
    "Span",
    "account",
]


class Activity(str, enum.Enum):
    """What the run was doing during a span of wall time."""

    TRAINING = "training"
    RESTARTING = "restarting"
    WAITING = "waiting"
    DOWN = "down"


class RunResult(str, enum.Enum):
    """How the run stands: running until a terminal journal event says otherwise.

    NOT_STARTED -> RUNNING -> COMPLETED | GAVE_UP | PREEMPTED | STOPPED, and a
    later supervisor start turns any of the last three back into RUNNING.
    """

    NOT_STARTED = "not started"
    RUNNING = "running"
    COMPLETED = "completed"
    GAVE_UP = "gave up"
    PREEMPTED = "preempted"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ProgressSample:
    """The child was at ``step`` at ``wall_time`` during ``attempt``."""

    wall_time: float
    step: int
    attempt: int


@dataclass(frozen=True)
class Span:
    """One stretch of wall time spent on one activity, within one attempt."""

    activity: Activity
    start: float
    end: float
    attempt: int

    @property
    def seconds(self) -> float:
        return max(0.0, self.end - self.start)


@dataclass(frozen=True)
class Commit:
    """A checkpoint the supervisor saw committed."""

    ts: float
    step: int
    attempt: int


@dataclass(frozen=True)
class FailureCost:
    """One failure and what it cost."""

    attempt: int
    kind: str
    ts: float
    #: When the loss began: ``ts``, or for a hang the last heartbeat before it.
    began: float
    #: Heartbeat-sampled step at the failure (None when the child never reported one).
    step: int | None
    #: Step the next attempt resumed from (0: from scratch); None until it launched.
    resume_step: int | None
    #: When a later attempt was seen at ``step`` again; None while not yet regained.
    regained_at: float | None
    evidence: str
    lost_seconds: float

    @property
    def steps_lost(self) -> int | None:
        if self.step is None or self.resume_step is None:
            return None
        return max(0, self.step - self.resume_step)


@dataclass(frozen=True)
class Accounting:
    """The summary of a run so far (see the module docstring for definitions)."""

    result: RunResult
    #: Why the run gave up (the ``gave_up`` record's reason), when it did.
    reason: str | None
    started: float | None
    ended: float | None
    attempts: int
    #: Attempts launched after the first (failures, preemptions, supervisor restarts).
    restarts: int
    preemptions: int
    failures: tuple[FailureCost, ...]
    spans: tuple[Span, ...]
    commits: tuple[Commit, ...]
    lost_seconds: float
    #: Highest step seen in a commit or progress sample.
    last_step: int | None
    goodput: float | None

    @property
    def wall_seconds(self) -> float:
        if self.started is None or self.ended is None:
            return 0.0
        return max(0.0, self.ended - self.started)

    def seconds(self, activity: Activity) -> float:
        """Wall seconds spent on ``activity``."""
        return sum(span.seconds for span in self.spans if span.activity is activity)

    @property
    def failures_by_kind(self) -> dict[str, int]:
        return dict(Counter(failure.kind for failure in self.failures))

    @property
    def steps_lost(self) -> int:
        return sum(failure.steps_lost or 0 for failure in self.failures)


@dataclass
class _Failure:
    attempt: int
    kind: str
    ts: float
    began: float
    step: int | None
    evidence: str
    resume_step: int | None = None
    resume_attempt: int | None = None
    regained_at: float | None = None


@dataclass
class _Open:
    activity: Activity
    start: float
    attempt: int


_TERMINAL = {
    "completed": RunResult.COMPLETED,
    "gave_up": RunResult.GAVE_UP,
    "preempted": RunResult.PREEMPTED,
    "stopped": RunResult.STOPPED,
}


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class Ledger:
    """Fold journal entries and progress samples, fed in time order, into ``Accounting``."""

    def __init__(self) -> None:
        self._spans: list[Span] = []
        self._open: _Open | None = None
        self._failures: list[_Failure] = []
        self._commits: list[Commit] = []
        #: attempt -> wall time its hang began (last heartbeat), until its failure record.
        self._hang_began: dict[int, float] = {}
        #: attempt -> the last time anything was heard of it (entries, samples).
        self._last_seen: dict[int, float] = {}
        #: attempt -> its newest progress sample (time, step), for interpolation.
        self._last_progress: dict[int, tuple[float, int]] = {}
        self._attempts: set[int] = set()
        self._first_ts: float | None = None
        self._last_ts: float | None = None
        self._ended: float | None = None
        self._result = RunResult.NOT_STARTED
        self._reason: str | None = None
        self._preemptions = 0
        self._last_step: int | None = None

    # --- feeding -------------------------------------------------------------------

    def add_entry(self, entry: JournalEntry) -> None:
        """Take one journal line into account (unknown events only mark time)."""
        ts, attempt, event = entry.ts, entry.attempt, entry.event
        fields = entry.model_extra or {}
        if self._first_ts is None:
            self._first_ts = ts
        self._last_ts = max(ts, self._last_ts or ts)
        if event in ("launch", "orphan_found", "resumed_after_give_up", "already_complete"):
            self._note_supervisor(ts, attempt, event)
        self._last_seen[attempt] = ts
        if event in _TERMINAL:
            self._on_terminal(entry, fields)
            return
        handler = _ENTRY_HANDLERS.get(event)
        if handler is not None:
            handler(self, entry, fields)

    def _on_launch(self, entry: JournalEntry, fields: dict[str, Any]) -> None:
        ts, attempt = entry.ts, entry.attempt
        self._switch(Activity.TRAINING, ts, attempt)
        self._attempts.add(attempt)
        self._result = RunResult.RUNNING
        resume = _int(fields.get("resume_step")) or 0
        for failure in self._failures:
            if (
                failure.attempt < attempt
                and failure.regained_at is None
                and failure.resume_attempt in (None, attempt)
            ):
                failure.resume_step = resume
                failure.resume_attempt = attempt

    def _on_commit(self, entry: JournalEntry, fields: dict[str, Any]) -> None:
        step = _int(fields.get("step"))
        if step is not None:
            self._commits.append(Commit(entry.ts, step, entry.attempt))
            self._progress(entry.ts, step, entry.attempt)

    def _on_hang(self, entry: JournalEntry, fields: dict[str, Any]) -> None:
        age = _float(fields.get("heartbeat_age")) or 0.0
        self._hang_began[entry.attempt] = entry.ts - age

    def _on_failure(self, entry: JournalEntry, fields: dict[str, Any]) -> None:
        ts, attempt = entry.ts, entry.attempt
        kind = str(entry.kind or "crash")
        began = self._hang_began.pop(attempt, ts) if kind == "hang" else ts
        step = _int(fields.get("step"))
        if step is not None:
            # The dying attempt's last heartbeat step is a progress sample too:
            # it may be what regains an earlier failure's step.
            self._progress(ts, step, attempt)
        self._failures.append(
            _Failure(
                attempt=attempt,
                kind=kind,
                ts=ts,
                began=min(began, ts),
                step=step,
                evidence=str(fields.get("evidence") or ""),
            )
        )
        self._switch(Activity.RESTARTING, ts, attempt)

    def _on_child_preempted(self, entry: JournalEntry, fields: dict[str, Any]) -> None:
        self._preemptions += 1
        self._switch(Activity.RESTARTING, entry.ts, entry.attempt)

    def _on_waiting(self, entry: JournalEntry, fields: dict[str, Any]) -> None:
        self._switch(Activity.WAITING, entry.ts, entry.attempt)

    def _on_already_complete(self, entry: JournalEntry, fields: dict[str, Any]) -> None:
        if self._result is not RunResult.COMPLETED:
            self._finish(entry.ts, RunResult.COMPLETED)

    def _on_terminal(self, entry: JournalEntry, fields: dict[str, Any]) -> None:
        event, ts = entry.event, entry.ts
        step = _int(fields.get("step"))
        if event == "completed" and step is not None:
            self._progress(ts, step, entry.attempt)
        if event == "preempted":
            self._preemptions += 1
        self._finish(ts, _TERMINAL[event])
        if event == "gave_up":
            self._reason = str(fields.get("reason") or "") or None

    def add_progress(self, wall_time: float, step: int, attempt: int) -> None:
        """Note that ``attempt`` was at ``step`` at ``wall_time`` (heartbeat, loss log)."""
        self._last_ts = max(wall_time, self._last_ts or wall_time)
        self._last_seen[attempt] = max(wall_time, self._last_seen.get(attempt, wall_time))
        self._progress(wall_time, step, attempt)

    # --- internals -----------------------------------------------------------------

    def _switch(self, activity: Activity, ts: float, attempt: int) -> None:
        current = self._open
        if current is not None:
            if current.activity is activity and current.attempt == attempt:
                return  # e.g. a relaunch of the same attempt after resume_rejected
            self._spans.append(Span(current.activity, current.start, ts, current.attempt))
        self._open = _Open(activity, ts, attempt)

    def _finish(self, ts: float, result: RunResult) -> None:
        if self._open is not None:
            self._spans.append(Span(self._open.activity, self._open.start, ts, self._open.attempt))
            self._open = None
        self._result = result
        self._ended = ts

    def _note_supervisor(self, ts: float, attempt: int, event: str) -> None:
        """Account for the gap before a supervisor (re)start as ``down``."""
        if self._ended is not None:
            # A later supervisor picks up a stopped, preempted or given-up run.
            if event == "already_complete" and self._result is RunResult.COMPLETED:
                return
            self._spans.append(Span(Activity.DOWN, self._ended, ts, attempt))
            self._ended = None
            self._result = RunResult.RUNNING
            self._reason = None
            return
        current = self._open
        if current is None or current.activity is not Activity.TRAINING:
            return
        if event == "launch" and attempt == current.attempt:
            return  # relaunch after resume_rejected: the same supervisor
        # The supervisor died while its child ran: the attempt's last sign of life
        # ends the training span; nobody watched after that.
        last = min(max(self._last_seen.get(current.attempt, current.start), current.start), ts)
        self._spans.append(Span(Activity.TRAINING, current.start, last, current.attempt))
        self._spans.append(Span(Activity.DOWN, last, ts, current.attempt))
        self._open = None

    def _progress(self, ts: float, step: int, attempt: int) -> None:
        self._last_step = step if self._last_step is None else max(self._last_step, step)
        previous = self._last_progress.get(attempt)
        for failure in self._failures:
            if failure.regained_at is not None or failure.attempt >= attempt:
                continue
            target = failure.step
            if target is not None and step < target:
                continue
            when = ts
            if (
                target is not None
                and previous is not None
                and previous[1] < target
                and ts > previous[0]
                and step > previous[1]
            ):
                # Linear between the two samples of this attempt that straddle it.
                fraction = (target - previous[1]) / (step - previous[1])
                when = previous[0] + fraction * (ts - previous[0])
            failure.regained_at = max(when, failure.began)
        self._last_progress[attempt] = (ts, step)

    # --- summary -------------------------------------------------------------------

    def summary(self, now: float | None = None) -> Accounting:
        """Summarise; a run still going is measured up to ``now`` (default: last event)."""
        end: float | None = self._ended
        if end is None:
            end = max(now, self._last_ts or now) if now is not None else self._last_ts
        spans = list(self._spans)
        if self._open is not None and end is not None:
            spans.append(
                Span(
                    self._open.activity,
                    self._open.start,
                    max(end, self._open.start),
                    self._open.attempt,
                )
            )
        down = [(s.start, s.end) for s in spans if s.activity is Activity.DOWN]
        failures: list[FailureCost] = []
        lost: list[tuple[float, float]] = []
        for failure in self._failures:
            stop = failure.regained_at if failure.regained_at is not None else end
            interval = (failure.began, max(failure.began, stop or failure.began))
            pieces = _subtract([interval], down)
            lost += pieces
            failures.append(
                FailureCost(
                    attempt=failure.attempt,
                    kind=failure.kind,
                    ts=failure.ts,
                    began=failure.began,
                    step=failure.step,
                    resume_step=failure.resume_step,
                    regained_at=failure.regained_at,
                    evidence=failure.evidence,
                    lost_seconds=_measure(pieces),
                )
            )
        lost_seconds = _measure(_union(lost))
        waiting = [(s.start, s.end) for s in spans if s.activity is Activity.WAITING]
        unproductive = _measure(_union(lost + waiting))
        goodput = None
        if self._first_ts is not None and end is not None:
            supervised = (end - self._first_ts) - _measure(_union(down))
            if supervised > 0:
                goodput = min(1.0, max(0.0, 1.0 - unproductive / supervised))
        return Accounting(
            result=self._result,
            reason=self._reason,
            started=self._first_ts,
            ended=end,
            attempts=len(self._attempts),
            restarts=max(0, len(self._attempts) - 1),
            preemptions=self._preemptions,
            failures=tuple(failures),
            spans=tuple(sorted(spans, key=lambda s: (s.start, s.end))),
            commits=tuple(self._commits),
            lost_seconds=lost_seconds,
            last_step=self._last_step,
            goodput=goodput,
        )


#: Journal events that change the ledger, and how (terminal events: ``_on_terminal``).
_ENTRY_HANDLERS: dict[str, Callable[[Ledger, JournalEntry, dict[str, Any]], None]] = {
    "launch": Ledger._on_launch,
    "checkpoint_committed": Ledger._on_commit,
    "hang_detected": Ledger._on_hang,
    "failure": Ledger._on_failure,
    "child_preempted": Ledger._on_child_preempted,
    "waiting_for_disk": Ledger._on_waiting,
    "orphan_found": Ledger._on_waiting,
    "already_complete": Ledger._on_already_complete,
}


def account(
    entries: Iterable[JournalEntry],
    progress: Iterable[ProgressSample] = (),
    *,
    now: float | None = None,
) -> Accounting:
    """Replay a journal and progress samples (merged by time) and summarise them."""
    ledger = Ledger()
    # Entries sort before samples of the same instant: a launch precedes its progress.
    timeline: list[tuple[float, int, int, JournalEntry | ProgressSample]] = [
        (entry.ts, 0, i, entry) for i, entry in enumerate(entries)
    ]
    timeline += [(sample.wall_time, 1, i, sample) for i, sample in enumerate(progress)]
    timeline.sort(key=lambda item: item[:3])
    for _, _, _, item in timeline:
        if isinstance(item, JournalEntry):
            ledger.add_entry(item)
        else:
            ledger.add_progress(item.wall_time, item.step, item.attempt)
    return ledger.summary(now=now)


# --- interval arithmetic ---------------------------------------------------------------


def _union(intervals: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _subtract(
    intervals: Sequence[tuple[float, float]], holes: Sequence[tuple[float, float]]
) -> list[tuple[float, float]]:
    result = list(intervals)
    for hole_start, hole_end in _union(holes):
        pieces: list[tuple[float, float]] = []
        for start, end in result:
            if hole_end <= start or hole_start >= end:
                pieces.append((start, end))
                continue
            if start < hole_start:
                pieces.append((start, hole_start))
            if hole_end < end:
                pieces.append((hole_end, end))
        result = pieces
    return result


def _measure(intervals: Sequence[tuple[float, float]]) -> float:
    return sum(end - start for start, end in _union(intervals))
