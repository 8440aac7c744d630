"""Several ranks, without processes: exit codes through a launcher, config rules, the argv.

The real thing (torchrun's agent around two ranks, real signals) is proven in
``tests/e2e/test_multirank.py``; these pin the pure pieces it rests on.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest

from supervisor.config import parse_config
from supervisor.core.classify import Outcome, classify_exit
from supervisor.core.model import Evidence, FailureKind
from supervisor.errors import ConfigError
from supervisor.loop import launcher_env
from supervisor.shell.evidence import launcher_reported_exit, launcher_reported_signal
from tests.unit.test_loop import (
    OrphanRigFactory,
    make_rig,
    orphan_rig,  # noqa: F401 - a fixture, shared with test_loop
    tick,
)
from trainer_child.launch import group_exit_code, torchrun_args
from trainer_child.protocol import EXIT_CONFIG, EXIT_PREEMPTED
from trainer_child.ranks import Ranks, launched_rank

#: What torchrun prints when a rank dies (trimmed): other failures first, the
#: root cause (first observed) last.
TORCHRUN_SUMMARY = """
trainer_child FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-28_07:46:47
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 1370)
  error_file: <N/A>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-28_07:46:46
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : %s (pid: 1371)
  error_file: <N/A>
  traceback : %s
============================================================
"""


def summary(code: int) -> str:
    detail = "Signal 9 (SIGKILL) received by PID 1371" if code < 0 else "To enable traceback"
    return TORCHRUN_SUMMARY % (str(code), detail)


def config(**train: Any) -> dict[str, Any]:
    return {"output_dir": "/tmp/out", "train": {"sft": {"max_steps": 8}, **train}}


# --- the exit status that comes through the launcher ------------------------------------


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ({0: 75, 1: 75}, EXIT_PREEMPTED),
        ({0: 75, 1: -9}, 1),
        ({0: 78, 1: -15}, EXIT_CONFIG),
        ({1: 1}, 1),
        ({}, 0),
    ],
)
def test_group_exit_code_passes_75_and_78_through(codes: dict[int, int], expected: int) -> None:
    """75 only when every failed rank saved first; 78 whenever a rank found the config bad."""
    assert group_exit_code(codes) == expected


def test_torchrun_args_turn_the_agents_restarts_off() -> None:
    """The built-in job's agent: standalone rendezvous, N ranks, no restarts of its own."""
    args = torchrun_args(2, ["--job", "j.json"])
    assert args[:3] == ["--standalone", "--nproc-per-node=2", "--max-restarts=0"]
    assert args[-4:] == ["--module", "trainer_child", "--job", "j.json"]


def test_torchrun_root_cause_exit_is_read_from_its_summary() -> None:
    """The root cause comes last in torchrun's summary: its exit status is the worker's."""
    assert launcher_reported_exit(summary(75)) == EXIT_PREEMPTED
    assert launcher_reported_exit(summary(78)) == EXIT_CONFIG
    assert launcher_reported_exit(summary(-9)) is None
    assert launcher_reported_signal(summary(-9)) == signal.SIGKILL
    assert launcher_reported_exit("no launcher here\n") is None


def test_accelerate_exit_is_read_from_its_called_process_error() -> None:
    """``accelerate launch`` (one process) raises CalledProcessError with the exit status."""
    tail = "subprocess.CalledProcessError: Command '[...]' returned non-zero exit status 78.\n"
    assert launcher_reported_exit(tail) == EXIT_CONFIG


def test_worker_exit_75_is_a_preemption_and_78_a_config_error() -> None:
    """A launcher's exit 1 with a worker's 75 resumes at once; with a worker's 78 it gives up."""

    def verdict(worker_exit: int) -> Any:
        evidence = Evidence(worker_exit=worker_exit)
        return classify_exit(
            1, None, evidence, stop_reason=None, final_complete=False, disk_below_need=False
        )

    preempted = verdict(EXIT_PREEMPTED)
    assert preempted.outcome is Outcome.PREEMPTED
    assert "worker exit 75" in preempted.evidence
    config_error = verdict(EXIT_CONFIG)
    assert config_error.kind is FailureKind.CONFIG
    assert "worker exit 78" in config_error.evidence


def test_crash_evidence_names_the_worker_that_died_not_its_peer() -> None:
    """Behind a launcher the rank killed first is named, before the survivor's broken collective."""
    evidence = Evidence(
        error_kind="crash",
        error_type="builtins.RuntimeError",
        error_message="Connection closed by peer",
        worker_signal=signal.SIGKILL,
    )
    verdict = classify_exit(
        1, None, evidence, stop_reason=None, final_complete=False, disk_below_need=False
    )
    assert verdict.kind is FailureKind.CRASH
    assert verdict.evidence.startswith("exit 1; a worker was killed by SIGKILL; ")


