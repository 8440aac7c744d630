"""Benchmark 5: goodput under failure, trainwarden vs the naive restart loop users write today.

Both run the same built-in job with the ``slow_save`` failpoint (each of HF's
four ``torch.save`` calls per checkpoint sleeps first, so a save takes about a
second), under the same ``KillPlan`` from ``killer.py``: SIGKILL the training
child every T seconds, and every second kill waits for a save to start and
lands inside it (leaving ``checkpoint-N`` without ``trainer_state.json``, as a
real crash mid-save does).

T is swept as ``1.3 x start-up + f x clean training time`` for the fractions in
the sizes, both measured on a clean supervised run of this job first, so every
attempt gets about a fraction f of the job's training before it dies, on any
machine (the margin absorbs start-up drifting with the machine's load).

goodput = kept steps x clean seconds per step / wall, where clean seconds per
step = (train_end - train_begin) / steps of the clean run (saves included).
A finished run kept every step; an unfinished one (capped, gave up, or a naive
loop caught crash-looping) is charged the whole cap and kept its newest
complete checkpoint. The naive loop resumes from ``get_last_checkpoint``,
which picks the newest folder unchecked: after a mid-save kill it resumes from
the partial folder, HF raises on the missing ``trainer_state.json``, and the
loop retries the same folder forever. The driver stops it after two such
crashes in a row (nothing changes between tries) and charges it the cap.
The clean run is also the reference: a finished run's final adapter must be
bit-identical to it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.common import (
    Sizes,
    Workspace,
    fmt_seconds,
    naive_argv,
    sft,
    train_config,
)
from bench.killer import KillPlan
from bench.overhead import Calibration
from bench.report import Section, verdict_of
from bench.runs import RunRecord, newest_complete_step, run_job
from tests.support.jobs import supervisor_argv, write_job, write_yaml
from tests.support.processes import Process
from trainer_child.protocol import ENV_FAILPOINTS

#: Each torch.save of a checkpoint sleeps this long first (four per checkpoint).
SLOW_SAVE = 0.2
MID_SAVE_EVERY = 2
#: An unfinished run is stopped (and charged) at this multiple of the clean run's wall time.
CAP_FACTOR = 4.0
#: T allows this multiple of the measured start-up before the training share.
STARTUP_MARGIN = 1.3


def _adapter(folder: Path) -> dict[str, Any]:
    from safetensors.numpy import load_file

    return dict(load_file(str(folder / "final" / "adapter_model.safetensors")))


def identical(left: Path, right: Path) -> bool:
    """Whether two runs' final adapters hold exactly the same tensors."""
    try:
        a, b = _adapter(left), _adapter(right)
    except (OSError, ValueError):
        return False
    return sorted(a) == sorted(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and (a[k] == b[k]).all() for k in a
    )


