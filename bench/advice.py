"""Benchmark 7: the Young/Daly save interval, advised by ``trainwarden status`` vs measured best.

On the tiny job a save costs about what a step costs, so no save interval
would stand out. Two test facilities (trainer_child/failpoints.py) make the
trade-off visible: ``slow_step@seconds=S`` puts a floor under every step and
``slow_save@seconds=D`` sleeps before each of the four ``torch.save`` calls of
a checkpoint, so the save time is delta ~ 4 D + the real save.

Kills come from one Poisson process in wall time with mean gap M, drawn from a
seeded RNG (``KillPlan.poisson``: window/M kills at stratified uniform instants)
and anchored at the run's start, so every point of the sweep meets the kills at
the same instants (common random numbers). M is a multiple of the measured cold
start, so most attempts get to train. Each point runs a fixed window of
``advice_window_mtbf`` x M seconds, then:

* progress = the optimizer step the run had reached (the live child's step if
  training, else its newest valid checkpoint): the window's work minus what
  its kills threw away. Counting only committed steps would charge long
  intervals an extra half-interval at the window's end;
* goodput = progress x step time / window (step time = median heartbeat
  ``last_step_seconds`` over the sweep);
* ``trainwarden status`` (supervisor.report.gather_status) is asked, before
  anything is stopped, for its ``save_interval_advice``: the Young/Daly interval
  from the saves, failures and step time it observed in that run.

The sweep's grid is the a-priori advice (from the planned M and the calibrated
step and save times) times the multiples in the sizes.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import psutil

from bench.common import (
    Sizes,
    Workspace,
    median,
    sft,
    train_config,
)
from bench.killer import KillPlan
from bench.overhead import Calibration, save_seconds
from bench.report import Section
from bench.runs import RunRecord, newest_complete_step, run_job
from supervisor.core.advice import advised_save_steps, young_daly_interval
from supervisor.report import gather_status
from tests.support.jobs import supervisor_argv, write_yaml
from tests.support.outputs import heartbeat
from tests.support.processes import Process
from trainer_child.protocol import Phase

SLOW_STEP = 0.05
SLOW_SAVE = 0.4
SEED = 20240611
#: Mean time between kills, in cold starts (at least MIN_MTBF seconds).
MTBF_COLD_STARTS = 2.0
MIN_MTBF = 20.0
#: The advice passes when the grid point nearest to it reaches this share of the best goodput.
NEAR_BEST = 0.9


def _at_window(output_dir: Path) -> dict[str, Any]:
    """Progress and status advice at the window's end, before anything is stopped."""
    beat = heartbeat(output_dir)
    committed = newest_complete_step(output_dir, require_record=True)
    reached = committed
    if beat is not None and beat.phase in (Phase.TRAIN, Phase.SAVE):
        try:
            alive = psutil.Process(beat.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            alive = False
        if alive:
            reached = max(committed, beat.step)
    status = gather_status(output_dir)
    return {
        "committed": committed,
        "reached": reached,
        "advice": status.get("save_interval_advice"),
    }


def run(ws: Workspace, sizes: Sizes, calibration: Calibration) -> tuple[Section, list[RunRecord]]:
    section = Section("advice", "7 save-interval advice")
    mtbf = max(MIN_MTBF, MTBF_COLD_STARTS * calibration.cold_start)
    window = sizes.advice_window_mtbf * mtbf
    step_guess = SLOW_STEP + calibration.step
    save_guess = 4 * SLOW_SAVE + calibration.save
    prior = advised_save_steps(save_guess, mtbf, step_guess)
    grid = sorted({max(1, round(prior * m)) for m in sizes.advice_multiples})
    plan = KillPlan.poisson(mtbf, horizon=window, seed=SEED)
    failpoints = f"slow_step@seconds={SLOW_STEP};slow_save@seconds={SLOW_SAVE}"
    records: list[RunRecord] = []
    points: list[dict[str, Any]] = []
    for save_steps in grid:
        folder = ws.fresh(f"advice-save{save_steps}")
        out = folder / "out"
        fields = sft(max_steps=100_000, save_steps=save_steps, logging_steps=100_000)
        document = train_config(
            out,
            fields,
            failpoints=failpoints,
            # Measure checkpoint spacing, not the give-up policy: a long interval
            # under frequent kills is exactly "no progress" by design.
            restart={"max_restarts": 10_000, "no_progress_limit": 10_000},
        )
        config = write_yaml(folder / "job.yaml", document)
        proc = Process(supervisor_argv(config), ws.env, folder / "supervisor.log")
        record = run_job(
            proc,
            out,
            label=f"advice-save{save_steps}",
            system="trainwarden",
            cap=window + 60,
            plan=plan,
            window=window,
            at_window=partial(_at_window, out),
        )
        records.append(record)
        saves = save_seconds(out)
        points.append(
            {
                "save_steps": save_steps,
                "reached": record.window.get("reached", 0),
                "committed": record.window.get("committed", 0),
                "advice": record.window.get("advice"),
                "kills": len(record.kills),
                "kills_in_load": sum(1 for k in record.kills if k.phase == "load"),
                "save_s": median(saves),
            }
        )
    step_times = [
        b.last_step_seconds for r in records for b in r.beats.values() if b.last_step_seconds
    ]
    step = median(step_times)
    for point in points:
        point["goodput"] = point["reached"] * step / window
    best = max(points, key=lambda p: p["goodput"])
    advised = [p["advice"]["advised_save_steps"] for p in points if p["advice"]]
    status_advice = round(median(advised)) if advised else None
    delta = median(p["save_s"] for p in points if not math.isnan(p["save_s"]))
    kills = sum(p["kills"] for p in points)
    observed_mtbf = len(points) * window / kills if kills else math.inf
    theory = advised_save_steps(delta, mtbf, step) if delta > 0 and step > 0 else None
    for point in points:
        tags = []
        if point is best:
            tags.append("best")
        if status_advice is not None and point is _nearest(points, status_advice):
            tags.append("nearest advice")
        section.add(
            f"save_steps={point['save_steps']}" + (f" ({', '.join(tags)})" if tags else ""),
            f"goodput {point['goodput']:.2f}, step {point['reached']} "
            f"({point['kills']} kills, {point['kills_in_load']} during load)",
        )
    if status_advice is None:
        section.check("trainwarden status advice", "none given", "near best", False)
    else:
        nearest = _nearest(points, status_advice)
        share = nearest["goodput"] / best["goodput"] if best["goodput"] > 0 else math.nan
        section.add(
            "trainwarden status: advised save_steps (median over runs)",
            f"{status_advice} (per run: {', '.join(str(a) for a in advised)})",
        )
        section.check(
            "goodput at the grid point nearest the advice / best",
            f"{share:.2f} (best save_steps={best['save_steps']})",
            f">= {NEAR_BEST:.2f}",
            share >= NEAR_BEST,
        )
    if theory is not None:
        section.add(
            "Young/Daly from the planned M and measured delta, step",
            f"{theory} steps (tau {young_daly_interval(delta, mtbf):.1f} s; delta "
            f"{delta:.2f} s, M {mtbf:.0f} s, step {step * 1000:.0f} ms)",
        )
    section.notes.append(
        f"slow_step@seconds={SLOW_STEP} and slow_save@seconds={SLOW_SAVE} (test failpoints) "
        f"give a step of ~{step * 1000:.0f} ms and a save of ~{delta:.1f} s, so checkpoint "
        "spacing matters on this tiny job. Kills: Poisson, mean gap M = "
        f"{mtbf:.0f} s ({MTBF_COLD_STARTS:.0f}x cold start, seed {SEED}), the same instants "
        f"for every point; window {window:.0f} s each ({kills} kills in all, observed "
        f"MTBF {observed_mtbf:.0f} s). goodput = step reached x step time / window."
    )
    section.data.update(
        mtbf_s=mtbf,
        window_s=window,
        prior_advice=prior,
        grid=grid,
        points=points,
        step_s=step,
        delta_s=delta,
        status_advice=status_advice,
        theory_advice=theory,
        best_save_steps=best["save_steps"],
        kill_gaps_s=list(plan.gaps),
    )
    return section, records


def _nearest(points: list[dict[str, Any]], save_steps: int) -> dict[str, Any]:
    """The grid point closest to ``save_steps`` on a log scale (the grid is geometric)."""
    return min(points, key=lambda p: abs(math.log(p["save_steps"] / save_steps)))


__all__ = ["run"]
