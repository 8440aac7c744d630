"""What `trainwarden status`, `checkpoints` and `prune` read and print.

Everything here works from the files alone (state.json, heartbeat.json,
events.jsonl, the checkpoint folders), so it answers while a supervisor runs,
after it died, or for a run that finished long ago.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table

from supervisor.core.accounting import ProgressSample, account
from supervisor.core.advice import advised_save_steps
from supervisor.core.policy import human_size
from supervisor.shell.journal import read_events, read_loss_log, read_state
from supervisor.shell.launcher import process_alive
from supervisor.shell.store import FileCheckpointStore, describe_checkpoints, plan_prune
from trainer_child.protocol import (
    COMMIT_RECORD,
    TRAINER_STATE,
    CommitRecord,
    Heartbeat,
    JobFile,
    JournalEntry,
    Layout,
    RunStateFile,
    StandbyFile,
    read_model,
)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        return process_alive(pid)
    except psutil.Error:  # e.g. AccessDenied: status only guesses, it must not fail
        return False


def gather_status(output_dir: Path) -> dict[str, Any]:
    """Collect a run's status as plain data (the --json output)."""
    layout = Layout(output_dir)
    state = read_state(layout)
    beat = read_model(layout.heartbeat, Heartbeat)
    events = read_events(layout)
    rows = describe_checkpoints(output_dir, deep=False)
    valid = [r for r in rows if r.status == "valid"]
    newest = max(valid, key=lambda r: r.step) if valid else None
    failures = [e for e in events if e.event == "failure"]
    by_kind = Counter(e.kind or "crash" for e in failures)
    usage = os.statvfs(output_dir)
    supervisor_alive = _alive(state.supervisor_pid if state else None)
    child_alive = _alive(state.child_pid if state else None)

    run_state = _run_state(layout, state, supervisor_alive=supervisor_alive)
    eta, steps_per_second = _pace(beat, run_state)
    # The same samples the report draws from, so both tell the same loss.
    samples = [
        ProgressSample(line.wall_time, line.step, line.attempt)
        for line in read_loss_log(layout)
        if line.attempt is not None
    ]
    if beat is not None and beat.attempt is not None:
        samples.append(ProgressSample(beat.wall_time, beat.step, beat.attempt))
    # A live run is measured up to now; a dead one up to its last sign of life.
    accounting = account(events, samples, now=time.time() if supervisor_alive else None)

    return {
        "output_dir": str(output_dir),
        "state": run_state,
        "status": state.status if state else "",
        "supervisor_pid": state.supervisor_pid if state and supervisor_alive else None,
        "child_pid": state.child_pid if state and child_alive else None,
        "step": beat.step if beat else (state.step if state else None),
        "max_steps": beat.max_steps if beat else (state.max_steps if state else None),
        "phase": beat.phase.value if beat else None,
        "heartbeat_age_seconds": round(time.time() - beat.wall_time, 1) if beat else None,
        "eta_seconds": round(eta, 1) if eta is not None else None,
        "steps_per_second": round(steps_per_second, 4) if steps_per_second else None,
        "newest_valid_checkpoint": newest.step if newest else None,
        "attempts": state.attempts if state else 0,
        "restarts": sum(by_kind.values()),
        "restarts_by_kind": dict(by_kind),
        "overrides": state.overrides.model_dump(exclude_none=True) if state else {},
        "last_failure": _failure(failures[-1]) if failures else None,
        "gave_up": state.gave_up if state else None,
        "lost_seconds": round(accounting.lost_seconds, 1),
        "steps_lost": accounting.steps_lost,
        "goodput": round(accounting.goodput, 4) if accounting.goodput is not None else None,
        "disk_free_bytes": usage.f_bavail * usage.f_frsize,
        "disk_total_bytes": usage.f_blocks * usage.f_frsize,
        "save_interval_advice": _advice(output_dir, events, beat, rows),
        "standby": _standby(layout, events, state),
        **_mirror(state),
    }


def _mirror(state: RunStateFile | None) -> dict[str, Any]:
    """With a ``mirror:``, its lag line (``remote: checkpoint-400, 2 behind``) and count."""
    return {
        "mirror": state.mirror_status if state else None,
        "mirror_lag": state.mirror_lag if state else None,
    }


def _pace(beat: Heartbeat | None, run_state: str) -> tuple[float | None, float | None]:
    """Seconds left at the last step's pace (while not complete), and steps per second."""
    if beat is None or not beat.last_step_seconds:
        return None, None
    eta = None
    if beat.max_steps and run_state != "completed":
        eta = max(0, beat.max_steps - beat.step) * beat.last_step_seconds
    return eta, 1.0 / beat.last_step_seconds


