"""``trainwarden report``: the night in one picture.

Top panel: training loss (and learning rate, right axis) against the optimizer
step, one colour per attempt, so steps done again after a failure show as a
second line over the same steps; each failure is a vertical line at the step it
happened, coloured by kind, with the steps it cost shaded back to where the next
attempt resumed; committed checkpoints are ticks along the bottom.

Bottom panel: wall-clock time, one row per attempt: training, restarting
(backoff), waiting (disk, orphan) and down (no supervisor), with each failure
marked and the time lost to failures hatched across the rows.

The loss comes from ``.warden/metrics.jsonl`` (written by ``WardenCallback``);
without it, from ``log_history`` in the newest checkpoint's (or final/'s)
``trainer_state.json``, which only holds the history that survived (no
re-done steps, no attempts).

Colours are mid-tones on a transparent background, and text and axes are a
mid grey: the same PNG stays readable in a dark and in a light README or chat
window, where a white or black canvas would glare or vanish.

matplotlib is an optional extra (``trainwarden[report]``) imported only here,
inside ``render_report``, with the Agg backend (no display needed).
"""

from __future__ import annotations

import json
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supervisor.core.accounting import Accounting, Activity, ProgressSample, RunResult, account
from supervisor.errors import MissingExtra
from supervisor.shell.journal import read_events, read_loss_log, read_state
from trainer_child.protocol import (
    TRAINER_STATE,
    Heartbeat,
    Layout,
    checkpoint_step,
    read_model,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["LossPoint", "RunData", "load_run", "render_report"]

#: Mid-tone palettes: readable on white and on near-black alike.
TEXT = "#8a8a8a"
#: Colour says *which attempt* (blues, greens, golds) or *which failure kind* (reds,
#: purples, oranges); time not spent training is grey, so the two never compete.
ATTEMPT_COLOURS = ("#4c9be8", "#2fb5a8", "#8db33a", "#7f8fd8", "#d9a93a", "#b9805b")
KIND_COLOURS = {
    "crash": "#e05561",
    "hang": "#b667d8",
    "cuda_oom": "#f08c2e",
    "host_oom": "#d9663c",
    "disk_full": "#e052a0",
    "resume": "#a0522d",
    "config": "#cc3b3b",
    "no_progress": "#8f7f5f",
}
GREY = "#9a9a9a"
RESULT_WORDS = {
    RunResult.COMPLETED: "completed",
    RunResult.GAVE_UP: "gave up",
    RunResult.RUNNING: "running",
    RunResult.PREEMPTED: "stopped (preempted)",
    RunResult.STOPPED: "stopped",
    RunResult.NOT_STARTED: "not started",
}


@dataclass(frozen=True)
class LossPoint:
    """One logged training loss; ``attempt``/``wall_time`` are None from trainer_state."""

    step: int
    loss: float | None
    learning_rate: float | None
    attempt: int | None
    wall_time: float | None


@dataclass(frozen=True)
class RunData:
    """Everything the picture needs, read from one output_dir."""

    output_dir: Path
    name: str
    accounting: Accounting
    points: tuple[LossPoint, ...]
    loss_source: str
    max_steps: int | None


def _trainer_state_points(output_dir: Path) -> tuple[list[LossPoint], str]:
    """Fallback: log_history of final/ or the newest checkpoint that has one."""
    candidates = [output_dir / "final"]
    steps = sorted(
        (s for p in output_dir.glob("checkpoint-*") if (s := checkpoint_step(p.name)) is not None),
        reverse=True,
    )
    candidates += [output_dir / f"checkpoint-{s}" for s in steps]
    for folder in candidates:
        try:
            history = json.loads((folder / TRAINER_STATE).read_text()).get("log_history", [])
        except (OSError, ValueError, AttributeError):
            continue
        points = [
            LossPoint(
                step=int(entry["step"]),
                loss=float(entry["loss"]) if isinstance(entry.get("loss"), int | float) else None,
                learning_rate=(
                    float(entry["learning_rate"])
                    if isinstance(entry.get("learning_rate"), int | float)
                    else None
                ),
                attempt=None,
                wall_time=None,
            )
            for entry in history
            if isinstance(entry, dict)
            and isinstance(entry.get("step"), int)
            and ("loss" in entry or "learning_rate" in entry)
        ]
        if points:
            return points, f"{folder.name}/{TRAINER_STATE}"
    return [], "none"


def load_run(output_dir: str | Path) -> RunData:
    """Read the journal, loss log, heartbeat and state of a run (running or not)."""
    root = Path(output_dir)
    layout = Layout(root)
    events = read_events(layout)
    lines = read_loss_log(layout)
    points = [LossPoint(m.step, m.loss, m.learning_rate, m.attempt, m.wall_time) for m in lines]
    source = "metrics.jsonl"
    if not points:
        points, source = _trainer_state_points(root)
    samples = [
        ProgressSample(p.wall_time, p.step, p.attempt)
        for p in points
        if p.attempt is not None and p.wall_time is not None
    ]
    beat = read_model(layout.heartbeat, Heartbeat)
    if beat is not None and beat.attempt is not None:
        samples.append(ProgressSample(beat.wall_time, beat.step, beat.attempt))
    # A run still going is drawn as of its last sign of life, so the same files
    # always give the same picture.
    last = max([e.ts for e in events] + [s.wall_time for s in samples], default=None)
    summary = account(events, samples, now=last)
    state = read_state(layout)
    max_steps = (beat.max_steps if beat else None) or (state.max_steps if state else None)
    name = root.resolve().name or str(root)
    return RunData(root, name, summary, tuple(points), source, max_steps)


# --- drawing -------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _title(run: RunData) -> str:
    acc = run.accounting
    headline = f"{run.name}: {RESULT_WORDS[acc.result]}"
    if acc.last_step is not None:
        headline += f" at step {acc.last_step}" + (f"/{run.max_steps}" if run.max_steps else "")
    parts = [f"{acc.restarts} {'restart' if acc.restarts == 1 else 'restarts'}"]
    if acc.failures:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(acc.failures_by_kind.items()))
        parts.append(f"failures: {kinds}")
        parts.append(f"lost {acc.steps_lost} steps and {_duration(acc.lost_seconds)}")
    if acc.goodput is not None:
        parts.append(f"goodput {acc.goodput:.0%}")
    parts.append(f"wall {_duration(acc.wall_seconds)}")
    lines = [headline, " · ".join(parts)]
    if acc.result is RunResult.GAVE_UP and acc.reason:
        reason = textwrap.shorten(acc.reason, width=220, placeholder="…")
        lines += textwrap.wrap(f"gave up: {reason}", width=125)
    return "\n".join(lines)