class _Job:
    def __init__(self, ws: Workspace, steps: int) -> None:
        self.ws = ws
        self.steps = steps
        self.fields = sft(max_steps=steps, save_steps=max(1, steps // 10), logging_steps=steps)
        self.failpoints = f"slow_save@seconds={SLOW_SAVE}"

    def supervised(
        self,
        label: str,
        plan: KillPlan | None,
        cap: float,
        restart: dict[str, Any] | None = None,
    ) -> RunRecord:
        folder = self.ws.fresh(label)
        out = folder / "out"
        config = write_yaml(
            folder / "job.yaml",
            train_config(out, self.fields, failpoints=self.failpoints, restart=restart),
        )
        proc = Process(supervisor_argv(config), self.ws.env, folder / "supervisor.log")
        return run_job(proc, out, label=label, system="trainwarden", cap=cap, plan=plan)

    def naive(self, label: str, plan: KillPlan | None, cap: float) -> RunRecord:
        folder = self.ws.fresh(label)
        out = folder / "out"
        out.mkdir()
        job = write_job(folder / "job.json", out, self.fields)
        env = {**self.ws.env, ENV_FAILPOINTS: self.failpoints}
        proc = Process(naive_argv(job, out), env, folder / "loop.log")
        return run_job(proc, out, label=label, system="naive", cap=cap, plan=plan)


def _outcome(record: RunRecord, steps: int, step_seconds: float, cap: float) -> dict[str, Any]:
    kept = (
        steps
        if record.finished
        else newest_complete_step(record.output_dir, require_record=record.system != "naive")
    )
    charged = record.wall if record.finished else cap
    if record.finished:
        how = "finished"
    elif record.crash_loop:
        how = "crash-loop"
    elif record.capped:
        how = "capped"
    else:
        how = f"exit {record.exit_code}"
    return {
        "run": record.label,
        "system": record.system,
        "finished": record.finished,
        "how": how,
        "wall_s": record.wall,
        "charged_s": charged,
        "kept_steps": kept,
        "goodput": kept * step_seconds / charged,
        "kills": len(record.kills),
        "mid_save_partials": sum(1 for k in record.kills if k.left_partial),
        "attempts": len(record.pids),
    }


def _describe(outcome: dict[str, Any]) -> str:
    wall = fmt_seconds(outcome["wall_s"])
    return f"{outcome['how']} {wall}, goodput {outcome['goodput']:.2f}"


#: The warm-standby arms beside today's trainwarden (standby off, every failure backed
#: off): the standby with the new default (first failure since progress restarts at
#: once), and with the old backoff, which isolates the backoff rule (issue 13, item 4).
ARMS: dict[str, dict[str, Any]] = {
    "standby": {"standby": "auto", "first_failure": "immediate"},
    "standby-backoff": {"standby": "auto", "first_failure": "backoff"},
}


def _standby_rows(section: Section, rows: list[tuple[float, float, Any, Any, Any]]) -> None:
    for period, fraction, tw, warm, backoff in rows:
        same = warm.get("identical_to_clean")
        section.add(
            f"T={period:.0f}s (f={fraction:.2f}), warm standby: {warm['kills']} kills, "
            f"{warm['mid_save_partials']} mid-save",
            f"standby {_describe(warm)}"
            + (" (bit-identical)" if same else " (DIFFERS)" if same is False else "")
            + f"; standby, backed off {_describe(backoff)}; today {_describe(tw)}",
        )


def run(ws: Workspace, sizes: Sizes, calibration: Calibration) -> tuple[Section, list[RunRecord]]:
    section = Section("goodput", "5 goodput under kills")
    job = _Job(ws, sizes.goodput_steps)
    generous = max(600.0, 20 * calibration.cold_start + 40 * job.steps * calibration.step)
    clean = job.supervised("goodput-clean", None, generous)
    records = [clean]
    end = clean.last_beat()
    start = clean.first_beat()
    if not clean.finished or end is None or start is None or "train_end" not in end.marks:
        section.error = f"the clean reference run did not finish (exit {clean.exit_code})"
        return section, records
    train = end.marks["train_end"] - end.marks["train_begin"]
    startup = start.marks["first_step"] - clean.started
    # Child start-up is mostly imports and drifts by seconds with the machine's
    # load: a T too close to it would let no attempt train at all.
    budget = STARTUP_MARGIN * max(startup, calibration.cold_start)
    step_seconds = train / job.steps
    cap = CAP_FACTOR * clean.wall
    outcomes: list[dict[str, Any]] = [_outcome(clean, job.steps, step_seconds, cap)]
    line = f"trainwarden {_describe(outcomes[0])}"
    if sizes.goodput_clean_naive:
        naive_clean = job.naive("goodput-clean-naive", None, cap)
        records.append(naive_clean)
        outcomes.append(_outcome(naive_clean, job.steps, step_seconds, cap))
        line += f"; naive {_describe(outcomes[-1])}"
    section.add("no kills (reference)", line)
    rows = []
    warm_rows = []
    for fraction in sizes.goodput_fractions:
        period = budget + fraction * train
        plan = KillPlan.periodic(period, count=10_000, mid_save_every=MID_SAVE_EVERY)
        pair = []
        for system in ("trainwarden", "naive", *ARMS):
            label = f"goodput-{system}-T{period:.0f}"
            if system == "naive":
                record = job.naive(label, plan, cap)
            else:
                record = job.supervised(label, plan, cap, ARMS.get(system))
            records.append(record)
            outcome = _outcome(record, job.steps, step_seconds, cap)
            outcome.update(period_s=period, fraction=fraction, system=system)
            if record.finished:
                outcome["identical_to_clean"] = identical(record.output_dir, clean.output_dir)
            outcomes.append(outcome)
            pair.append(outcome)
        tw, naive, warm, warm_backoff = pair
        warm_rows.append((period, fraction, tw, warm, warm_backoff))
        ok = tw["finished"] and tw["goodput"] >= naive["goodput"]
        same = tw.get("identical_to_clean")
        rows.append(
            (
                f"T={period:.0f}s (f={fraction:.2f}): {tw['kills']}/{naive['kills']} kills, "
                f"{tw['mid_save_partials']}/{naive['mid_save_partials']} mid-save",
                f"trainwarden {_describe(tw)}"
                + (" (bit-identical)" if same else " (DIFFERS)" if same is False else "")
                + f"; naive {_describe(naive)}",
                ok,
            )
        )
    for metric, value, ok in rows:
        section.add(metric, value, "trainwarden finishes, goodput >= naive", verdict_of(ok))
    _standby_rows(section, warm_rows)
    tw_goodputs = [
        o["goodput"] for o in outcomes if o["system"] == "trainwarden" and "period_s" in o
    ]
    warm_goodputs = [o["goodput"] for o in outcomes if o["system"] == "standby"]
    backoff_goodputs = [o["goodput"] for o in outcomes if o["system"] == "standby-backoff"]
    if tw_goodputs and warm_goodputs:
        mean_tw = sum(tw_goodputs) / len(tw_goodputs)
        mean_warm = sum(warm_goodputs) / len(warm_goodputs)
        mean_backoff = sum(backoff_goodputs) / max(len(backoff_goodputs), 1)
        section.check(
            "mean goodput over T, warm standby / today (cold, backoff)",
            f"{mean_warm:.2f} / {mean_tw:.2f} = {mean_warm / mean_tw:.2f}x",
            "> 1 (higher than today's)",
            mean_warm > mean_tw,
        )
        section.add(
            "mean goodput over T, first failure at once / backed off (both warm)",
            f"{mean_warm:.2f} / {mean_backoff:.2f} = {mean_warm / mean_backoff:.2f}x",
        )
    naive_goodputs = [o["goodput"] for o in outcomes if o["system"] == "naive" and "period_s" in o]
    if tw_goodputs and naive_goodputs:
        mean_tw = sum(tw_goodputs) / len(tw_goodputs)
        mean_naive = sum(naive_goodputs) / len(naive_goodputs)
        section.add(
            "mean goodput over T, trainwarden / naive",
            f"{mean_tw:.2f} / {mean_naive:.2f}"
            + (f" = {mean_tw / mean_naive:.1f}x" if mean_naive > 0 else " (naive kept nothing)"),
        )
    section.notes.append(
        f"job: {job.steps} steps, save every {job.fields['save_steps']}, "
        f"slow_save@seconds={SLOW_SAVE} (x4 torch.save per checkpoint); clean run: start-up "
        f"{startup:.1f} s, training {train:.1f} s ({step_seconds * 1000:.0f} ms/step incl. "
        f"saves). T = {STARTUP_MARGIN} x start-up ({budget:.0f} s) + f x training. "
        f"Kills every T, every {MID_SAVE_EVERY}nd one aimed into a save; runs cap at "
        f"{cap:.0f} s ({CAP_FACTOR:.0f}x clean wall). goodput = kept steps x clean s/step / "
        "wall (unfinished: newest complete checkpoint / cap). Clean goodput < 1 is start-up."
    )
    section.notes.append(
        "'kills a/b' counts trainwarden's / the naive loop's; 'mid-save' counts kills that "
        "left checkpoint-N without trainer_state.json. crash-loop = the naive loop resumed "
        "twice in a row from the same checkpoint and died on its own both times."
    )
    section.data.update(
        steps=job.steps,
        save_steps=job.fields["save_steps"],
        slow_save_s=SLOW_SAVE,
        clean_startup_s=startup,
        clean_train_s=train,
        clean_step_s=step_seconds,
        cap_s=cap,
        outcomes=outcomes,
        kills={
            r.label: [
                {
                    "ts": k.ts,
                    "pid": k.pid,
                    "phase": k.phase,
                    "step": k.step,
                    "aimed": k.aimed_mid_save,
                    "partial": k.left_partial,
                }
                for k in r.kills
            ]
            for r in records
        },
    )
    if any(math.isnan(o["goodput"]) for o in outcomes):
        section.notes.append("some goodput figures could not be computed")
    return section, records


__all__ = ["identical", "run"]
