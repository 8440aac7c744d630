"""What every benchmark shares: sizes, jobs, statistics, the naive baseline.

Processes, the offline environment, job files and journal readers come from
``tests/support`` (shared with the test suite): processes are started in their
own session and always killed (by pid, never by name) when a benchmark ends.
All timestamps are ``time.time()``: the journal's ``ts``, the heartbeat's
``wall_time`` and ``marks``, and the kill times all use the same wall clock of
the one machine, so their differences are latencies.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.jobs import PYTHON, child_env
from tests.support.processes import REPO_ROOT
from trainer_child.protocol import Heartbeat, Layout, read_model

MB = 1_000_000
MIB = 1 << 20


# --- sizes -------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How much of each benchmark to run; ``QUICK`` and ``FULL`` below."""

    name: str
    #: SIGKILLs of the fake child, and SIGSTOP hangs, for detection latency.
    detection_kills: int
    detection_hangs: int
    #: Bare/supervised pairs (A B A B ...) and the job's length in optimizer steps.
    overhead_pairs: int
    overhead_steps: int
    #: Seconds of the supervisor's life sampled for RSS and CPU (summed over runs).
    footprint_seconds: float
    #: Synthetic checkpoint size and interleaved rounds for the validation cost.
    validation_mib: int
    validation_rounds: int
    commit_rounds: int
    #: Goodput: optimizer steps of the job, and the kill periods as fractions of
    #: its clean training time added to the measured start-up (see goodput.py).
    goodput_steps: int
    goodput_fractions: tuple[float, ...]
    goodput_clean_naive: bool
    #: Save-interval sweep: multiples of the a-priori Young/Daly interval, and
    #: the window each point runs for, in mean times between failures.
    advice_multiples: tuple[float, ...]
    advice_window_mtbf: float
    #: bench/bench_hash.py arguments.
    hash_mib: int
    hash_rounds: int
    #: Remote mirror: on/off pairs and their job's steps; restore/cold-start pairs.
    mirror_pairs: int
    mirror_steps: int
    restore_pairs: int
    #: Warm standby: (off, auto) rounds per job, and kills per run.
    standby_rounds: int = 1
    standby_kills: int = 2


QUICK = Sizes(
    name="quick",
    detection_kills=20,
    detection_hangs=3,
    overhead_pairs=1,
    overhead_steps=600,
    footprint_seconds=15.0,
    validation_mib=256,
    validation_rounds=3,
    commit_rounds=5,
    goodput_steps=400,
    goodput_fractions=(0.4,),
    goodput_clean_naive=False,
    advice_multiples=(0.33, 1.0, 3.0),
    advice_window_mtbf=2.0,
    hash_mib=64,
    hash_rounds=3,
    mirror_pairs=3,
    mirror_steps=400,
    restore_pairs=3,
)
FULL = Sizes(
    name="full",
    detection_kills=40,
    detection_hangs=8,
    overhead_pairs=3,
    overhead_steps=1000,
    footprint_seconds=60.0,
    validation_mib=1024,
    validation_rounds=5,
    commit_rounds=9,
    goodput_steps=600,
    goodput_fractions=(0.25, 0.5, 0.75),
    goodput_clean_naive=True,
    advice_multiples=(0.25, 0.5, 1.0, 2.0, 4.0),
    advice_window_mtbf=3.0,
    hash_mib=256,
    hash_rounds=5,
    mirror_pairs=5,
    mirror_steps=800,
    restore_pairs=5,
    standby_rounds=2,
    standby_kills=2,
)