def _attempt_colour(attempt: int | None) -> str:
    if attempt is None:
        return ATTEMPT_COLOURS[0]
    return ATTEMPT_COLOURS[(attempt - 1) % len(ATTEMPT_COLOURS)]


def _style_axes(ax: Axes) -> None:
    ax.set_facecolor("none")
    for spine in ax.spines.values():
        spine.set_color(TEXT)
    ax.tick_params(colors=TEXT, which="both")
    ax.xaxis.label.set_color(TEXT)
    ax.yaxis.label.set_color(TEXT)
    ax.grid(True, color=TEXT, alpha=0.18, linewidth=0.6)


def _draw_loss(ax: Axes, run: RunData) -> list[Any]:
    """Panel 1: loss per attempt, learning rate, failures and commits; returns legend handles."""
    handles = _draw_loss_lines(ax, run)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    handles += _draw_learning_rate(ax, run)
    handles += _draw_failures_by_step(ax, run)
    handles += _draw_commits_by_step(ax, run)
    acc = run.accounting
    if run.max_steps:
        ax.set_xlim(left=0, right=max(run.max_steps, acc.last_step or 0) * 1.01)
    else:
        ax.set_xlim(left=0)
    return handles


def _draw_loss_lines(ax: Axes, run: RunData) -> list[Any]:
    """One line per attempt, so steps done again after a failure show twice."""
    handles: list[Any] = []
    attempts = sorted({p.attempt for p in run.points}, key=lambda a: -1 if a is None else a)
    for attempt in attempts:
        pts = sorted((p for p in run.points if p.attempt == attempt), key=lambda p: p.step)
        xs = [p.step for p in pts if p.loss is not None]
        ys = [p.loss for p in pts if p.loss is not None]
        if not xs:
            continue
        (line,) = ax.plot(
            xs,
            ys,
            color=_attempt_colour(attempt),
            zorder=3,
            linewidth=1.8,
            marker="o" if len(xs) <= 60 else None,
            markersize=3.5,
            label=f"attempt {attempt}" if attempt is not None else "loss (trainer_state)",
        )
        handles.append(line)
    if not any(p.loss is not None for p in run.points):
        ax.text(
            0.5,
            0.5,
            "no loss logged (no .warden/metrics.jsonl, no trainer_state.json)",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color=TEXT,
        )
    return handles


def _draw_learning_rate(ax: Axes, run: RunData) -> list[Any]:
    """The learning rate on a dashed twin axis (the latest attempt's value per step)."""
    by_step: dict[int, float] = {}
    for p in sorted(run.points, key=lambda p: (p.attempt or 0, p.wall_time or 0.0)):
        if p.learning_rate is not None:
            by_step[p.step] = p.learning_rate  # the latest attempt's value wins
    if not by_step:
        return []
    lr_ax = ax.twinx()
    _style_axes(lr_ax)
    lr_ax.grid(False)
    steps = sorted(by_step)
    (lr_line,) = lr_ax.plot(
        steps,
        [by_step[s] for s in steps],
        color=TEXT,
        linestyle="--",
        linewidth=1.1,
        alpha=0.8,
        label="learning rate",
    )
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    lr_ax.yaxis.get_offset_text().set_color(TEXT)
    return [lr_line]


