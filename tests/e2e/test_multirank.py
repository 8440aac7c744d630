"""Two ranks of the built-in job (torchrun's agent, gloo on CPU) under real faults.

Each scenario is one supervised run whose observations several tests judge:

* chaos: a SIGKILL of one rank in the middle of a save, four SIGKILLs of one
  rank at seeded random moments, then a SIGSTOP of one rank; the run
  completes, tensor for tensor equal to an uninterrupted 2-rank run;
* hand-over: the supervisor is SIGKILLed, a second one makes the orphaned
  group save and exit before it starts its own; then that one is SIGTERMed
  (both ranks save the same step and exit), and a third finishes the run;
* a kernel OOM kill of one rank in a memory cgroup (serial, root only);
* two "nodes" on localhost, one torchrun agent each over a c10d rendezvous
  (no supervisor: one per node is not supported yet): SIGTERM to one node
  stops both at the same step, and the resume is bit-identical.

Throughout, a census thread reads the environment of every process of the
job every 50 ms: no two attempts' processes may ever be alive at once.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.test_failures_oom import V1_MEMORY, _oom_kills, _own_memory_cgroup
from tests.support.jobs import FAST_RESTART, Job, write_config
from tests.support.outputs import assert_bit_identical, events, heartbeat
from tests.support.processes import Process as Child
from tests.support.processes import wait_for
from tests.support.supervised import supervisor_process
from trainer_child.protocol import (
    COMMIT_RECORD,
    ENV_ATTEMPT,
    ENV_OUTPUT_DIR,
    CommitRecord,
    JobFile,
    Layout,
    Phase,
    checkpoint_step,
    read_model,
)

pytestmark = pytest.mark.slow

NPROC = 2
SEED = 20_261_128
SFT: dict[str, Any] = {
    "max_steps": 96,
    "save_steps": 8,
    "per_device_train_batch_size": 2,
    "learning_rate": 5e-3,
    "max_length": 64,
    "seed": 0,
    "logging_steps": 8,
}
TRAIN: dict[str, Any] = {"nproc_per_node": NPROC, "sft": SFT}
#: Train-phase silence that counts as a hang. A step takes ~0.2 s here; even a
#: loaded 2-core box stays far below this.
HANG: dict[str, Any] = {"timeout": "8s", "startup_timeout": "180s", "kill_grace": "10s"}
GRACE_SECONDS = 60
PREEMPTION = {"grace": f"{GRACE_SECONDS}s"}
#: The first save of the chaos run is slowed (each torch.save sleeps), so the
#: mid-save kill lands in a folder that is visibly half-written.
MID_SAVE_FAILPOINT = "slow_save@seconds=0.4,times=2"
RANDOM_KILLS = 4
CENSUS_EVERY = 0.05
TIMEOUT = 240.0


# --- the processes of the job -------------------------------------------------------------


def _job_processes(output_dir: Path) -> dict[int, dict[str, str]]:
    """Every live process whose environment names ``output_dir`` (pid -> environment)."""
    target = str(output_dir)
    found: dict[int, dict[str, str]] = {}
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            environ = proc.environ()
        except psutil.Error:
            continue
        if environ.get(ENV_OUTPUT_DIR) == target:
            found[proc.pid] = environ
    return found


def ranks_of(output_dir: Path, attempt: int) -> dict[int, int]:
    """The rank processes of ``attempt`` (rank -> pid); torchrun sets RANK for its workers only."""
    return {
        int(environ["RANK"]): pid
        for pid, environ in _job_processes(output_dir).items()
        if environ.get(ENV_ATTEMPT) == str(attempt) and "RANK" in environ
    }


@dataclass
class Census:
    """What the census thread saw: the attempts alive together, sample by sample."""

    output_dir: Path
    stop: threading.Event = field(default_factory=threading.Event)
    samples: int = 0
    pids: dict[str, set[int]] = field(default_factory=dict)
    overlaps: list[dict[str, list[int]]] = field(default_factory=list)

    def run(self) -> None:
        while not self.stop.is_set():
            alive: dict[str, list[int]] = {}
            for pid, environ in _job_processes(self.output_dir).items():
                alive.setdefault(environ.get(ENV_ATTEMPT, "?"), []).append(pid)
            for attempt, pids in alive.items():
                self.pids.setdefault(attempt, set()).update(pids)
            if len(alive) > 1:
                self.overlaps.append(alive)
            self.samples += 1
            self.stop.wait(CENSUS_EVERY)


@contextlib.contextmanager
def census(output_dir: Path) -> Iterator[Census]:
    """Sample the job's processes for the duration of the block."""
    seen = Census(output_dir)
    thread = threading.Thread(target=seen.run, name="group-census", daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        seen.stop.set()
        thread.join(10)


# --- reading the output_dir ---------------------------------------------------------------


def records(output_dir: Path) -> dict[int, CommitRecord]:
    """The commit record of every checkpoint left, by step."""
    found: dict[int, CommitRecord] = {}
    for folder in output_dir.glob("checkpoint-*"):
        step = checkpoint_step(folder.name)
        record = read_model(folder / COMMIT_RECORD, CommitRecord)
        if step is not None and record is not None:
            found[step] = record
    return found


def committed_by(output_dir: Path, attempt: int | None) -> int | None:
    """The newest step committed by ``attempt`` (None: run without a supervisor), if any."""
    steps = [step for step, record in records(output_dir).items() if record.attempt == attempt]
    return max(steps, default=None)


def uncommitted(output_dir: Path) -> int | None:
    """A checkpoint folder that exists without its record: a save in progress."""
    for folder in output_dir.glob("checkpoint-*"):
        step = checkpoint_step(folder.name)
        if step is not None and folder.is_dir() and not (folder / COMMIT_RECORD).exists():
            return step
    return None


def training(layout: Layout, attempt: int | None) -> bool:
    beat = heartbeat(layout)
    return beat is not None and beat.attempt == attempt and beat.phase is Phase.TRAIN


def rank_files(record: CommitRecord) -> set[str]:
    return {entry.path for entry in record.files if entry.path.startswith("rng_state")}


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_group_gone(seen: Census, attempt: int) -> None:
    """No process of ``attempt`` is alive (the leak check would also catch it, later)."""
    alive = [pid for pid in seen.pids.get(str(attempt), set()) if _alive(pid)]
    assert not alive, f"attempt {attempt} left {alive}"


def kill_rank(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    os.kill(pid, sig)


def job(directory: Path, **sections: Any) -> Job:
    """The 2-rank built-in job, supervised with fast restarts and a short hang limit."""
    return write_config(
        directory,
        train=TRAIN,
        hang=HANG,
        preemption=PREEMPTION,
        restart={**FAST_RESTART, "no_progress_limit": 10},
        **sections,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    """final/ of the job run once on 2 ranks, unsupervised and uninterrupted."""
    root = tmp_path_factory.mktemp("multirank-reference")
    spec = JobFile.model_validate({"output_dir": str(root / "out"), "train": TRAIN})
    path = root / "job.json"
    path.write_text(spec.model_dump_json())
    argv = [sys.executable, "-m", "trainer_child.launch", "--nproc-per-node", str(NPROC)]
    child = Child([*argv, "--job", str(path)], env, root / "reference.log")
    try:
        code = child.wait(TIMEOUT)
        assert code == 0, child.log()
    finally:
        child.close()
    return root / "out" / "final"


# --- chaos ----------------------------------------------------------------------------------


@dataclass
class ChaosRun:
    """What the chaos scenario did and saw."""

    job: Job
    code: int | None = None
    log: str = ""
    mid_save_step: int = 0
    kills: list[tuple[int, int, int]] = field(default_factory=list)  # attempt, rank, pid
    stopped: tuple[int, int, int] = (0, 0, 0)
    census: Census | None = None
    journal: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> ChaosRun:
    """Mid-save SIGKILL, four random SIGKILLs of one rank, one SIGSTOP; run to the end."""
    root = tmp_path_factory.mktemp("multirank-chaos")
    run = ChaosRun(job(root, env={"TRAINWARDEN_FAILPOINTS": MID_SAVE_FAILPOINT}))
    out, layout = run.job.output_dir, run.job.layout
    rng = random.Random(SEED)
    started = time.monotonic()
    with census(out) as seen, supervisor_process(run.job, env) as supervisor:
        # Attempt 1: its first checkpoint is being written (slowly): kill a rank in it.
        run.mid_save_step = wait_for(lambda: uncommitted(out), TIMEOUT)
        rank = rng.randrange(NPROC)
        victim = wait_for(lambda: ranks_of(out, 1).get(rank), 10)
        kill_rank(victim)
        run.kills.append((1, rank, victim))
        # Attempts 2-5: once the attempt has committed a checkpoint of its own
        # (so every attempt makes progress), a random moment later.
        for attempt in range(2, 2 + RANDOM_KILLS):
            wait_for(functools.partial(committed_by, out, attempt), TIMEOUT)
            time.sleep(rng.uniform(0.0, 1.5))
            rank = rng.randrange(NPROC)
            victim = ranks_of(out, attempt)[rank]
            kill_rank(victim)
            run.kills.append((attempt, rank, victim))
        # Attempt 6: one rank stops for good; the other waits on it in a collective.
        attempt = 2 + RANDOM_KILLS
        wait_for(lambda: committed_by(out, attempt), TIMEOUT)
        wait_for(lambda: training(layout, attempt), TIMEOUT)
        rank = rng.randrange(NPROC)
        victim = ranks_of(out, attempt)[rank]
        kill_rank(victim, signal.SIGSTOP)
        run.stopped = (attempt, rank, victim)
        run.code = supervisor.wait(TIMEOUT)
        run.log = supervisor.log()
    run.seconds = time.monotonic() - started
    run.census = seen
    run.journal = events(layout)
    print(f"chaos: seed={SEED} kills={run.kills} stopped={run.stopped} took={run.seconds:.1f}s")
    return run


def test_chaos_run_completes_bit_identical_to_an_uninterrupted_two_rank_run(
    chaos: ChaosRun, reference: Path
) -> None:
    """Five SIGKILLs of single ranks (one mid-save) and a SIGSTOP: the final adapter is equal."""
    assert chaos.code == 0, chaos.log
    assert_bit_identical(chaos.job.layout.final, reference)
    final = read_model(chaos.job.layout.final / COMMIT_RECORD, CommitRecord)
    assert final is not None
    assert final.step == SFT["max_steps"]
    assert final.world_size == NPROC


def test_a_rank_killed_restarts_the_whole_group_from_the_newest_valid_checkpoint(
    chaos: ChaosRun,
) -> None:
    """Each single-rank SIGKILL is one crash of the attempt, evidence naming the SIGKILL."""
    failures = [e for e in chaos.journal if e["event"] == "failure"]
    crashes = [e for e in failures if e["kind"] == "crash"]
    assert [e["attempt"] for e in crashes] == [attempt for attempt, _, _ in chaos.kills]
    for crash in crashes:
        assert "a worker was killed by SIGKILL" in crash["evidence"], crash
    launches = {e["attempt"]: e for e in chaos.journal if e["event"] == "launch"}
    for attempt, _, _ in chaos.kills[1:]:
        # The next attempt resumed from the newest checkpoint this one committed.
        newest = max(
            e["step"]
            for e in chaos.journal
            if e["event"] == "checkpoint_committed" and e["attempt"] == attempt
        )
        assert launches[attempt + 1]["resume_step"] == newest, launches[attempt + 1]


def test_the_checkpoint_torn_by_the_mid_save_kill_is_quarantined(chaos: ChaosRun) -> None:
    """The half-written folder gets no record and is moved aside; the next attempt starts over."""
    quarantined = [e for e in chaos.journal if e["event"] == "quarantined"]
    assert chaos.mid_save_step in [e["step"] for e in quarantined], quarantined
    launches = [e for e in chaos.journal if e["event"] == "launch"]
    assert launches[1]["resume_step"] is None, launches[1]


def test_a_stopped_rank_is_a_hang_and_its_whole_group_is_replaced(chaos: ChaosRun) -> None:
    """SIGSTOP of one rank: hang detected (a stopped process seen), group gone, restarted."""
    attempt, _, _ = chaos.stopped
    hang = next(e for e in chaos.journal if e["event"] == "hang_detected")
    assert hang["attempt"] == attempt
    assert hang["stopped"] is True, hang
    failure = next(e for e in chaos.journal if e["event"] == "failure" and e["kind"] == "hang")
    assert failure["attempt"] == attempt
    assert any(e["event"] == "launch" and e["attempt"] == attempt + 1 for e in chaos.journal)
    assert chaos.census is not None
    assert_group_gone(chaos.census, attempt)


def test_chaos_never_runs_two_groups_at_once(chaos: ChaosRun) -> None:
    """Every attempt's agent and ranks are gone before the next attempt's start."""
    seen = chaos.census
    assert seen is not None
    assert seen.samples > 100, seen.samples
    assert not seen.overlaps, seen.overlaps[:3]
    launched = {str(e["attempt"]) for e in chaos.journal if e["event"] == "launch"}
    assert launched <= set(seen.pids), (launched, seen.pids)
    for attempt in seen.pids:
        # agent + ranks (+ nothing else): three processes an attempt, at most.
        assert len(seen.pids[attempt]) <= NPROC + 1, seen.pids[attempt]
        assert_group_gone(seen, int(attempt))


def test_every_checkpoint_lists_every_ranks_files(chaos: ChaosRun) -> None:
    """Each commit record names both ranks' rng_state files and the world size."""
    found = records(chaos.job.output_dir)
    assert found
    for step, record in found.items():
        assert record.world_size == NPROC, step
        assert rank_files(record) == {"rng_state_0.pth", "rng_state_1.pth"}, step


# --- hand-over and SIGTERM ------------------------------------------------------------------


@dataclass
class HandOver:
    """What the hand-over scenario did and saw."""

    job: Job
    orphans: dict[int, int] = field(default_factory=dict)
    #: The records of the checkpoints as the second supervisor's first group trained.
    records_after_hand_over: dict[int, CommitRecord] = field(default_factory=dict)
    second_code: int | None = None
    second_log: str = ""
    #: The records of the checkpoints once the second supervisor has exited.
    records_after_sigterm: dict[int, CommitRecord] = field(default_factory=dict)
    step_before_sigterm: int = 0
    third_code: int | None = None
    third_log: str = ""
    census: Census | None = None
    journal: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture(scope="module")
def hand_over(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> HandOver:
    """SIGKILL supervisor 1 mid-run; supervisor 2 takes over, is SIGTERMed; 3 finishes."""
    root = tmp_path_factory.mktemp("multirank-handover")
    run = HandOver(job(root))
    out, layout = run.job.output_dir, run.job.layout
    with census(out) as seen:
        with supervisor_process(run.job, env, root / "first.log") as first:
            wait_for(lambda: committed_by(out, 1) and training(layout, 1), TIMEOUT)
            first.signal(signal.SIGKILL)
            first.wait(30)
            run.orphans = ranks_of(out, 1)
            assert len(run.orphans) == NPROC, "the ranks died with their supervisor"
            with supervisor_process(run.job, env, root / "second.log") as second:
                wait_for(lambda: committed_by(out, 2) and training(layout, 2), TIMEOUT)
                run.records_after_hand_over = records(out)
                beat = heartbeat(layout)
                assert beat is not None
                run.step_before_sigterm = beat.step
                second.signal(signal.SIGTERM)
                run.second_code = second.wait(GRACE_SECONDS + 30)
                run.second_log = second.log()
                run.records_after_sigterm = records(out)
        with supervisor_process(run.job, env, root / "third.log") as third:
            run.third_code = third.wait(TIMEOUT)
            run.third_log = third.log()
    run.census = seen
    run.journal = events(layout)
    return run


def test_a_supervisor_sigkill_leaves_no_second_group_on_the_output_dir(
    hand_over: HandOver,
) -> None:
    """The orphaned agent and ranks save and exit before the new supervisor starts a group."""
    seen = hand_over.census
    assert seen is not None
    assert seen.samples > 100
    assert not seen.overlaps, seen.overlaps[:3]
    assert set(hand_over.orphans.values()) <= seen.pids["1"]
    for attempt in seen.pids:
        assert_group_gone(seen, int(attempt))
    names = [e["event"] for e in hand_over.journal]
    found, gone = names.index("orphan_found"), names.index("orphan_gone")
    assert "launch" not in names[found:gone]
    relaunch = next(e for e in hand_over.journal[gone:] if e["event"] == "launch")
    orphan_saved = hand_over.records_after_hand_over.get(relaunch["resume_step"])
    assert orphan_saved is not None, relaunch
    assert orphan_saved.attempt == 1
    assert rank_files(orphan_saved) == {"rng_state_0.pth", "rng_state_1.pth"}


def test_sigterm_saves_one_emergency_checkpoint_of_both_ranks_at_one_step(
    hand_over: HandOver,
) -> None:
    """Both ranks stop at the same step; one emergency record lists both ranks' rng states."""
    assert hand_over.second_code == 0, hand_over.second_log
    emergency = {
        step: record
        for step, record in hand_over.records_after_sigterm.items()
        if record.attempt == 2 and record.reason == "emergency"
    }
    assert len(emergency) == 1, emergency
    ((step, record),) = emergency.items()
    assert record.world_size == NPROC
    assert rank_files(record) == {"rng_state_0.pth", "rng_state_1.pth"}
    log = hand_over.job.layout.attempt_log(2).read_text(errors="replace")
    stopped_at = {
        int(rank): int(at) for at, rank in re.findall(r"preempted step=(\d+) \S+ rank=(\d+)", log)
    }
    assert stopped_at == {0: step, 1: step}, stopped_at
    requested = next(e for e in hand_over.journal if e["event"] == "preempt_requested")
    preempted = next(e for e in hand_over.journal if e["event"] == "preempted")
    assert preempted["checkpoint"] == step
    latency = preempted["ts"] - requested["ts"]
    print(f"SIGTERM -> group gone: {latency:.2f}s (grace {GRACE_SECONDS}s), step {step}")
    assert latency < GRACE_SECONDS


def test_resuming_after_sigterm_loses_no_step_and_ends_bit_identical(
    hand_over: HandOver, reference: Path
) -> None:
    """The next supervisor resumes at the emergency step and ends equal to the reference."""
    assert hand_over.third_code == 0, hand_over.third_log
    launches = [e for e in hand_over.journal if e["event"] == "launch"]
    preempted = next(e for e in hand_over.journal if e["event"] == "preempted")
    assert launches[-1]["resume_step"] == preempted["checkpoint"]
    assert preempted["checkpoint"] >= hand_over.step_before_sigterm
    assert not [e for e in hand_over.journal if e["event"] == "failure"]
    assert_bit_identical(hand_over.job.layout.final, reference)


# --- two nodes on localhost ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def node_argv(node: int, port: int, run_id: str, job_file: Path, *extra: str) -> list[str]:
    """torchrun on one of two nodes: one rank each, c10d rendezvous on localhost."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        f"--node-rank={node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        f"--rdzv-id={run_id}",
        "--max-restarts=0",
        "--module",
        "trainer_child",
        "--job",
        str(job_file),
        *extra,
    ]


def run_nodes(root: Path, env: dict[str, str], name: str, *extra: str) -> list[Child]:
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    return [
        Child(
            node_argv(node, port, run_id, root / "job.json", *extra),
            env,
            root / f"{name}{node}.log",
        )
        for node in range(2)
    ]


def test_sigterm_to_one_node_stops_both_at_one_step_and_resumes_bit_identical(
    tmp_path: Path, env: dict[str, str], reference: Path
) -> None:
    """One node preempted: the other node's rank saves the same step; the resume is exact."""
    spec = JobFile.model_validate({"output_dir": str(tmp_path / "out"), "train": TRAIN})
    (tmp_path / "job.json").write_text(spec.model_dump_json())
    layout = Layout(tmp_path / "out")
    nodes = run_nodes(tmp_path, env, "node")
    try:
        wait_for(lambda: committed_by(layout.output_dir, None) and training(layout, None), TIMEOUT)
        os.killpg(nodes[1].pid, signal.SIGTERM)  # node 1's agent; it passes SIGTERM on
        codes = [node.wait(TIMEOUT) for node in nodes]
        logs = [node.log_path.read_text(errors="replace") for node in nodes]
    finally:
        for node in nodes:
            node.close()
    stops = [re.findall(r"preempted step=(\d+) \S+ rank=(\d+)", log) for log in logs]
    assert all(stops), logs
    ((step0, rank0),), ((step1, rank1),) = stops
    assert (rank0, rank1) == ("0", "1")
    assert step0 == step1, stops
    assert "sigterm_here=False" in logs[0], "node 0 got no SIGTERM: it stopped by agreement"
    # torchrun exits 1 either way; node 0's summary says its rank exited 75.
    assert codes == [1, 1], codes
    assert re.search(r"exitcode\s*:\s*75", logs[0]), logs[0][-3000:]
    step = int(step0)
    record = read_model(layout.checkpoint(step) / COMMIT_RECORD, CommitRecord)
    assert record is not None
    assert (record.reason, record.world_size) == ("emergency", 2)
    assert rank_files(record) == {"rng_state_0.pth", "rng_state_1.pth"}

    nodes = run_nodes(tmp_path, env, "resume", "--resume-from", str(layout.checkpoint(step)))
    try:
        assert [node.wait(TIMEOUT) for node in nodes] == [0, 0], nodes[0].log()
    finally:
        for node in nodes:
            node.close()
    assert_bit_identical(layout.final, reference)


# --- host OOM -------------------------------------------------------------------------------

#: The agent alone needs ~270 MB here; the supervisor ~45 MB; each rank grows to
#: ~550 MB. The limit is crossed while the ranks load, when each is already
#: bigger than the agent, so the OOM killer picks a rank.
GROUP_LIMIT_BYTES = 700 << 20
OOM_SFT = {**SFT, "max_steps": 8, "save_steps": 4}


@pytest.fixture
def group_cgroup() -> Iterator[Path]:
    """A fresh v1 memory cgroup limited to GROUP_LIMIT_BYTES; removed at teardown."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create memory cgroups")
    if not (V1_MEMORY / "cgroup.procs").exists() or not os.access(V1_MEMORY, os.W_OK):
        pytest.skip("no writable cgroup v1 memory hierarchy at /sys/fs/cgroup/memory")
    path = V1_MEMORY / f"tw-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        (path / "memory.limit_in_bytes").write_text(str(GROUP_LIMIT_BYTES))
        memsw = path / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            memsw.write_text(str(GROUP_LIMIT_BYTES))
        yield path
    finally:
        deadline = time.monotonic() + 10
        while path.exists():
            try:
                path.rmdir()
            except OSError:
                # EBUSY while a killed task is still being detached from the cgroup.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@pytest.mark.system
@pytest.mark.serial
def test_kernel_oom_kill_of_one_rank_is_host_oom_and_halves_every_ranks_micro_batch(
    tmp_path: Path, env: dict[str, str], group_cgroup: Path
) -> None:
    """A rank OOM-killed in a cgroup: host_oom by the counter; both ranks rerun at half batch."""
    run = write_config(
        tmp_path,
        train={"nproc_per_node": NPROC, "sft": OOM_SFT},
        hang=HANG,
        restart=FAST_RESTART,
    )
    layout = run.layout
    # The supervisor starts inside the limited cgroup, so the first group is born
    # there; once rank 0 announces itself it is moved out, so every later
    # attempt is born outside the limit.
    join = f'echo $$ > {group_cgroup}/cgroup.procs && exec "$@"'
    home = _own_memory_cgroup()
    with supervisor_process(run, env, wrap=lambda argv: ["sh", "-c", join, "sh", *argv]) as proc:
        beat = wait_for(lambda: heartbeat(layout) or proc.proc.poll() is not None, 60)
        assert beat is not True, proc.log()
        (home / "cgroup.procs").write_text(str(proc.pid))
        code = proc.wait(TIMEOUT)
        log = proc.log()

    assert code == 0, log
    assert _oom_kills(group_cgroup) >= 1
    journal = events(layout)
    failures = [e for e in journal if e["event"] == "failure"]
    assert len(failures) == 1, failures
    failure = failures[0]
    assert failure["kind"] == "host_oom", failure
    assert "a worker was killed by SIGKILL" in failure["evidence"]
    assert "cgroup oom_kill counter rose" in failure["evidence"]
    remedy = next(e for e in journal if e["event"] == "remediation")
    assert remedy["per_device_train_batch_size"] == [2, 1]
    assert remedy["gradient_accumulation_steps"] == [1, 2]
    # Every rank of the next attempt trains with the halved micro-batch.
    second = layout.attempt_log(2).read_text(errors="replace")
    halved = re.findall(
        r"rank_training rank=(\d+) world_size=2 \S+ "
        r"per_device_train_batch_size=1 gradient_accumulation_steps=2",
        second,
    )
    assert sorted(halved) == ["0", "1"], second[-4000:]
    final = read_model(layout.final / COMMIT_RECORD, CommitRecord)
    assert final is not None
    assert final.step == OOM_SFT["max_steps"]
    assert (final.per_device_train_batch_size, final.gradient_accumulation_steps) == (1, 2)
