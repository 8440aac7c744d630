"""The supervisor itself dies, or a second one is started: never two trainers on one run.

The orphan scenario runs once per module (real training costs seconds per
attempt) and its observations are asserted by several tests: the first
supervisor is SIGKILLed mid-run, its child trains on as an orphan holding
``.warden/lock``, and a second ``trainwarden run`` of the same config must ask
the orphan to save and exit before it trains again. While that second
supervisor runs, a third one is started and must be refused. A sampler thread
counts live training processes of the job every ~20 ms the whole time.

Last, a bring-your-own ``command:`` job is SIGKILLed once and must be resumed
through ``TRAINWARDEN_RESUME_FROM``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.jobs import STANDARD_SFT, Job, write_config, write_tiny_job
from tests.support.outputs import assert_bit_identical, events, heartbeat
from tests.support.processes import REPO_ROOT, wait_for
from tests.support.supervised import supervisor_process
from trainer_child.protocol import (
    COMMIT_RECORD,
    ENV_RESUME_FROM,
    EXIT_CONFIG,
    EXIT_PREEMPTED,
    CommitRecord,
    Layout,
    RunStateFile,
    read_model,
)

pytestmark = pytest.mark.slow

SAMPLE_EVERY = 0.02
#: The first supervisor dies once its child trains past checkpoint-8.
KILL_SUPERVISOR_AT_STEP = 9
#: Slow the steps from there on (a test failpoint; numerics are untouched), so
#: the orphan is still training when the restarted supervisor, which needs a
#: few seconds to start, SIGTERMs it, and its emergency save lands between two
#: periodic ones. ``times`` caps the slow steps across attempts.
SLOW_STEPS = f"slow_step@seconds=1.5,step={KILL_SUPERVISOR_AT_STEP},times=5"
#: A CLI call that must return at once: well under one child's start-up.
AT_ONCE_SECONDS = 20.0


class TrainerCensus(threading.Thread):
    """Count, every ~20 ms, the live processes running this job's training child."""

    def __init__(self, marker: str) -> None:
        super().__init__(name="trainer-census", daemon=True)
        self.marker = marker
        self.stop = threading.Event()
        self.max_seen = 0
        self.samples = 0
        self.pids: set[int] = set()

    def run(self) -> None:
        while not self.stop.is_set():
            live = self.sample()
            self.max_seen = max(self.max_seen, len(live))
            self.pids.update(live)
            self.samples += 1
            self.stop.wait(SAMPLE_EVERY)

    def sample(self) -> list[int]:
        live = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            cmdline = proc.info["cmdline"] or []
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any("trainer_child" in part for part in cmdline) and any(
                self.marker in part for part in cmdline
            ):
                live.append(proc.pid)
        return live


@contextlib.contextmanager
def census(marker: str) -> Iterator[TrainerCensus]:
    """Run a TrainerCensus for the block; it is stopped and joined on the way out."""
    sampler = TrainerCensus(marker)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop.set()
        sampler.join(10)


def _reap(pid: int) -> tuple[int] | None:
    """Return ``(exit status,)`` of our (subreaper) child ``pid`` once it has exited."""
    try:
        waited, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if waited == 0:
        return None
    return (os.waitstatus_to_exitcode(status),)


def _kill_and_reap(pid: int | None) -> None:
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _run_cli(args: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str, float]:
    """Run ``python -m supervisor ARGS``; return its exit status, output and duration.

    In its own session, and killed by PID with whatever it started should it
    not return: a `run` that wrongly went on supervising must not outlive the test.
    """
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", *args],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    _kill_and_reap(child.pid)
            proc.kill()
            proc.wait(10)
    return proc.returncode, output, time.monotonic() - started


@dataclass
class OrphanRun:
    """What the module's orphan scenario observed, for the tests to judge."""

    job: Job
    orphan_pid: int = 0
    orphan_exit: int | None = None
    first_supervisor_pid: int = 0
    second_supervisor_pid: int = 0
    second_code: int | None = None
    second_log: str = ""
    second_child_before_probe: int | None = None
    second_child_after_probe: int | None = None
    probe_code: int | None = None
    probe_output: str = ""
    probe_seconds: float = 0.0
    step_at_supervisor_kill: int = 0
    events_before_probe: int = 0
    events_after_probe: int = 0
    max_trainers: int = 0
    trainer_pids: set[int] = field(default_factory=set)
    samples: int = 0
    journal: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture(scope="module")
def orphan_run(
    tmp_path_factory: pytest.TempPathFactory,
    env: dict[str, str],
    reference_final: Callable[..., Path],
) -> OrphanRun:
    """SIGKILL a supervisor mid-run, restart it, probe it with a third; record everything."""
    # The uninterrupted reference run (cached for the session) needs no
    # supervisor: let it train on the other core while the scenario plays out.
    reference = threading.Thread(target=reference_final, name="reference-run", daemon=True)
    reference.start()
    try:
        return _play_orphan_scenario(tmp_path_factory.mktemp("orphan"), env)
    finally:
        reference.join(300)