def _draw_failures_by_step(ax: Axes, run: RunData) -> list[Any]:
    """A line per failure at its step, coloured by kind, with the steps it cost hatched."""
    from matplotlib.patches import Patch  # noqa: PLC0415 - matplotlib is optional
    from matplotlib.transforms import blended_transform_factory  # noqa: PLC0415

    handles: list[Any] = []
    kinds_seen: set[str] = set()
    labels: dict[int, list[str]] = {}
    for failure in run.accounting.failures:
        if failure.step is None:
            continue
        colour = KIND_COLOURS.get(failure.kind, KIND_COLOURS["crash"])
        ax.axvline(failure.step, color=colour, linewidth=1.6, alpha=0.95, zorder=1)
        lost = failure.steps_lost
        if lost and failure.resume_step is not None:
            ax.axvspan(
                failure.resume_step,
                failure.step,
                facecolor=colour,
                edgecolor=colour,
                alpha=0.13,
                hatch="///",
                linewidth=0,
                zorder=0,
            )
        label = f"{failure.kind}, attempt {failure.attempt}"
        if lost:
            label += f", {lost} {'step' if lost == 1 else 'steps'} lost"
        labels.setdefault(failure.step, []).append(label)
        if failure.kind not in kinds_seen:
            kinds_seen.add(failure.kind)
            handles.append(Patch(color=colour, alpha=0.7, label=f"failure: {failure.kind}"))
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for step, texts in labels.items():
        # Vertical, along the failure's line: labels of nearby failures never collide.
        ax.text(step, 0.975, " / ".join(texts), transform=top, rotation=90, ha="right",
                va="top", fontsize=8, color=TEXT, zorder=6)  # fmt: skip
    if any((f.steps_lost or 0) > 0 for f in run.accounting.failures):
        handles.append(
            Patch(facecolor="none", edgecolor=TEXT, hatch="///", label="steps done again")
        )
    return handles


def _draw_commits_by_step(ax: Axes, run: RunData) -> list[Any]:
    """A tick along the bottom for every committed checkpoint."""
    from matplotlib.lines import Line2D  # noqa: PLC0415 - matplotlib is optional
    from matplotlib.transforms import blended_transform_factory  # noqa: PLC0415

    commit_steps = sorted({c.step for c in run.accounting.commits})
    if not commit_steps:
        return []
    top = blended_transform_factory(ax.transData, ax.transAxes)
    ax.scatter(commit_steps, [0.015] * len(commit_steps), transform=top, marker="^", s=36,
               color=TEXT, zorder=5, clip_on=False)  # fmt: skip
    return [Line2D([], [], marker="^", linestyle="none", color=TEXT, label="checkpoint committed")]


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds < 180:
        return 1.0, "s"
    if seconds < 3 * 3600:
        return 60.0, "min"
    return 3600.0, "h"


def _draw_timeline(ax: Axes, run: RunData) -> list[Any]:
    """Panel 2: one lane per attempt over wall-clock time; returns legend handles."""
    acc = run.accounting
    start = acc.started
    if start is None or not acc.spans:
        ax.text(
            0.5, 0.5, "no journal", transform=ax.transAxes, ha="center", va="center", color=TEXT
        )
        ax.set_yticks([])
        return []
    scale, unit = _time_unit(acc.wall_seconds)
    attempts = sorted({s.attempt for s in acc.spans}) or [1]
    row = {attempt: i for i, attempt in enumerate(attempts)}
    handles = _draw_spans(ax, acc, start, scale, row)
    handles += _draw_failures_in_time(ax, acc, start, scale, row)
    ax.set_yticks(range(len(attempts)), [f"attempt {a}" for a in attempts])
    ax.set_ylim(len(attempts) - 0.4, -0.6)
    ax.set_xlim(0, max(acc.wall_seconds / scale, 1e-6))
    ax.set_xlabel(f"wall-clock time since the first launch ({unit})")
    return handles


