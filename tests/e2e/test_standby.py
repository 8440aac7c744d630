"""The warm standby end to end: whole supervised runs of the built-in job with ``standby: auto``.

What must hold with a standby taking the restarts: the run still ends with the
uninterrupted run's exact adapter (LoRA's initialisation and the resume see the
same RNG as in a cold start); an attempt whose overrides changed (an OOM
halving) never runs in a standby prepared for the old ones; and a SIGKILLed
supervisor takes its idle standby with it while the warm child, like a cold
one, lives on as an orphan that the next supervisor asks to save.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.jobs import FAST_RESTART, write_config
from tests.support.outputs import assert_bit_identical, events, heartbeat
from tests.support.processes import wait_for
from tests.support.supervised import run_supervised, status_json, supervisor_process
from trainer_child.protocol import (
    COMMIT_RECORD,
    CommitRecord,
    Layout,
    Phase,
    RunStateFile,
    StandbyFile,
    read_model,
)

pytestmark = pytest.mark.slow

WARM = {**FAST_RESTART, "standby": "auto"}


def starts(layout: Layout) -> list[dict[str, Any]]:
    return [e for e in events(layout) if e["event"] == "child_started"]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def idle_standby(layout: Layout, *, ready: bool = True) -> int | None:
    """The pid of a live standby that is not the training child (and is ready, if asked)."""
    record = read_model(layout.standby, StandbyFile)
    state = read_model(layout.state, RunStateFile)
    if record is None or (ready and record.state != "ready"):
        return None
    if state is not None and record.pid == state.child_pid:
        return None
    return record.pid if alive(record.pid) else None


def test_a_warm_restart_from_scratch_ends_bit_identical(
    tmp_path: Path, env: dict[str, str], reference_final: Callable[..., Path]
) -> None:
    """Killed before its first checkpoint, the run restarts warm from scratch: same adapter."""
    job = write_config(
        tmp_path, env={"TRAINWARDEN_FAILPOINTS": "sigkill@step=3,times=1"}, restart=WARM
    )
    code, log = run_supervised(job, env)

    assert code == 0, log
    journal = events(job.layout)
    assert [e["start"] for e in starts(job.layout)] == ["cold", "warm"], log
    assert [e["resume_from"] for e in journal if e["event"] == "launch"] == [None, None]
    (failure,) = [e for e in journal if e["event"] == "failure"]
    assert failure["kind"] == "crash"
    assert "SIGKILL" in failure["evidence"]
    backoff = next(e for e in journal if e["event"] == "backoff")
    assert backoff["seconds"] == 0.0, "the first failure restarts at once"
    assert_bit_identical(job.layout.final, reference_final())
    standby = status_json(job.output_dir, env)["standby"]
    assert standby["last_start"] == "warm"
    assert "the built-in job" in standby["last_start_why"]


def test_after_an_oom_halving_the_stale_standby_is_not_used(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """The halved attempt starts cold (the standby was built for the old micro-batch) and trains
    with the halved micro-batch; the stale standby is gone."""
    job = write_config(
        tmp_path, env={"TRAINWARDEN_FAILPOINTS": "cuda_oom@step=6,times=1"}, restart=WARM
    )
    with supervisor_process(job, env) as supervisor:
        first_standby = wait_for(lambda: idle_standby(job.layout, ready=False), 120)
        code = supervisor.wait(300)
        log = supervisor.log()

    assert code == 0, log
    journal = events(job.layout)
    (failure,) = [e for e in journal if e["event"] == "failure"]
    assert failure["kind"] == "cuda_oom"
    launched = starts(job.layout)
    assert [e["start"] for e in launched] == ["cold", "cold"], launched
    assert "other settings" in launched[1]["why"]
    assert launched[1]["pid"] != first_standby
    assert not alive(first_standby)
    halved = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 2}
    relaunch = [e for e in journal if e["event"] == "launch"][1]
    assert {k: relaunch[k] for k in halved} == halved
    for folder in [*job.output_dir.glob("checkpoint-*"), job.layout.final]:
        record = read_model(folder / COMMIT_RECORD, CommitRecord)
        assert record is not None
        if record.attempt == 2:
            assert {k: getattr(record, k) for k in halved} == halved, folder


#: Slow steps (a test failpoint; numerics untouched) keep the run going while
#: standbys prepare, which takes tens of seconds on a loaded 2-core box.
SLOW = "slow_step@seconds=1.5"
LONG_SFT = {"max_steps": 40, "save_steps": 4}


def test_supervisor_sigkill_takes_the_standby_and_leaves_the_warm_child_as_an_orphan(
    tmp_path: Path, env: dict[str, str], reference_final: Callable[..., Path]
) -> None:
    """SIGKILL the supervisor while a warm child trains: the idle standby dies with it, the
    warm child keeps the lock and saves when the next supervisor asks; the run ends exact."""
    job = write_config(tmp_path, sft=LONG_SFT, env={"TRAINWARDEN_FAILPOINTS": SLOW}, restart=WARM)
    layout = job.layout
    with supervisor_process(job, env, tmp_path / "first.log") as first:
        standby = wait_for(lambda: idle_standby(layout), 240, what="a ready standby")
        wait_for((layout.checkpoint(4) / COMMIT_RECORD).exists, 240, what="checkpoint-4")
        state = read_model(layout.state, RunStateFile)
        assert state is not None
        assert state.child_pid is not None
        os.kill(state.child_pid, signal.SIGKILL)

        def warm_and_training() -> bool:
            beat = heartbeat(layout)
            return beat is not None and beat.pid == standby and beat.phase is Phase.TRAIN

        wait_for(warm_and_training, 120, what="the standby to train as attempt 2")
        successor = wait_for(lambda: idle_standby(layout, ready=False), 60)
        first.signal(signal.SIGKILL)
        first.proc.wait(10)
        wait_for(lambda: not alive(successor), 10, what="the idle standby to die with it")
        assert alive(standby), "the warm child must outlive its supervisor"

        with supervisor_process(job, env, tmp_path / "second.log") as second:
            code = second.wait(300)
            log = second.log()

    assert code == 0, log
    journal = events(layout)
    orphan = next(e for e in journal if e["event"] == "orphan_found")
    assert orphan["pid"] == standby
    assert any(e["event"] == "orphan_gone" for e in journal)
    assert [e["start"] for e in starts(layout)][:2] == ["cold", "warm"]
    # The warm orphan saved when asked (the checkpoint may be pruned by now).
    saved = layout.attempt_log(2).read_text()
    assert "reason=emergency" in saved, saved[-3000:]
    after = journal[journal.index(orphan) :]
    resumed = next(e for e in after if e["event"] == "launch")
    assert resumed["resume_step"] > 4, resumed
    assert_bit_identical(layout.final, reference_final(**LONG_SFT))