def _play_orphan_scenario(root: Path, env: dict[str, str]) -> OrphanRun:
    job = write_config(root, env={"TRAINWARDEN_FAILPOINTS": SLOW_STEPS})
    layout = job.layout
    seen = OrphanRun(job=job)
    orphan: int | None = None
    try:
        with (
            census(str(layout.job)) as sampler,
            supervisor_process(job, env, root / "first.log") as first,
        ):
            seen.first_supervisor_pid = first.pid

            def training_past_a_commit() -> int | None:
                beat = heartbeat(layout)
                committed = (layout.checkpoint(8) / COMMIT_RECORD).exists()
                if beat is None or beat.phase.value != "train" or not committed:
                    return None
                return beat.pid if beat.step >= KILL_SUPERVISOR_AT_STEP else None

            orphan = seen.orphan_pid = wait_for(training_past_a_commit, 120)
            first.signal(signal.SIGKILL)
            beat = heartbeat(layout)
            seen.step_at_supervisor_kill = beat.step if beat is not None else 0
            first.proc.wait(10)
            assert psutil.pid_exists(orphan), "the child died with its supervisor"

            with supervisor_process(job, env, root / "second.log") as second:
                seen.second_supervisor_pid = second.pid

                def second_child() -> int | None:
                    state = read_model(layout.state, RunStateFile)
                    if state is None or state.supervisor_pid != second.pid:
                        return None
                    return state.child_pid

                (seen.orphan_exit,) = wait_for(lambda: _reap(orphan), 60)
                seen.second_child_before_probe = wait_for(second_child, 60)
                seen.events_before_probe = len(events(layout))
                code, output, took = _run_cli(["run", str(job.path)], env)
                seen.probe_code, seen.probe_output, seen.probe_seconds = code, output, took
                seen.events_after_probe = len(events(layout))
                seen.second_child_after_probe = second_child()
                seen.second_code = second.wait(240)
                seen.second_log = second.log()
        seen.max_trainers, seen.trainer_pids = sampler.max_seen, set(sampler.pids)
        seen.samples = sampler.samples
    finally:
        _kill_and_reap(orphan)
    seen.journal = events(layout)
    return seen


def test_restarted_supervisor_never_runs_two_trainers(orphan_run: OrphanRun) -> None:
    """While the orphan of a SIGKILLed supervisor lives, no second training child starts."""
    assert orphan_run.samples > 100, orphan_run.samples
    assert orphan_run.max_trainers == 1, orphan_run.trainer_pids
    assert orphan_run.orphan_pid in orphan_run.trainer_pids
    assert len(orphan_run.trainer_pids) == 2, orphan_run.trainer_pids


def test_orphan_is_asked_to_save_and_exit(orphan_run: OrphanRun) -> None:
    """The restarted supervisor SIGTERMs the orphan, which commits an emergency checkpoint."""
    assert orphan_run.orphan_exit == EXIT_PREEMPTED, orphan_run.second_log
    journal = orphan_run.journal
    names = [e["event"] for e in journal]
    found = names.index("orphan_found")
    gone = names.index("orphan_gone")
    assert journal[found]["pid"] == orphan_run.orphan_pid
    assert found < gone
    assert "launch" not in names[found:gone], "a child was launched while the orphan lived"
    relaunch = next(e for e in journal[gone:] if e["event"] == "launch")
    # Resumed from what the orphan saved on its way out (an emergency save, or
    # the periodic one when SIGTERM landed on a save step): nothing it trained is lost.
    last_saved = max(e["step"] for e in journal[:gone] if e["event"] == "checkpoint_committed")
    assert relaunch["resume_step"] == last_saved, relaunch
    assert last_saved >= orphan_run.step_at_supervisor_kill >= KILL_SUPERVISOR_AT_STEP
    layout = orphan_run.job.layout
    record = read_model(layout.checkpoint(last_saved) / COMMIT_RECORD, CommitRecord)
    assert record is not None
    on_schedule = last_saved % STANDARD_SFT["save_steps"] == 0
    assert record.reason == ("periodic" if on_schedule else "emergency"), record
    assert not any(e["event"] == "failure" for e in journal), "an orphan hand-over is no failure"


def test_run_completes_bit_identical_after_supervisor_sigkill(
    orphan_run: OrphanRun, reference_final: Callable[..., Path]
) -> None:
    """The restarted supervisor completes the run bit-identical to an uninterrupted one."""
    assert orphan_run.second_code == 0, orphan_run.second_log
    layout = orphan_run.job.layout
    record = read_model(layout.final / COMMIT_RECORD, CommitRecord)
    assert record is not None
    assert record.step == STANDARD_SFT["max_steps"]
    assert_bit_identical(layout.final, reference_final())


