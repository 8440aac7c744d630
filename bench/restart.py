"""Benchmark 2: restart latency, crash to the first training step after resume, split into parts.

No runs of its own: every supervised run with kills (goodput and save-interval
sweeps) is read here. For a kill of attempt a's child at ``kill.ts``:

====================  =====================================================
detect                journal ``failure`` ts - kill ts
backoff               next ``launch`` ts - ``failure`` ts (policy + sleep)
spawn                 ``child_started`` ts - ``launch`` ts (re-verify, Popen)
interpreter           child's ``started`` mark - ``child_started`` ts
imports               ``imports`` - ``started`` (torch, transformers, trl...)
dataset               ``dataset`` - ``imports``
model load            ``model`` - ``dataset`` (from_pretrained)
trainer build         ``trainer`` - ``model`` (LoRA wrap, tokenising)
checkpoint load       ``train_begin`` - ``trainer`` (adapter, optimizer, scheduler)
first step            ``first_step`` - ``train_begin`` (incl. data skip, RNG)
====================  =====================================================

The marks are wall times the child notes once per attempt
(``trainer_child.heartbeat.mark``) and carries in every heartbeat. A cold
start is attempt 1 of the same run, from its ``launch``: the same segments
minus detect and backoff. Each restart is paired with its own run's cold start.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.common import (
    fmt_seconds,
    median,
    ratio,
)
from bench.report import Section
from bench.runs import RunRecord

CHILD_MARKS = (
    ("interpreter", "started"),
    ("imports", "imports"),
    ("dataset", "dataset"),
    ("model load", "model"),
    ("trainer build", "trainer"),
    ("checkpoint load", "train_begin"),
    ("first step", "first_step"),
)
SEGMENTS = ("detect", "backoff", "spawn", *(name for name, _ in CHILD_MARKS))
TARGET_EXCESS = 1.0


@dataclass(frozen=True)
class Startup:
    """One attempt's way from its kill (or launch) to its first step."""

    run: str
    attempt: int
    segments: dict[str, float]
    total: float
    #: "warm" when a standby took the attempt (journal ``child_started``), else "cold".
    start: str = "cold"


def _events(record: RunRecord, name: str) -> list[dict[str, Any]]:
    return [e for e in record.events if e["event"] == name]


def _child_segments(
    record: RunRecord, started_ts: float, pid: int
) -> tuple[dict[str, float], float] | None:
    beat = record.beats.get(pid)
    if beat is None or "first_step" not in beat.marks:
        return None
    segments: dict[str, float] = {}
    previous = started_ts
    for name, mark in CHILD_MARKS:
        value = beat.marks.get(mark)
        if value is None:
            return None
        segments[name] = value - previous
        previous = value
    return segments, beat.marks["first_step"]


def startups(record: RunRecord) -> tuple[Startup | None, list[Startup]]:
    """Return the run's cold start and every restart that reached its first step."""
    launches = {e["attempt"]: e for e in _events(record, "launch")}
    spawned = {e["attempt"]: e for e in _events(record, "child_started")}
    failures = {e.get("pid"): e for e in _events(record, "failure")}
    cold = None
    if 1 in launches and 1 in spawned:
        found = _child_segments(record, spawned[1]["ts"], spawned[1]["pid"])
        if found is not None:
            segments, first = found
            segments = {"spawn": spawned[1]["ts"] - launches[1]["ts"], **segments}
            cold = Startup(record.label, 1, segments, first - launches[1]["ts"])
    restarts = []
    for kill in record.kills:
        failure = failures.get(kill.pid)
        if failure is None:
            continue
        attempt = failure["attempt"] + 1
        launch, child = launches.get(attempt), spawned.get(attempt)
        if launch is None or child is None:
            continue
        found = _child_segments(record, child["ts"], child["pid"])
        if found is None:
            continue  # killed again before its first step: no complete restart
        segments, first = found
        segments = {
            "detect": failure["ts"] - kill.ts,
            "backoff": launch["ts"] - failure["ts"],
            "spawn": child["ts"] - launch["ts"],
            **segments,
        }
        start = str(child.get("start", "cold"))
        restarts.append(Startup(record.label, attempt, segments, first - kill.ts, start))
    return cold, restarts


