"""`trainwarden demo`: the built-in tiny job under supervision, killed twice on purpose.

The first SIGKILL lands mid-training, the second right after a checkpoint folder
appears (while HF is still writing it). The supervisor's own log lines show the
recovery as it happens; a summary table closes the run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from supervisor import logging as tw_logging
from supervisor.config import parse_config
from supervisor.loop import Supervisor
from supervisor.shell.journal import read_events
from trainer_child.protocol import (
    COMMIT_RECORD,
    CommitRecord,
    Heartbeat,
    Layout,
    checkpoint_step,
    read_model,
)

DEMO_MARKER = ".trainwarden-demo"
MAX_STEPS = 30
SAVE_STEPS = 5


def demo_config(directory: Path) -> dict[str, object]:
    """The demo job: long enough to kill twice, short enough for a minute."""
    return {
        "output_dir": str(directory),
        "train": {
            "model": "builtin:tiny-gpt2",
            "dataset": "builtin:tiny",
            "sft": {
                "max_steps": MAX_STEPS,
                "save_steps": SAVE_STEPS,
                "per_device_train_batch_size": 2,
                "learning_rate": 5.0e-4,
                "max_length": 64,
                "logging_steps": 5,
                "seed": 0,
            },
        },
        # Slow each checkpoint write a little (a test facility, see
        # trainer_child/failpoints.py) so the second kill reliably lands mid-save.
        "env": {"TRAINWARDEN_FAILPOINTS": "slow_save@seconds=0.3"},
        "restart": {"backoff_initial": "1s", "backoff_max": "4s"},
        "retention": {"keep_last": 2},
    }


class Chaos(threading.Thread):
    """Kill the child twice: once mid-training, once while a checkpoint is written."""

    def __init__(self, layout: Layout, console: Console) -> None:
        super().__init__(name="trainwarden-demo-chaos", daemon=True)
        self.layout = layout
        self.console = console
        self.stop_event = threading.Event()
        self.kills: list[str] = []

    def _beat(self) -> Heartbeat | None:
        return read_model(self.layout.heartbeat, Heartbeat)

    def _checkpoints(self) -> set[int]:
        steps = set()
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.layout.output_dir):
                step = checkpoint_step(entry.name)
                if step is not None:
                    steps.add(step)
        return steps

    def _wait(self, predicate: object, poll: float) -> bool:
        assert callable(predicate)
        while not self.stop_event.is_set():
            if predicate():
                return True
            time.sleep(poll)
        return False

    def run(self) -> None:
        # 1. Mid-training: a step that is not near a save.
        def training_step() -> bool:
            beat = self._beat()
            return bool(
                beat and beat.attempt == 1 and beat.phase.value == "train" and beat.step >= 7
            )

        if not self._wait(training_step, 0.05):
            return
        beat = self._beat()
        assert beat is not None
        self._kill(beat.pid, f"SIGKILL child {beat.pid} mid-training at step {beat.step}")

        # 2. Right after a new checkpoint folder appears in attempt 2.
        def second_attempt_training() -> bool:
            beat = self._beat()
            return bool(beat and beat.attempt == 2 and beat.phase.value == "train")

        if not self._wait(second_attempt_training, 0.05):
            return
        known = self._checkpoints()
        if not self._wait(lambda: bool(self._checkpoints() - known), 0.002):
            return
        new = max(self._checkpoints() - known)
        beat = self._beat()
        assert beat is not None
        self._kill(beat.pid, f"SIGKILL child {beat.pid} while checkpoint-{new} is being written")
        time.sleep(0.2)
        committed = (self.layout.checkpoint(new) / COMMIT_RECORD).exists()
        self.console.print(
            f"[bold magenta]chaos:[/] checkpoint-{new} "
            + ("had been committed" if committed else "was left without a commit record")
        )

    def _kill(self, pid: int, what: str) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.kills.append(what)
        self.console.print(f"[bold magenta]chaos:[/] {what}")


def _prepare(directory: Path) -> None:
    if directory.exists():
        if not (directory / DEMO_MARKER).exists() and any(directory.iterdir()):
            raise SystemExit(
                f"{directory} exists and is not a trainwarden demo folder; "
                "pass --dir with a new or demo path (nothing was deleted)"
            )
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    (directory / DEMO_MARKER).write_text("created by `trainwarden demo`; safe to delete\n")


def run_demo(directory: Path, *, console: Console) -> int:
    """Run the demo; return the supervisor's exit code."""
    directory = directory.resolve()
    _prepare(directory)
    layout = Layout(directory)
    config = parse_config(demo_config(directory))
    tw_logging.configure(json=False)
    console.print(
        f"[bold]trainwarden demo[/]: tiny GPT-2 + LoRA, {MAX_STEPS} steps, a checkpoint every "
        f"{SAVE_STEPS}; the child will be SIGKILLed twice. Output: {directory}"
    )
    chaos = Chaos(layout, console)
    started = time.monotonic()
    chaos.start()
    try:
        code = Supervisor(config).run()
    finally:
        chaos.stop_event.set()
        chaos.join()
    elapsed = time.monotonic() - started
    console.print(summary_table(layout, elapsed, chaos.kills))
    return code


def summary_table(layout: Layout, elapsed: float, kills: list[str]) -> Table:
    """Steps, restarts by kind, steps lost and where the adapter is."""
    events = read_events(layout)
    failures = [e for e in events if e.event == "failure"]
    launches = [e for e in events if e.event == "launch"]
    by_kind: dict[str, int] = {}
    for failure in failures:
        by_kind[failure.kind or "crash"] = by_kind.get(failure.kind or "crash", 0) + 1
    lost = 0
    for failure in failures:
        died_at = (failure.model_extra or {}).get("step")
        nxt = next((e for e in launches if e.attempt > failure.attempt), None)
        resumed = (nxt.model_extra or {}).get("resume_step") if nxt else None
        if isinstance(died_at, int):
            lost += died_at - (resumed if isinstance(resumed, int) else 0)
    final = read_model(layout.final / COMMIT_RECORD, CommitRecord)
    table = Table(title="trainwarden demo summary", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("result", "completed" if final else "NOT completed")
    table.add_row("optimizer steps", str(final.step if final else "-"))
    table.add_row("attempts", str(len(launches)))
    table.add_row("restarts", ", ".join(f"{n} {k}" for k, n in by_kind.items()) if by_kind else "0")
    table.add_row("chaos", "; ".join(kills) or "-")
    starts = [(e.model_extra or {}).get("start") for e in events if e.event == "child_started"]
    warm = starts.count("warm")
    table.add_row("attempts started warm", f"{warm} of {len(starts)} (restart.standby)")
    table.add_row("steps lost (heartbeat-sampled)", str(lost))
    quarantined = sorted(p.name for p in layout.quarantine.iterdir() if p.is_dir())
    table.add_row("quarantined", ", ".join(quarantined) or "-")
    table.add_row("final adapter", str(layout.final) if final else "-")
    table.add_row("wall time", f"{elapsed:.1f}s")
    return table