def test_second_supervisor_exits_78_naming_the_first(orphan_run: OrphanRun) -> None:
    """A `trainwarden run` on a supervised output_dir exits 78 at once, naming the owner's pid."""
    assert orphan_run.probe_code == EXIT_CONFIG, orphan_run.probe_output
    assert orphan_run.probe_seconds < AT_ONCE_SECONDS
    assert f"pid {orphan_run.second_supervisor_pid}" in orphan_run.probe_output


def test_refused_supervisor_leaves_the_running_one_alone(orphan_run: OrphanRun) -> None:
    """The refused `trainwarden run` writes nothing and its rival keeps the same child."""
    assert orphan_run.events_after_probe == orphan_run.events_before_probe
    assert orphan_run.second_child_after_probe == orphan_run.second_child_before_probe
    launches = [e for e in orphan_run.journal if e["event"] == "launch"]
    assert len(launches) == 2, launches  # the first supervisor's and the restarted one's


def test_run_on_completed_output_dir_starts_nothing(
    orphan_run: OrphanRun, env: dict[str, str]
) -> None:
    """`trainwarden run` on a completed output_dir exits 0 at once, says so, launches nothing."""
    layout = orphan_run.job.layout
    launches_before = [e for e in events(layout) if e["event"] == "launch"]
    logs_before = sorted(layout.logs.iterdir())
    code, output, took = _run_cli(["run", str(orphan_run.job.path)], env)
    assert code == 0, output
    assert took < AT_ONCE_SECONDS
    assert "already complete" in output
    journal = events(layout)
    assert [e for e in journal if e["event"] == "launch"] == launches_before
    assert journal[-1]["event"] == "already_complete", journal[-1]
    assert sorted(layout.logs.iterdir()) == logs_before


WRAPPER = """#!/bin/sh
# A bring-your-own launcher: how a user's script learns where to resume from.
echo "${{TRAINWARDEN_ATTEMPT}} ${{{resume_var}}}" >> {seen}
if [ -n "${{{resume_var}}}" ]; then
    exec {python} -m trainer_child --job {job} --resume-from "${{{resume_var}}}"
fi
exec {python} -m trainer_child --job {job}
"""


def test_command_mode_resumes_from_env_after_sigkill(
    tmp_path: Path, env: dict[str, str], reference_final: Callable[..., Path]
) -> None:
    """A `command:` child killed by SIGKILL is restarted with TRAINWARDEN_RESUME_FROM set."""
    reference = reference_final()
    output_dir = tmp_path / "out"
    layout = Layout(output_dir)
    # A run that already got as far as checkpoint-8 (copied from the reference
    # run, so the job is the same): saves a whole child start-up (~10 s) over
    # training to a first commit here. A fresh start's empty value is
    # checked in tests/unit/test_loop.py.
    shutil.copytree(reference.parent / "checkpoint-8", layout.checkpoint(8))
    job_file = write_tiny_job(tmp_path / "child-job.json", output_dir, **STANDARD_SFT)
    seen_file = tmp_path / "resume-seen.txt"
    wrapper = tmp_path / "train.sh"
    wrapper.write_text(
        WRAPPER.format(
            resume_var=ENV_RESUME_FROM, seen=seen_file, python=sys.executable, job=job_file
        )
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    job = write_config(tmp_path, output_dir=output_dir, train=None, command=[str(wrapper)])

    with census(str(job_file)) as sampler, supervisor_process(job, env) as supervisor:

        def training_child() -> int | None:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(supervisor.pid).children():
                    with contextlib.suppress(psutil.Error):
                        if any("trainer_child" in part for part in child.cmdline()):
                            return child.pid
            return None

        # The wrapper has exec'd the trainer, which is importing torch by now.
        victim = wait_for(training_child, 60)
        os.kill(victim, signal.SIGKILL)
        code = supervisor.wait(240)
        log = supervisor.log()

    assert code == 0, log
    assert sampler.max_seen == 1
    resume = str(layout.checkpoint(8))
    lines = [line.split(" ", 1) for line in seen_file.read_text().splitlines()]
    assert lines == [["1", resume], ["2", resume]], lines
    journal = events(layout)
    (failure,) = [e for e in journal if e["event"] == "failure"]
    assert failure["pid"] == victim
    assert failure["kind"] == "crash"
    assert "SIGKILL" in failure["evidence"]
    launches = [e for e in journal if e["event"] == "launch"]
    assert [e["resume_step"] for e in launches] == [8, 8], launches
    assert_bit_identical(layout.final, reference)
