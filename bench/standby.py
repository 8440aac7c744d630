"""Benchmark 8: the warm standby (``restart.standby``): restart latency with and without it.

Three jobs, each run supervised with ``standby: off`` (A) and ``standby: auto``
(B), interleaved A B A B in this one invocation:

* ``tiny``: the built-in job on ``builtin:tiny-gpt2`` (imports dominate a cold start);
* ``big``: the built-in job on a GPT-2 generated here (seeded random weights,
  ``BIG_LAYERS`` x ``BIG_EMBD``, ~400 MB of float32 safetensors) so that loading
  the base model is a real part of a cold start, as for a 7B model on a GPU box;
* ``trl-sft``: TRL's own ``python -m trl.scripts.sft`` on the tiny model as a
  ``command:`` job (the standby pre-imports and then runs it with runpy).

Each run SIGKILLs its training child ``kills`` times. A kill waits until the
attempt has taken its first step *and* committed a new checkpoint (so every
failure follows progress and both arms restart at once, without backoff) and,
in B, until the standby says it is ready. Latency = the next attempt's
``first_step`` mark minus the kill, with the configured backoff (journal
``launch`` - ``failure``, ~0 here) subtracted; cold start = attempt 1's
``launch`` to its ``first_step``, the issue's yardstick. Memory: the idle
standby's RSS and USS (psutil) at each kill, beside the training child's RSS.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.common import (
    MB,
    HeartbeatRecorder,
    Sizes,
    Workspace,
    fmt_seconds,
    median,
    ratio,
    sft,
    train_config,
)
from bench.report import Section
from tests.support.jobs import PYTHON, supervisor_argv, write_yaml
from tests.support.outputs import events
from tests.support.processes import REPO_ROOT, Process
from trainer_child.protocol import (
    COMMIT_RECORD,
    Layout,
    RunStateFile,
    StandbyFile,
    checkpoint_step,
    read_model,
)

#: Targets of the issue: warm restart / cold start, per job.
TARGETS = {"tiny": 0.2, "big": 0.3, "trl-sft": 0.3}
BIG_EMBD = 1024
BIG_LAYERS = 8
BIG_SEED = 20261128
#: A run that has not done its kills by then is stopped and reported.
RUN_CAP = 900.0
POLL = 0.02

#: Generates the big model once per workspace (in a child: the bench stays light).
_BIG_MODEL = """\
import sys, torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
from trainer_child.builtin import ensure_tiny_gpt2
tiny, dest, embd, layers, seed = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
tiny = ensure_tiny_gpt2()
config = GPT2Config.from_pretrained(tiny)
config.n_embd, config.n_layer, config.n_head = embd, layers, embd // 64
torch.manual_seed(seed)
GPT2LMHeadModel(config).save_pretrained(dest)
AutoTokenizer.from_pretrained(tiny).save_pretrained(dest)
"""


def big_model(ws: Workspace) -> Path:
    """The ~400 MB GPT-2 of this benchmark, built on first use into the workspace cache."""
    dest = ws.cache / f"big-gpt2-{BIG_LAYERS}x{BIG_EMBD}-{BIG_SEED}"
    if (dest / "model.safetensors").is_file():
        return dest
    staging = dest.with_name(dest.name + ".staging")
    args = [str(x) for x in ("-", staging, BIG_EMBD, BIG_LAYERS, BIG_SEED)]
    subprocess.run([PYTHON, "-c", _BIG_MODEL, *args], env=ws.env, cwd=REPO_ROOT, check=True)
    staging.rename(dest)
    return dest


def jsonl_data(ws: Workspace) -> Path:
    """The built-in corpus as a local jsonl dataset folder (what TRL's CLI loads)."""
    from trainer_child.builtin import corpus_lines

    folder = ws.cache / "jsonl-data"
    if not (folder / "train.jsonl").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"text": line}) for line in corpus_lines()]
        (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder


# --- the jobs ----------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One job of the benchmark and how to write its config."""

    name: str
    config: Callable[[Path, str], dict[str, Any]]


def _restart(standby: str) -> dict[str, Any]:
    return {"standby": standby, "first_failure": "immediate"}


def _tiny(out: Path, standby: str) -> dict[str, Any]:
    fields = sft(max_steps=100_000, save_steps=10, logging_steps=100_000)
    return train_config(out, fields, restart=_restart(standby))


def _big(model: Path) -> Callable[[Path, str], dict[str, Any]]:
    def config(out: Path, standby: str) -> dict[str, Any]:
        fields = sft(
            max_steps=100_000,
            save_steps=2,
            logging_steps=100_000,
            per_device_train_batch_size=1,
            max_length=32,
        )
        document = train_config(out, fields, restart=_restart(standby))
        document["train"]["model"] = str(model)
        return document

    return config


def _trl(model: Path, data: Path) -> Callable[[Path, str], dict[str, Any]]:
    def config(out: Path, standby: str) -> dict[str, Any]:
        argv = [PYTHON, "-m", "trl.scripts.sft", "--model_name_or_path", str(model)]
        argv += ["--dataset_name", str(data), "--output_dir", str(out)]
        argv += ["--max_steps", "100000", "--save_steps", "10", "--logging_steps", "100000"]
        argv += ["--per_device_train_batch_size", "2", "--max_length", "64", "--seed", "0"]
        argv += ["--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--report_to", "none"]
        argv += ["--bf16", "false", "--resume_from_checkpoint", "{resume_from}"]
        return {
            "output_dir": str(out),
            "command": argv,
            "batch": {"per_device_train_batch_size": 2},
            "restart": {**train_config(out, {})["restart"], **_restart(standby)},
        }

    return config


# --- one run -------------------------------------------------------------------------


@dataclass
class Kill:
    ts: float
    pid: int
    standby_rss: float = 0.0
    standby_uss: float = 0.0
    child_rss: float = 0.0
    #: CPU seconds the standby used between being seen ready and the kill, and that span.
    idle_cpu_s: float = 0.0
    idle_wall_s: float = 0.0


@dataclass
class RestartRun:
    """One supervised run with kills, as measured from outside."""

    label: str
    scenario: str
    standby: str
    kills: list[Kill] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    marks: dict[int, dict[str, float]] = field(default_factory=dict)
    error: str = ""

    def cold_start(self) -> float | None:
        launch = self._first("launch", 1)
        child = self._first("child_started", 1)
        first = self.marks.get(child["pid"], {}).get("first_step") if child else None
        return first - launch["ts"] if launch and first else None

    def cold_split(self) -> dict[str, float]:
        """Attempt 1's imports and model load (built-in job marks), seconds."""
        child = self._first("child_started", 1)
        marks = self.marks.get(child["pid"], {}) if child else {}
        names = ("started", "imports", "dataset", "model")
        if not all(name in marks for name in names):
            return {}
        return {
            "imports_s": marks["imports"] - marks["started"],
            "model_load_s": marks["model"] - marks["dataset"],
        }

    def restarts(self) -> list[dict[str, Any]]:
        """Each kill's latency to the next attempt's first step, backoff excluded."""
        found = []
        for kill in self.kills:
            failure = next(
                (e for e in self.events if e["event"] == "failure" and e.get("pid") == kill.pid),
                None,
            )
            if failure is None:
                continue
            attempt = failure["attempt"] + 1
            launch, child = self._first("launch", attempt), self._first("child_started", attempt)
            first = self.marks.get(child["pid"], {}).get("first_step") if child else None
            if launch is None or child is None or first is None:
                continue
            backoff = max(launch["ts"] - failure["ts"], 0.0)
            found.append(
                {
                    "total_s": first - kill.ts - backoff,
                    "backoff_s": backoff,
                    "start": child.get("start", "cold"),
                    "why": child.get("why", ""),
                    "detect_s": failure["ts"] - kill.ts,
                }
            )
        return found

    def _first(self, event: str, attempt: int) -> dict[str, Any] | None:
        return next(
            (e for e in self.events if e["event"] == event and e["attempt"] == attempt), None
        )


def _child(layout: Layout) -> int | None:
    state = read_model(layout.state, RunStateFile)
    return state.child_pid if state is not None else None


def _ready_standby(layout: Layout, child: int | None) -> int | None:
    record = read_model(layout.standby, StandbyFile)
    if record is None or record.state != "ready" or record.pid == child:
        return None
    with contextlib.suppress(psutil.Error):
        if psutil.Process(record.pid).status() != psutil.STATUS_ZOMBIE:
            return record.pid
    return None


def _committed_since(output_dir: Path, since: float) -> bool:
    """Whether a checkpoint's commit record appeared after ``since`` (wall time)."""
    for folder in output_dir.iterdir():
        if checkpoint_step(folder.name) is None:
            continue
        with contextlib.suppress(OSError):
            if (folder / COMMIT_RECORD).stat().st_mtime > since:
                return True
    return False


def _memory(pid: int | None) -> tuple[float, float]:
    if pid is None:
        return 0.0, 0.0
    with contextlib.suppress(psutil.Error):
        info = psutil.Process(pid).memory_full_info()
        return info.rss / MB, info.uss / MB
    return 0.0, 0.0


class _Driver:
    """Kill the child whenever the rule allows, until ``kills`` restarts took their first step."""

    def __init__(self, run: RestartRun, layout: Layout, recorder: HeartbeatRecorder) -> None:
        self.run = run
        self.layout = layout
        self.recorder = recorder
        #: standby pid -> (wall, CPU seconds) when first seen ready.
        self.ready_since: dict[int, tuple[float, float]] = {}

    def _note_ready(self, standby: int) -> None:
        if standby not in self.ready_since:
            with contextlib.suppress(psutil.Error):
                cpu = psutil.Process(standby).cpu_times()
                self.ready_since[standby] = (time.time(), cpu.user + cpu.system)

    def ready_to_kill(self) -> int | None:
        child = _child(self.layout)
        standby = _ready_standby(self.layout, child)
        if standby is not None:
            self._note_ready(standby)  # from the first look on: its idle CPU is measured
        beat = self.recorder.by_pid.get(child) if child is not None else None
        if beat is None or "first_step" not in beat.marks:
            return None
        if not _committed_since(self.layout.output_dir, beat.marks["first_step"]):
            return None
        if self.run.standby == "auto" and standby is None:
            return None
        return child

    def kill(self, pid: int) -> None:
        standby = _ready_standby(self.layout, pid)
        standby_rss, standby_uss = _memory(standby)
        child_rss, _ = _memory(pid)
        idle_cpu = idle_wall = 0.0
        if standby is not None and standby in self.ready_since:
            with contextlib.suppress(psutil.Error):
                cpu = psutil.Process(standby).cpu_times()
                since, cpu_then = self.ready_since[standby]
                idle_cpu, idle_wall = cpu.user + cpu.system - cpu_then, time.time() - since
        ts = time.time()
        os.kill(pid, signal.SIGKILL)
        record = Kill(ts, pid, standby_rss, standby_uss, child_rss, idle_cpu, idle_wall)
        self.run.kills.append(record)

    def restarted(self, victim: int) -> bool:
        child = _child(self.layout)
        beat = self.recorder.by_pid.get(child) if child not in (None, victim) else None
        return beat is not None and "first_step" in beat.marks


def restart_run(ws: Workspace, scenario: Scenario, standby: str, kills: int) -> RestartRun:
    """Run ``scenario`` supervised until ``kills`` restarts have reached their first step."""
    label = f"standby-{scenario.name}-{standby}"
    folder = ws.fresh(label)
    out = folder / "out"
    config = write_yaml(folder / "job.yaml", scenario.config(out, standby))
    run = RestartRun(label, scenario.name, standby)
    layout = Layout(out)
    proc = Process(supervisor_argv(config), ws.env, folder / "supervisor.log")
    started = time.monotonic()
    try:
        with HeartbeatRecorder(out) as recorder:
            driver = _Driver(run, layout, recorder)
            victim: int | None = None
            while len(run.kills) < kills or (victim is not None and not driver.restarted(victim)):
                if proc.poll() is not None:
                    run.error = f"supervisor exited {proc.poll()}"
                    break
                if time.monotonic() - started > RUN_CAP:
                    run.error = f"capped at {RUN_CAP:.0f} s"
                    break
                if victim is None or driver.restarted(victim):
                    victim = None
                    if len(run.kills) < kills and (pid := driver.ready_to_kill()) is not None:
                        driver.kill(pid)
                        victim = pid
                time.sleep(POLL)
            run.marks = {pid: dict(beat.marks) for pid, beat in recorder.by_pid.items()}
    finally:
        proc.close()
    run.events = events(out)
    return run


# --- the section ---------------------------------------------------------------------


def _rows(section: Section, name: str, runs: list[RestartRun]) -> dict[str, Any]:
    """Add one job's rows; return its figures for results.json."""
    colds = [c for r in runs if (c := r.cold_start()) is not None]
    off = [x for r in runs if r.standby == "off" for x in r.restarts()]
    warm_all = [x for r in runs if r.standby == "auto" for x in r.restarts()]
    warm = [x for x in warm_all if x["start"] == "warm"]
    cold_s = median(colds)
    off_s = median(x["total_s"] for x in off)
    warm_s = median(x["total_s"] for x in warm)
    target = TARGETS[name]
    section.add(f"{name}: cold start, launch -> first step (n={len(colds)})", fmt_seconds(cold_s))
    section.add(
        f"{name}: kill -> first step, standby off (n={len(off)})",
        f"{fmt_seconds(off_s)} = {ratio(off_s, cold_s):.2f} x cold start",
    )
    section.check(
        f"{name}: kill -> first step, warm standby (n={len(warm)} of {len(warm_all)})",
        f"{fmt_seconds(warm_s)} = {ratio(warm_s, cold_s):.2f} x cold start",
        f"<= {target} x cold start",
        ratio(warm_s, cold_s) <= target if warm else None,
    )
    section.add(f"{name}: warm / off restart (same run)", f"{ratio(warm_s, off_s):.2f}")
    splits = [split for r in runs if (split := r.cold_split())]
    if splits:
        section.add(
            f"{name}: of a cold start, imports / base model load",
            f"{fmt_seconds(median(x['imports_s'] for x in splits))} / "
            f"{fmt_seconds(median(x['model_load_s'] for x in splits))}",
        )
    standby_rss = [k.standby_rss for r in runs for k in r.kills if k.standby_rss]
    standby_uss = [k.standby_uss for r in runs for k in r.kills if k.standby_uss]
    child_rss = [k.child_rss for r in runs for k in r.kills if k.child_rss]
    section.add(
        f"{name}: memory of the idle standby, RSS / USS (child RSS)",
        f"{median(standby_rss):.0f} MB / {median(standby_uss):.0f} MB ({median(child_rss):.0f} MB)",
    )
    idle = [(k.idle_cpu_s, k.idle_wall_s) for r in runs for k in r.kills if k.idle_wall_s > 1]
    if idle:
        cpu, wall = sum(c for c, _ in idle), sum(w for _, w in idle)
        section.add(
            f"{name}: CPU of the idle standby, ready -> kill ({wall:.0f} s sampled)",
            f"{cpu:.2f} s = {100 * cpu / wall:.2f}% of a core",
        )
    return {
        "cold_split": splits,
        "idle_cpu_wall_s": idle,
        "cold_start_s": colds,
        "restart_off": off,
        "restart_warm": warm_all,
        "standby_rss_mb": standby_rss,
        "standby_uss_mb": standby_uss,
        "child_rss_mb": child_rss,
        "errors": [f"{r.label}: {r.error}" for r in runs if r.error],
    }


def run(ws: Workspace, sizes: Sizes) -> Section:
    """Run every job with the standby off and on, interleaved; return the section."""
    section = Section("standby", "8 warm standby")
    started = time.monotonic()
    model = big_model(ws)
    build_s = time.monotonic() - started
    scenarios = [
        Scenario("tiny", _tiny),
        Scenario("big", _big(model)),
        Scenario("trl-sft", _trl(_tiny_model(ws), jsonl_data(ws))),
    ]
    for scenario in scenarios:
        runs = []
        for _ in range(sizes.standby_rounds):
            for standby in ("off", "auto"):
                runs.append(restart_run(ws, scenario, standby, sizes.standby_kills))
        section.data[scenario.name] = _rows(section, scenario.name, runs)
    backoff_rows(ws, sizes, section)
    weights = sum(p.stat().st_size for p in model.glob("*.safetensors")) / MB
    section.notes.append(
        f"jobs: tiny = built-in job on builtin:tiny-gpt2; big = built-in job on a GPT-2 of "
        f"{BIG_LAYERS} layers x {BIG_EMBD} ({weights:.0f} MB of float32 safetensors, "
        f"seeded, generated in {build_s:.0f} s), micro-batch 1, max_length 32; trl-sft = "
        "python -m trl.scripts.sft (LoRA) on the tiny model as a command: job. "
        f"{sizes.standby_rounds} round(s) of (off, auto) per job, {sizes.standby_kills} "
        "kills per run, each after the attempt's first step and a new commit (and, with "
        "the standby, once it is ready); restart.first_failure immediate in both arms, "
        "backoff subtracted anyway. Memory is psutil's RSS / USS of the idle standby at "
        "each kill; USS is what it alone holds (shared library pages are not counted)."
    )
    return section


#: The backoff A/B: the shipped default backoff, against none for a first failure.
DEFAULT_BACKOFF = {"backoff_initial": "5s", "backoff_max": "5m"}
BACKOFF_ARMS: dict[str, dict[str, Any]] = {
    "immediate": {"standby": "auto", "first_failure": "immediate", **DEFAULT_BACKOFF},
    "backoff": {"standby": "auto", "first_failure": "backoff", **DEFAULT_BACKOFF},
}
BACKOFF_STEPS = 600
#: Kill the child this long after the previous kill: a few saves' worth of training.
BACKOFF_PERIOD = 10.0


def backoff_rows(ws: Workspace, sizes: Sizes, section: Section) -> None:
    """Restart at once after progress, or back off (default 5 s)? Goodput decides (item 4).

    The same job and the same kill plan (SIGKILL every BACKOFF_PERIOD s after the
    previous kill, each following new commits) under both rules, with the warm
    standby on and the shipped ``backoff_initial``, interleaved A B A B. The job
    finishes in both, so goodput = its clean training time / wall, and the ratio
    of walls is the ratio of goodputs.
    """
    from bench.goodput import _Job
    from bench.killer import KillPlan

    job = _Job(ws, BACKOFF_STEPS)
    plan = KillPlan.periodic(BACKOFF_PERIOD, count=10_000)
    walls: dict[str, list[float]] = {arm: [] for arm in BACKOFF_ARMS}
    kills: dict[str, list[int]] = {arm: [] for arm in BACKOFF_ARMS}
    for index in range(sizes.standby_rounds):
        for arm, restart in BACKOFF_ARMS.items():
            record = job.supervised(f"backoff-{arm}-{index}", plan, RUN_CAP, dict(restart))
            if record.finished:
                walls[arm].append(record.wall)
                kills[arm].append(len(record.kills))
    immediate, backoff = median(walls["immediate"]), median(walls["backoff"])
    pairs = [ratio(b, a) for a, b in zip(walls["immediate"], walls["backoff"], strict=False)]
    section.check(
        f"first failure since progress: at once / after the {DEFAULT_BACKOFF['backoff_initial']} "
        f"backoff, goodput (warm, kills every {BACKOFF_PERIOD:.0f} s)",
        f"{ratio(backoff, immediate):.2f}x (wall {fmt_seconds(immediate)} vs "
        f"{fmt_seconds(backoff)}; pairs {', '.join(f'{r:.2f}' for r in pairs)})",
        "> 1: restart at once (restart.first_failure default)",
        ratio(backoff, immediate) > 1 if walls["immediate"] and walls["backoff"] else None,
    )
    section.data["backoff"] = {"walls_s": walls, "kills": kills, "pair_ratios": pairs}
    section.notes.append(
        f"first-failure rule: the goodput job ({BACKOFF_STEPS} steps, slow_save 0.2 s) with "
        f"the standby on, SIGKILLed every {BACKOFF_PERIOD:.0f} s after the previous kill, "
        "under restart.first_failure immediate vs backoff (backoff_initial 5s, the "
        "default); both finish, so goodput = clean training time / wall and the ratio "
        f"of median walls is the goodput ratio; kills per run: {kills}."
    )


def _tiny_model(ws: Workspace) -> Path:
    code = "from trainer_child.builtin import ensure_tiny_gpt2; print(ensure_tiny_gpt2())"
    done = subprocess.run(
        [PYTHON, "-c", code],
        env=ws.env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(done.stdout.strip().splitlines()[-1])


__all__ = ["RestartRun", "big_model", "restart_run", "run"]
