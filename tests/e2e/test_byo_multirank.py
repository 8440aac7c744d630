"""A bring-your-own script on two ranks: ``accelerate launch`` and ``torchrun``, as installed.

``examples/plain_trainer.py`` unchanged; the hook puts ``WardenCallback`` into
both ranks. ``accelerate launch --multi_gpu --num_processes 2`` runs torchrun's
agent inside its own process; ``torchrun --nproc-per-node 2`` is the agent
itself; both exit 1 whatever their ranks said: the same rules as the built-in
job must hold through them. A rank is SIGKILLed, then the supervisor is
SIGTERMed, then a new supervisor finishes the run; the adapter must equal an
unsupervised run's (one reference: both launchers run the same DDP over gloo).
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest

from tests.e2e.byo import global_step, plain_trainer_argv, run_unsupervised, write_command_config
from tests.e2e.test_multirank import census, committed_by, rank_files, ranks_of, records, training
from tests.support.outputs import assert_bit_identical, events
from tests.support.processes import wait_for
from tests.support.supervised import run_supervised, status_json, supervisor_process

pytestmark = pytest.mark.slow

MAX_STEPS = 300
SAVE_STEPS = 20
ACCELERATE = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",  # two processes through torch.distributed.run; gloo without a GPU
    "--num_processes",
    "2",
]
#: The console script pip installed beside this interpreter, as a user would type it.
TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2"]
LAUNCHERS = {"accelerate": ACCELERATE, "torchrun": TORCHRUN}
TIMEOUT = 240.0


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: Path,
    jsonl_data: Path,
    env: dict[str, str],
) -> Path:
    """The output_dir of the script on two ranks, unsupervised and uninterrupted."""
    root = tmp_path_factory.mktemp("accelerate-2-reference")
    argv = plain_trainer_argv(
        tiny_model, jsonl_data, root / "out", max_steps=MAX_STEPS, save_steps=SAVE_STEPS
    )
    run_unsupervised([*ACCELERATE, *argv], env, root / "reference.log", timeout=TIMEOUT)
    return root / "out"


@pytest.fixture(params=sorted(LAUNCHERS))
def command(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_model: Path, jsonl_data: Path
) -> list[str]:
    """The launcher (``accelerate`` or ``torchrun``) and the script, training into tmp/out."""
    argv = plain_trainer_argv(
        tiny_model, jsonl_data, tmp_path / "out", max_steps=MAX_STEPS, save_steps=SAVE_STEPS
    )
    return [*LAUNCHERS[request.param], *argv]


def test_two_ranks_survive_a_rank_sigkill_and_a_sigterm_bit_identical(
    command: list[str], tmp_path: Path, env: dict[str, str], reference: Path
) -> None:
    """Rank killed: the group restarts; SIGTERM: both ranks save one step; the end is exact."""
    out = tmp_path / "out"
    # The default standby setting: it keeps none for these, and says why.
    restart = {"standby": "auto"}
    job = write_command_config(tmp_path, command, out, restart=restart, preemption={"grace": "60s"})

    with census(out) as seen, supervisor_process(job, env) as supervisor:
        wait_for(lambda: committed_by(out, 1) and training(job.layout, 1), TIMEOUT)
        os.kill(ranks_of(out, 1)[1], signal.SIGKILL)
        wait_for(lambda: committed_by(out, 2) and training(job.layout, 2), TIMEOUT)
        supervisor.signal(signal.SIGTERM)
        code = supervisor.wait(TIMEOUT)
        log = supervisor.log()
        saved = records(out)

    assert code == 0, log
    assert not seen.overlaps, seen.overlaps[:3]
    journal = events(job.layout)
    failure = next(e for e in journal if e["event"] == "failure")
    assert failure["kind"] == "crash"
    assert "a worker was killed by SIGKILL" in failure["evidence"], failure
    preempted = next(e for e in journal if e["event"] == "preempted")
    step = preempted["checkpoint"]
    record = saved[step]
    assert (record.attempt, record.reason, record.world_size) == (2, "emergency", 2)
    assert rank_files(record) == {"rng_state_0.pth", "rng_state_1.pth"}
    attempt_log = job.layout.attempt_log(2).read_text(errors="replace")
    stopped = re.findall(r"preempted step=(\d+) \S+ rank=(\d+)", attempt_log)
    assert sorted(stopped) == [(str(step), "0"), (str(step), "1")], stopped

    # Its ranks are fresh interpreters: no standby could serve them, and status says so.
    standby = status_json(out, env)["standby"]
    assert standby["last_start"] == "cold", standby
    assert "fresh interpreters" in standby["last_start_why"] or (
        "not a python module or script (torchrun)" in standby["last_start_why"]
    ), standby

    code, log = run_supervised(job, env, timeout=TIMEOUT)
    assert code == 0, log
    launches = [e for e in events(job.layout) if e["event"] == "launch"]
    assert launches[-1]["resume_step"] == step
    assert global_step(out / f"checkpoint-{MAX_STEPS}") == MAX_STEPS
    assert_bit_identical(out, reference)