def _standby(layout: Layout, events: list[Any], state: RunStateFile | None) -> dict[str, Any]:
    """How the last attempt began (warm or cold, and why) and the standby kept now, if any."""
    starts = [e for e in events if e.event == "child_started"]
    extra = (starts[-1].model_extra or {}) if starts else {}
    record = read_model(layout.standby, StandbyFile)
    child = state.child_pid if state else None
    idle = record is not None and record.pid != child and _alive(record.pid)
    return {
        "last_start": extra.get("start"),
        "last_start_why": extra.get("why") or None,
        "warm_starts": sum(1 for e in starts if (e.model_extra or {}).get("start") == "warm"),
        "starts": len(starts),
        "now": record.model_dump(mode="json") if idle and record is not None else None,
    }


def _run_state(layout: Layout, state: RunStateFile | None, *, supervisor_alive: bool) -> str:
    """One word or two for the run as a whole, from state.json and whether its supervisor lives."""
    if state is None:
        return "not started"
    if state.completed or (layout.final / COMMIT_RECORD).exists():
        return "completed"
    if state.gave_up:
        return "gave up"
    if supervisor_alive:
        return state.mode or "running"
    return "not running"


def _failure(entry: JournalEntry) -> dict[str, Any]:
    extra = entry.model_extra or {}
    return {
        "kind": entry.kind,
        "attempt": entry.attempt,
        "step": extra.get("step"),
        "evidence": extra.get("evidence"),
        "ts": entry.ts,
    }


def _advice(output_dir: Path, events: list[Any], beat: Heartbeat | None, rows: list[Any]) -> Any:
    """Young/Daly save interval from measured save time, step time and failure rate."""
    saves = []
    records = []
    for row in rows:
        if row.status != "valid":
            continue
        record = read_model(output_dir / f"checkpoint-{row.step}" / "warden.json", CommitRecord)
        if record is not None and record.save_seconds:
            saves.append(record.save_seconds)
            records.append(record)
    failures = [e for e in events if e.event == "failure"]
    launches = [e for e in events if e.event == "launch"]
    # A child still loading after a restart (exactly when advice matters) has no
    # step time in its heartbeat yet: take it from the commit records instead.
    step_seconds = (beat.last_step_seconds if beat else None) or _step_seconds(records)
    if not saves or not failures or not launches or beat is None or not step_seconds:
        return None
    # The heartbeat is the newest sign of failure-free time when no event followed it.
    end = max(beat.wall_time, *(e.ts for e in events))
    span = end - min(e.ts for e in launches)
    mtbf = span / len(failures)
    if mtbf <= 0:
        return None
    save = sum(saves) / len(saves)
    return {
        "save_seconds": round(save, 3),
        "mtbf_seconds": round(mtbf, 1),
        "step_seconds": round(step_seconds, 4),
        "advised_save_steps": advised_save_steps(save, mtbf, step_seconds),
        "configured_save_steps": _configured_save_steps(output_dir, rows),
    }