# --- statistics --------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1]); NaN for no values."""
    data = sorted(values)
    if not data:
        return math.nan
    position = (len(data) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (position - low)


def median(values: Iterable[float]) -> float:
    data = list(values)
    return statistics.median(data) if data else math.nan


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


# --- the offline environment ---------------------------------------------------------


@dataclass
class Workspace:
    """The bench's scratch folder (default runs/bench, git-ignored) and its environment."""

    root: Path
    cache: Path = field(init=False)
    env: dict[str, str] = field(init=False)
    _counter: int = 0

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.cache = self.root / "cache"
        self.cache.mkdir(exist_ok=True)
        self.env = child_env(self.cache)

    def fresh(self, name: str) -> Path:
        """Return a new, empty folder for one run."""
        self._counter += 1
        path = self.root / f"{self._counter:03d}-{name}"
        path.mkdir(parents=True)
        return path

    def warm_up(self) -> float:
        """Build the built-in model once (and warm the page cache); return the seconds spent."""
        started = time.monotonic()
        subprocess.run(
            [
                PYTHON,
                "-c",
                "from trainer_child.builtin import ensure_tiny_gpt2; ensure_tiny_gpt2()",
            ],
            env=self.env,
            cwd=REPO_ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return time.monotonic() - started


# --- jobs ----------------------------------------------------------------------------

#: The built-in tiny job, as every benchmark runs it (sft fields are added per run).
BASE_SFT: dict[str, Any] = {
    "per_device_train_batch_size": 2,
    "learning_rate": 5e-4,
    "max_length": 64,
    "seed": 0,
}
#: Restarts fast enough that a benchmark measures recovery, not sleeping.
BENCH_RESTART: dict[str, Any] = {
    "backoff_initial": "1s",
    "backoff_max": "4s",
    "max_restarts": 200,
    "no_progress_limit": 5,
    # Yesterday's behaviour unless a benchmark asks for the warm standby and the
    # immediate first restart (bench/standby.py compares them in one run).
    "standby": "off",
    "first_failure": "backoff",
}


def sft(**fields: Any) -> dict[str, Any]:
    return {**BASE_SFT, **fields}


def train_config(
    output_dir: Path,
    sft_fields: Mapping[str, Any],
    *,
    failpoints: str = "",
    restart: Mapping[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A trainwarden config for the built-in job (failpoints go through ``env:``)."""
    document: dict[str, Any] = {
        "output_dir": str(output_dir),
        "train": {"sft": dict(sft_fields)},
        "restart": {**BENCH_RESTART, **(restart or {})},
    }
    if failpoints:
        document["env"] = {"TRAINWARDEN_FAILPOINTS": failpoints}
    document.update(sections)
    return document


# --- reading what a run wrote -------------------------------------------------------------


class HeartbeatRecorder:
    """Poll heartbeat.json and keep the newest heartbeat of every child pid.

    Heartbeats carry the child's start-up ``marks``, so the newest one of an
    attempt holds all of them; keeping one per pid lets a later attempt
    overwrite the file without losing an earlier attempt's marks.
    """

    def __init__(self, output_dir: Path, interval: float = 0.02) -> None:
        self.path = Layout(output_dir).heartbeat
        self.interval = interval
        self.by_pid: dict[int, Heartbeat] = {}
        self.order: list[int] = []
        #: Every (wall_time, step) seen per pid, for rates over part of a run.
        self.history: dict[int, list[tuple[float, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-heartbeats", daemon=True)
        self._seen: tuple[int, int] | None = None

    def __enter__(self) -> HeartbeatRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> Heartbeat | None:
        try:
            info = self.path.stat()
        except OSError:
            return None
        key = (info.st_mtime_ns, info.st_size)
        if key == self._seen:
            return self.by_pid.get(self.order[-1]) if self.order else None
        beat = read_model(self.path, Heartbeat)
        if beat is None:
            return None
        self._seen = key
        if beat.pid not in self.by_pid:
            self.order.append(beat.pid)
        self.by_pid[beat.pid] = beat
        self.history.setdefault(beat.pid, []).append((beat.wall_time, beat.step))
        return beat

    def latest(self) -> Heartbeat | None:
        return self.by_pid[self.order[-1]] if self.order else None


# --- processes -------------------------------------------------------------------------


def is_trainer_child(cmdline: Sequence[str]) -> bool:
    """``python -m trainer_child ...`` (the naive loop's ``python -c`` helper is not one)."""
    return any(
        part == "trainer_child" and index > 0 and cmdline[index - 1] == "-m"
        for index, part in enumerate(cmdline)
    )


#: The restart loop users write today around a plain HF script, verbatim but for
#: one care: ``--resume-from`` is passed only when there is a checkpoint.
NAIVE_LOOP = """\
until ckpt="$("$PY" -c 'import sys
from transformers.trainer_utils import get_last_checkpoint
print(get_last_checkpoint(sys.argv[1]) or "")' "$OUT")"
      "$PY" -m trainer_child --job "$JOB" ${ckpt:+--resume-from "$ckpt"}
do :; done
"""


def naive_argv(job: Path, output_dir: Path) -> list[str]:
    return [
        "bash",
        "-c",
        f'PY="$0" JOB="$1" OUT="$2"\n{NAIVE_LOOP}',
        PYTHON,
        str(job),
        str(output_dir),
    ]


def fmt_seconds(value: float) -> str:
    if math.isnan(value):
        return "-"
    if abs(value) < 1:
        return f"{value * 1000:.0f} ms"
    return f"{value:.2f} s"


def marks_of(beat: Heartbeat | None) -> dict[str, float]:
    return dict(beat.marks) if beat is not None else {}


__all__ = [
    "BASE_SFT",
    "BENCH_RESTART",
    "FULL",
    "MB",
    "MIB",
    "NAIVE_LOOP",
    "QUICK",
    "HeartbeatRecorder",
    "Sizes",
    "Workspace",
    "fmt_seconds",
    "is_trainer_child",
    "marks_of",
    "median",
    "naive_argv",
    "quantile",
    "ratio",
    "sft",
    "train_config",
]