def analyse(runs: Sequence[RunRecord]) -> Section:
    section = Section("restart", "2 restart latency")
    colds: dict[str, Startup] = {}
    restarts: list[Startup] = []
    for record in runs:
        if record.system != "trainwarden":
            continue
        cold, found = startups(record)
        if cold is not None:
            colds[record.label] = cold
        restarts += found
    warm = [r for r in restarts if r.run in colds and r.start == "warm"]
    paired = [r for r in restarts if r.run in colds and r.start != "warm"]
    if not paired:
        section.error = "no restart reached its first step (no supervised run with kills?)"
        return section
    excess = [r.total - r.segments["backoff"] - colds[r.run].total for r in paired]
    ratios = [ratio(r.total, colds[r.run].total) for r in paired]
    restart_total = median(r.total for r in paired)
    cold_total = median(c.total for c in colds.values())
    section.add(
        f"kill -> first step after resume (n={len(paired)})",
        fmt_seconds(restart_total),
    )
    section.add(
        f"cold start: launch -> first step (n={len(colds)})",
        fmt_seconds(cold_total),
    )
    section.add("restart / cold start (paired, median)", f"{median(ratios):.2f}")
    worst = max(excess)
    section.check(
        "restart - (cold start + backoff), median",
        fmt_seconds(median(excess)),
        "< 1 s",
        median(excess) < TARGET_EXCESS,
    )
    section.add("same, worst (start-up drifts with the machine's load)", fmt_seconds(worst))
    split = []
    for name in SEGMENTS:
        r = median(s.segments[name] for s in paired)
        c = median(c.segments[name] for c in colds.values()) if name in _cold_names() else math.nan
        split.append(f"{name} {_short(r)}" + (f" (cold {_short(c)})" if not math.isnan(c) else ""))
    half = (len(split) + 1) // 2
    section.add("split, restart (cold)", ", ".join(split[:half]))
    section.add("", ", ".join(split[half:]))
    if warm:
        _warm_rows(section, warm, colds)
    section.notes.append(
        "restart and cold-start samples come from the supervised goodput and save-interval "
        "runs (kills at random points, some mid-save); each restart is paired with the cold "
        "start of its own run. Child milestones are heartbeat 'marks' "
        "(trainer_child.heartbeat.mark): see bench/restart.py for each segment's bounds."
    )
    section.data.update(
        cold={k: {"segments": v.segments, "total": v.total} for k, v in colds.items()},
        restarts=[
            {"run": r.run, "attempt": r.attempt, "segments": r.segments, "total": r.total}
            for r in restarts
        ],
        excess_s=excess,
        ratio_to_cold=ratios,
    )
    return section


def _warm_rows(section: Section, warm: list[Startup], colds: dict[str, Startup]) -> None:
    """The restarts a warm standby took (the standby arms of the goodput benchmark)."""
    totals = [r.total - r.segments["backoff"] for r in warm]
    ratios = [ratio(t, colds[r.run].total) for t, r in zip(totals, warm, strict=True)]
    section.add(
        f"warm standby: kill -> first step, backoff excluded (n={len(warm)})",
        f"{fmt_seconds(median(totals))} = {median(ratios):.2f} x its run's cold start",
    )
    split = [f"{name} {_short(median(r.segments[name] for r in warm))}" for name in SEGMENTS]
    section.add("split, warm restart", ", ".join(split))


def _cold_names() -> set[str]:
    return {"spawn", *(name for name, _ in CHILD_MARKS)}


def _short(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.1f}s"


__all__ = ["SEGMENTS", "Startup", "analyse", "startups"]