def _step_seconds(records: list[CommitRecord]) -> float | None:
    """Seconds per step between consecutive commits of one attempt, save time taken out."""
    spans = []
    ordered = sorted(records, key=lambda r: r.step)
    for before, after in itertools.pairwise(ordered):
        if after.attempt == before.attempt and after.step > before.step and after.wall_time:
            work = after.wall_time - before.wall_time - (after.save_seconds or 0.0)
            if work > 0:
                spans.append(work / (after.step - before.step))
    return sorted(spans)[len(spans) // 2] if spans else None


def _configured_save_steps(output_dir: Path, rows: list[Any]) -> int | None:
    """The save_steps in force: HF's trainer_state.json records it, else the job file."""
    for row in sorted((r for r in rows if r.status == "valid"), key=lambda r: -r.step):
        with contextlib.suppress(OSError, ValueError):
            state = json.loads((output_dir / f"checkpoint-{row.step}" / TRAINER_STATE).read_text())
            if isinstance(state, dict) and isinstance(state.get("save_steps"), int):
                return int(state["save_steps"])
    job = read_model(Layout(output_dir).job, JobFile)
    value = job.train.sft.get("save_steps") if job is not None else None
    return value if isinstance(value, int) else None


def _size(n: int | None) -> str:
    return "-" if n is None else human_size(n)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _progress(report: dict[str, Any]) -> RenderableType:
    """Step of max_steps as a bar, with the percentage, speed, ETA and phase beside it."""
    step, total = report["step"], report["max_steps"]
    if step is None:
        return "-"
    text = f"{step}/{total or '?'}"
    if total:
        text += f" {min(step, total) / total:.0%}"
    if report.get("steps_per_second"):
        text += f"  {report['steps_per_second']:.3g} steps/s"
    if report["eta_seconds"] is not None:
        text += f"  ETA {_duration(report['eta_seconds'])}"
    if report["phase"]:
        text += f"  ({report['phase']})"
    if not total:
        return text
    finished = report["state"] == "completed"
    grid = Table.grid(padding=(0, 1))
    grid.add_row(
        ProgressBar(
            total=total,
            completed=total if finished else min(step, total),
            width=32,
            complete_style="cyan",
            finished_style="green",
        ),
        text,
    )
    return grid


def render_status(report: dict[str, Any], console: Console) -> None:
    """Print the status report as a small table."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(report["restarts_by_kind"].items()))
    table.add_row("output_dir", report["output_dir"])
    table.add_row("state", report["state"])
    if report["status"]:
        table.add_row("status", report["status"])
    table.add_row("step", _progress(report))
    newest = report["newest_valid_checkpoint"]
    table.add_row("newest valid", f"checkpoint-{newest}" if newest is not None else "none")
    if report.get("mirror"):
        table.add_row("mirror", report["mirror"])
    table.add_row("restarts", f"{report['restarts']}" + (f" ({kinds})" if kinds else ""))
    if report["restarts"]:
        table.add_row(
            "lost",
            f"{report['steps_lost']} steps, {_duration(report['lost_seconds'])}"
            + (f" (goodput {report['goodput']:.0%})" if report["goodput"] is not None else ""),
        )
    if report["overrides"]:
        table.add_row("overrides", ", ".join(f"{k}={v}" for k, v in report["overrides"].items()))
    table.add_row(
        "disk free", f"{_size(report['disk_free_bytes'])} of {_size(report['disk_total_bytes'])}"
    )
    last = report["last_failure"]
    if last:
        table.add_row("last failure", f"{last['kind']} at step {last['step']}: {last['evidence']}")
    if report["gave_up"]:
        table.add_row("gave up", report["gave_up"])
    _standby_rows(table, report["standby"])
    advice = report["save_interval_advice"]
    if advice:
        table.add_row(
            "save interval",
            f"advise save_steps={advice['advised_save_steps']}"
            f" (configured {advice.get('configured_save_steps') or '?'}; Young/Daly: save "
            f"{advice['save_seconds']}s, MTBF {advice['mtbf_seconds']}s, step "
            f"{advice['step_seconds']}s)",
        )
    console.print(table)


def _standby_rows(table: Table, standby: dict[str, Any]) -> None:
    if standby["last_start"]:
        why = standby["last_start_why"]
        table.add_row(
            "last start",
            f"{standby['last_start']}"
            + (f" ({why})" if why else "")
            + f"; {standby['warm_starts']} of {standby['starts']} starts warm",
        )
    now = standby["now"]
    if now:
        size = _size(now["rss_bytes"]) if now.get("rss_bytes") else "?"
        held = f", holds {now['preloaded']}" if now.get("preloaded") else ""
        table.add_row("standby", f"{now['state']}, pid {now['pid']}, {size}{held}")


def render_checkpoints(output_dir: Path, *, deep: bool, console: Console) -> None:
    """Print every checkpoint folder with its verdict and size."""
    table = Table(title=f"checkpoints in {output_dir}")
    rows = describe_checkpoints(output_dir, deep=deep)
    # Names are never truncated or wrapped ("…" would hide which folder is
    # meant); the problems column wraps instead.
    widest = max((len(row.name) for row in rows), default=10)
    table.add_column("checkpoint", no_wrap=True, min_width=widest)
    for column in ("status", "size", "problems"):
        table.add_column(column)
    colours = {"valid": "green", "in_progress": "cyan", "partial": "yellow", "corrupt": "red"}
    for row in rows:
        colour = colours.get(row.status, "magenta")
        table.add_row(
            row.name,
            f"[{colour}]{row.status}[/]",
            _size(row.size_bytes),
            "; ".join(row.problems),
        )
    console.print(table)


def run_prune(
    output_dir: Path,
    *,
    keep_last: int,
    keep_best: bool,
    keep_every: int | None,
    dry_run: bool,
    console: Console,
) -> int:
    """Delete what retention would delete, each through ``.warden/trash``.

    It does not look for a running supervisor: run it on a stopped run, or trust
    that the newest valid checkpoint (always kept) is what a live one needs.
    """
    doomed = plan_prune(output_dir, keep_last=keep_last, keep_best=keep_best, keep_every=keep_every)
    if not doomed:
        console.print("nothing to prune")
        return 0
    verb = "would remove" if dry_run else "removing"
    for step in doomed:
        console.print(f"{verb} checkpoint-{step}")
    if dry_run:
        return 0
    store = FileCheckpointStore(output_dir, require_record=False)
    for step in doomed:
        store.remove(step, "trainwarden prune")
    return 0