def _draw_spans(
    ax: Axes, acc: Accounting, start: float, scale: float, row: dict[int, int]
) -> list[Any]:
    """Training, restarting, waiting and supervisor-down spans, each in its lane."""
    from matplotlib.patches import Patch  # noqa: PLC0415 - matplotlib is optional

    for span in acc.spans:
        bar = ((span.start - start) / scale, max(span.seconds / scale, 1e-9))
        lane = (row[span.attempt] - 0.35, 0.7)
        if span.activity is Activity.TRAINING:
            ax.broken_barh([bar], lane, facecolors=_attempt_colour(span.attempt))
        elif span.activity is Activity.RESTARTING:
            ax.broken_barh([bar], lane, facecolors=GREY)
        elif span.activity is Activity.WAITING:
            ax.broken_barh([bar], lane, facecolors="none", edgecolor=GREY, hatch="..")
        else:
            ax.broken_barh([bar], lane, facecolors="none", edgecolor=GREY, linestyle=":")
    seen = {s.activity for s in acc.spans}
    legend = {
        Activity.TRAINING: Patch(color=ATTEMPT_COLOURS[0], label="training (attempt's colour)"),
        Activity.RESTARTING: Patch(color=GREY, label="restarting (backoff)"),
        Activity.WAITING: Patch(facecolor="none", edgecolor=GREY, hatch="..", label="waiting"),
        Activity.DOWN: Patch(
            facecolor="none", edgecolor=GREY, linestyle=":", label="no supervisor"
        ),
    }
    return [patch for activity, patch in legend.items() if activity in seen]


def _draw_failures_in_time(
    ax: Axes, acc: Accounting, start: float, scale: float, row: dict[int, int]
) -> list[Any]:
    """Each failure as a cross in its attempt's lane; the time it cost hatched; commits."""
    from matplotlib.lines import Line2D  # noqa: PLC0415 - matplotlib is optional
    from matplotlib.patches import Patch  # noqa: PLC0415

    handles: list[Any] = []
    lost_drawn = False
    for failure in acc.failures:
        colour = KIND_COLOURS.get(failure.kind, KIND_COLOURS["crash"])
        end = failure.regained_at if failure.regained_at is not None else acc.ended
        if end is not None and end > failure.began:
            ax.axvspan((failure.began - start) / scale, (end - start) / scale, facecolor="none",
                       edgecolor=colour, hatch="///", alpha=0.3, linewidth=0, zorder=0)  # fmt: skip
            lost_drawn = True
        ax.scatter([(failure.ts - start) / scale], [row.get(failure.attempt, 0)], marker="X",
                   s=90, color=colour, edgecolors="white", linewidths=0.6, zorder=6)  # fmt: skip
    if lost_drawn:
        handles.append(
            Patch(facecolor="none", edgecolor=TEXT, hatch="///", label="lost to failures")
        )
    if acc.commits:
        ax.scatter(
            [(c.ts - start) / scale for c in acc.commits],
            [row.get(c.attempt, 0) + 0.42 for c in acc.commits],
            marker="v",
            s=22,
            color=TEXT,
            zorder=5,
        )
    if acc.failures:
        handles.append(
            Line2D([], [], marker="X", linestyle="none", color=TEXT, label="failure", markersize=8)
        )
    return handles


def render_report(run: RunData, out: str | Path, *, dpi: int = 120) -> Path:
    """Draw ``run`` into a PNG at ``out`` and return its path."""
    try:
        import matplotlib  # noqa: PLC0415 - optional extra, imported on use only

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as exc:
        raise MissingExtra(
            "trainwarden report draws with matplotlib, which is not installed: "
            "pip install 'trainwarden[report]'"
        ) from exc

    attempts = len({s.attempt for s in run.accounting.spans}) or 1
    timeline_height = 1.2 + 0.38 * min(attempts, 12)
    fig, (loss_ax, time_ax) = plt.subplots(
        2,
        1,
        figsize=(12, 5.2 + timeline_height),
        gridspec_kw={"height_ratios": [5.2, timeline_height]},
        layout="constrained",
    )
    try:
        fig.patch.set_alpha(0.0)
        for ax in (loss_ax, time_ax):
            _style_axes(ax)
        loss_handles = _draw_loss(loss_ax, run)
        time_handles = _draw_timeline(time_ax, run)
        time_ax.grid(True, axis="x", color=TEXT, alpha=0.18)
        time_ax.grid(False, axis="y")
        for ax, handles in ((loss_ax, loss_handles), (time_ax, time_handles)):
            if handles:
                legend = ax.legend(
                    handles=handles,
                    loc="upper left",
                    bbox_to_anchor=(1.085, 1.0),
                    frameon=False,
                    fontsize=9,
                    labelcolor=TEXT,
                )
                legend.get_frame().set_alpha(0)
        title = _title(run)
        fig.suptitle(title, color=TEXT, fontsize=12.5, x=0.01, ha="left", linespacing=1.5)
        footer = f"loss from {run.loss_source}; drawn {time.strftime('%Y-%m-%d %H:%M')}"
        fig.text(0.995, 0.005, footer, color=TEXT, fontsize=7.5, ha="right", va="bottom")
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, transparent=True)
    finally:
        plt.close(fig)
    return path
