"""A synthetic but realistic night: the `.warden/` files of a run with four failures.

300 steps, a checkpoint every 50, loss logged every 5 steps. Attempt 1 is
SIGKILLed at step 137, attempt 2 runs out of CUDA memory at step 163 (the
micro-batch is halved, so later steps are slower), attempt 3 hangs after step
201 and is killed by the hang detector, attempt 4 hits a full disk at 226, the
supervisor waits for space, and attempt 5 completes. Written the way the
supervisor and the callback write them, so the report and the accounting read
exactly what a real run leaves.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from trainer_child.protocol import Layout, RunStateFile, atomic_write_model

T0 = 1_795_000_000.0
MAX_STEPS = 300
SAVE_STEPS = 50
LOG_STEPS = 5
LOAD_SECONDS = 40.0


def loss_at(step: int, rng: random.Random) -> float:
    return 0.95 + 1.7 * math.exp(-step / 90) + rng.gauss(0, 0.035)


def lr_at(step: int) -> float:
    if step < 10:
        return 2e-4 * step / 10
    progress = (step - 10) / (MAX_STEPS - 10)
    return 2e-4 * 0.5 * (1 + math.cos(math.pi * progress))


def write_night(output_dir: Path, *, gave_up: bool = False) -> Layout:
    """Write the journal, loss log and state of the night above; return its layout."""
    layout = Layout(output_dir)
    layout.ensure()
    rng = random.Random(0)
    events: list[dict[str, object]] = []
    metrics: list[dict[str, object]] = []

    def event(t: float, name: str, attempt: int, **fields: object) -> None:
        events.append({"ts": T0 + t, "event": name, "attempt": attempt, **fields})

    def train(attempt: int, t: float, start: int, stop: int, step_s: float) -> float:
        """Steps start+1..stop from time t (after loading); returns the time of `stop`."""
        t += LOAD_SECONDS
        for step in range(start + 1, stop + 1):
            t += step_s
            if step % LOG_STEPS == 0:
                metrics.append(
                    {
                        "step": step,
                        "loss": loss_at(step, rng),
                        "learning_rate": lr_at(step),
                        "epoch": step / 150,
                        "attempt": attempt,
                        "wall_time": T0 + t,
                    }
                )
            if step % SAVE_STEPS == 0:
                t += 6.0
                event(t, "checkpoint_committed", attempt, step=step, bytes=90_000_000)
        return t

    def launch(t: float, attempt: int, resume: int | None) -> None:
        event(
            t, "launch", attempt, resume_from=resume and f"checkpoint-{resume}", resume_step=resume
        )
        event(t + 0.02, "child_started", attempt, pid=4000 + attempt)

    def fail(
        t: float, attempt: int, kind: str, *, step: int, evidence: str, backoff: float
    ) -> None:
        event(t, "failure", attempt, kind=kind, step=step, evidence=evidence, signal=9)
        event(t, "backoff", attempt, seconds=backoff)

    launch(0, 1, None)
    t = train(1, 0, 0, 137, 2.0)
    fail(t + 0.7, 1, "crash", step=137, evidence="killed by SIGKILL", backoff=5.0)

    t += 5.7
    launch(t, 2, 100)
    t = train(2, t, 100, 163, 2.0)
    fail(
        t + 1.0,
        2,
        "cuda_oom",
        step=163,
        evidence="torch.OutOfMemoryError: CUDA out of memory",
        backoff=10.0,
    )
    event(t + 1.0, "remediation", 2, kind="cuda_oom", per_device_train_batch_size=[8, 4])

    t += 11.0
    launch(t, 3, 150)
    t = train(3, t, 150, 201, 2.6)
    event(t + 120, "hang_detected", 3, kind="hang", phase="train", heartbeat_age=120.0)
    fail(t + 152, 3, "hang", step=201, evidence="no heartbeat for 120s in train", backoff=20.0)

    t += 172
    launch(t, 4, 200)
    t = train(4, t, 200, 226, 2.6)
    fail(
        t + 0.5,
        4,
        "disk_full",
        step=226,
        evidence="OSError: [Errno 28] No space left on device",
        backoff=5.0,
    )
    event(t + 1, "waiting_for_disk", 4, need_bytes=200_000_000, free_bytes=20_000_000)

    t += 90
    if gave_up:
        reason = (
            "restart budget spent: 3 restarts within 3600s (restart.max_restarts); "
            "last failure disk_full: OSError: [Errno 28] No space left on device"
        )
        event(t, "gave_up", 4, kind="disk_full", reason=reason, exit_code=76)
    else:
        launch(t, 5, 200)
        t = train(5, t, 200, MAX_STEPS, 2.6)
        event(t + 3, "completed", 5, step=MAX_STEPS, evidence="exit 0", restarts=4)

    layout.events.write_text("".join(json.dumps(e) + "\n" for e in events))
    layout.metrics.write_text("".join(json.dumps(m) + "\n" for m in metrics))
    state = RunStateFile(
        attempts=4 if gave_up else 5,
        restarts=4,
        completed=not gave_up,
        gave_up=str(events[-1].get("reason")) if gave_up else None,
        step=226 if gave_up else MAX_STEPS,
        max_steps=MAX_STEPS,
        tracking_run_id="0123456789abcdef",
    )
    atomic_write_model(layout.state, state)
    return layout