# --- configuration ---------------------------------------------------------------------


def test_nproc_per_node_defaults_to_one_and_must_be_positive() -> None:
    """``train.nproc_per_node`` is 1 unless set, and 0 is refused naming the field."""
    job = parse_config(config())
    assert job.train is not None
    assert job.train.nproc_per_node == 1
    with pytest.raises(ConfigError, match=r"train\.nproc_per_node"):
        parse_config(config(nproc_per_node=0))


def test_nproc_per_node_does_not_change_the_job_digest() -> None:
    """A run completed on 2 ranks is complete on 1: the number of ranks is not the job."""
    assert (
        parse_config(config()).job_digest() == parse_config(config(nproc_per_node=2)).job_digest()
    )


@pytest.mark.parametrize(
    "flag", [["--max-restarts", "3"], ["--max_restarts=2"], ["--max_restarts", "1"]]
)
def test_launcher_restarts_in_a_command_are_refused(flag: list[str]) -> None:
    """torchrun/accelerate restarting workers themselves would bypass checkpoint validation."""
    with pytest.raises(ConfigError, match="must not restart its workers"):
        parse_config({"output_dir": "/tmp/out", "command": ["torchrun", *flag, "train.py"]})


def test_launcher_restarts_off_are_accepted() -> None:
    """``--max-restarts 0`` (the default) is what trainwarden needs."""
    command = ["torchrun", "--max-restarts", "0", "--nproc-per-node", "2", "train.py"]
    assert parse_config({"output_dir": "/tmp/out", "command": command}).command == command


def test_launcher_env_covers_the_grace_and_turns_restarts_off() -> None:
    """The agent waits the whole grace before SIGKILLing a saving rank, and never restarts."""
    assert launcher_env(120.0) == {"PET_MAX_RESTARTS": "0", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"}
    assert launcher_env(0.4)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "1"


# --- the child's pure pieces ------------------------------------------------------------


def test_ranks_alone_are_free_and_agree_with_themselves() -> None:
    """Without a process group the collectives return at once with the local answer."""
    alone = Ranks.current()
    assert (alone.rank, alone.world_size, alone.distributed) == (0, 1, False)
    assert alone.any(True) is True
    assert alone.any(False) is False
    alone.barrier()


def test_launched_rank_reads_torchruns_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """RANK and WORLD_SIZE as torchrun sets them; a job of one when absent or garbled."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_rank() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_rank() == (1, 2)
    monkeypatch.setenv("RANK", "x")
    assert launched_rank() == (0, 1)


# --- the loop ---------------------------------------------------------------------------


def test_built_in_job_on_two_ranks_runs_under_the_launch_agent() -> None:
    """nproc_per_node 2: the argv is trainer_child.launch, the env tames torchrun's agent."""
    rig = make_rig([lambda spawn: 78])
    document = rig.supervisor.config.model_dump(mode="json")
    document["train"]["nproc_per_node"] = 2
    rig.supervisor.config = parse_config(document)
    rig.supervisor.run()
    (seen,) = rig.launcher.seen
    argv = seen.spawn.argv
    assert argv[1:5] == ["-m", "trainer_child.launch", "--nproc-per-node", "2"]
    assert argv[5:7] == ["--job", str(rig.layout.job)]
    assert seen.spawn.env["PET_MAX_RESTARTS"] == "0"
    grace = rig.supervisor.config.preemption.grace
    assert seen.spawn.env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == str(int(grace))


def test_ranks_that_outlive_their_agent_are_waited_for(
    orphan_rig: OrphanRigFactory,  # noqa: F811 - the fixture imported above
) -> None:
    """The orphan's lock is free but a rank of its job lives: no new group until it is gone."""
    rig = orphan_rig([lambda spawn: 0])
    rig.launcher.strays = {5555}
    tick(rig)
    assert rig.launcher.spawns == []
    rig.launcher.strays.clear()
    tick(rig)
    assert len(rig.launcher.spawns) == 1


def test_stray_ranks_at_start_are_treated_as_an_orphan() -> None:
    """Ranks left by a dead agent hold no lock: the supervisor still waits them out."""
    rig = make_rig([])
    rig.launcher.strays = {5555, 5556}
    rig.supervisor.exit_code = 0  # stop after the first event: only Started is judged
    assert rig.supervisor.run() == 0
    found = rig.events("orphan_found")
    assert [e["pid"] for e in found] == [5555]
    assert (5555, signal.SIGTERM) in rig.launcher.signals
    assert rig.launcher.spawns == []
