"""Out-of-memory failures: a real kernel OOM kill, and a CUDA OOM raised by a failpoint.

Both end with the same remediation: the micro-batch is halved and gradient
accumulation doubled, so the effective batch and the number of optimizer steps
stay what the job asked for.

The jobs here train without dropout. Dropout masks are drawn per micro-batch, so
a halved micro-batch draws different ones: with GPT-2's default 0.1 and LoRA's
0.05 the halved run ends 2.4e-2 (max abs) away from the uninterrupted one,
measured, for reasons unrelated to recovery. Without dropout the two micro-batch
layouts give gradients that agree to ~3e-9, and the 1e-3 bar measures the
remediation alone.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.shell.oom import cgroup_of
from tests.support.capabilities import require
from tests.support.jobs import FAST_RESTART, STANDARD_SFT, trainer_child_argv, write_config
from tests.support.outputs import events, heartbeat, max_abs_diff
from tests.support.processes import Process, wait_for
from tests.support.supervised import status_json, supervisor_process
from trainer_child.protocol import COMMIT_RECORD, CommitRecord, JobFile, read_model

pytestmark = pytest.mark.slow

V1_MEMORY = Path("/sys/fs/cgroup/memory")
#: Far below what the child needs once torch and transformers are imported
#: (~500 MiB RSS here), far above what the supervisor needs (~60 MiB).
CHILD_LIMIT_BYTES = 192 << 20
#: Same effective batch, twice the accumulation: the OOM remediation's promise.
HALVED = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 2}
#: The standard job with every dropout off (base GPT-2 and LoRA); see the docstring.
NO_DROPOUT_TRAIN: dict[str, Any] = {
    "sft": {
        **STANDARD_SFT,
        "model_init_kwargs": {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
    },
    "lora": {"dropout": 0.0},
}


class BackgroundReference:
    """An uninterrupted, unsupervised run of the dropout-free job, training meanwhile."""

    def __init__(self, child: Process, final: Path) -> None:
        self.child = child
        self.path = final

    def final(self) -> Path:
        """Wait for the run and return its final/ (its commit record checked)."""
        code = self.child.wait(300)
        assert code == 0, self.child.log()
        record = read_model(self.path / COMMIT_RECORD, CommitRecord)
        assert record is not None, self.child.log()
        assert record.reason == "final"
        return self.path


@pytest.fixture(scope="module")
def no_dropout_reference(
    tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]
) -> Iterator[BackgroundReference]:
    """Start the reference run at once, on the second core, while the first test runs."""
    root = tmp_path_factory.mktemp("no-dropout-reference")
    job = JobFile.model_validate({"output_dir": str(root / "out"), "train": NO_DROPOUT_TRAIN})
    path = root / "job.json"
    path.write_text(job.model_dump_json())
    child = Process(trainer_child_argv(path), env, root / "child.log")
    try:
        yield BackgroundReference(child, root / "out" / "final")
    finally:
        child.close()


def _own_memory_cgroup() -> Path:
    """This process's v1 memory cgroup directory (the hierarchy root if it cannot be found)."""
    ref = cgroup_of(os.getpid())
    if ref is not None and ref.version == 1:
        candidate = V1_MEMORY / ref.path.lstrip("/")
        if (candidate / "cgroup.procs").exists():
            return candidate
    return V1_MEMORY


@pytest.fixture
def memory_cgroup() -> Iterator[Path]:
    """A fresh v1 memory cgroup limited to CHILD_LIMIT_BYTES; removed at teardown."""
    require("root", "cgroup-v1-memory")
    path = V1_MEMORY / f"tw-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        (path / "memory.limit_in_bytes").write_text(str(CHILD_LIMIT_BYTES))
        memsw = path / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            memsw.write_text(str(CHILD_LIMIT_BYTES))
        yield path
    finally:
        deadline = time.monotonic() + 10
        while True:
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                # EBUSY while a killed task is still being detached from the cgroup.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _oom_kills(cgroup: Path) -> int:
    for line in (cgroup / "memory.oom_control").read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == "oom_kill":
            return int(value)
    raise AssertionError(f"{cgroup}/memory.oom_control has no oom_kill counter (kernel < 4.13)")


def _records(output_dir: Path) -> dict[str, CommitRecord]:
    """Commit records of every checkpoint left and of final/, by folder name."""
    found = {}
    for folder in [*output_dir.glob("checkpoint-*"), output_dir / "final"]:
        record = read_model(folder / COMMIT_RECORD, CommitRecord)
        if record is not None:
            found[folder.name] = record
    return found


@pytest.mark.system
@pytest.mark.serial
@pytest.mark.parametrize("standby", ["off", "auto"])
def test_kernel_oom_kill_is_host_oom_and_halves_the_micro_batch(
    tmp_path: Path,
    env: dict[str, str],
    memory_cgroup: Path,
    no_dropout_reference: BackgroundReference,
    standby: str,
) -> None:
    """A real cgroup OOM kill is host_oom by the cgroup counter; the halved retry completes.

    With ``standby: auto`` the halved attempt still starts cold: inside the small
    cgroup no standby fits (auto's memory rule), and one prepared for the old
    micro-batch would not match the new key.
    """
    job = write_config(
        tmp_path, train=NO_DROPOUT_TRAIN, restart={**FAST_RESTART, "standby": standby}
    )
    # The supervisor starts inside the limited cgroup, so its first child is born
    # there (and OomWatch's snapshot at spawn sees that cgroup's counter); as soon
    # as the child's first heartbeat names it, the supervisor is moved back out,
    # so every later attempt is born outside the limit.
    join = f'echo $$ > {memory_cgroup}/cgroup.procs && exec "$@"'
    home = _own_memory_cgroup()
    with supervisor_process(job, env, wrap=lambda argv: ["sh", "-c", join, "sh", *argv]) as proc:
        beat = wait_for(lambda: heartbeat(job.layout) or proc.proc.poll() is not None, 60)
        assert beat is not True, proc.log()
        (home / "cgroup.procs").write_text(str(proc.pid))
        first_child = beat.pid
        child_cgroup = cgroup_of(first_child)
        assert child_cgroup is None or child_cgroup.path.endswith(memory_cgroup.name)
        code = proc.wait(240)
        log = proc.log()

    assert code == 0, log
    assert _oom_kills(memory_cgroup) >= 1
    journal = events(job.layout)
    failures = [e for e in journal if e["event"] == "failure"]
    assert len(failures) == 1, failures
    failure = failures[0]
    assert failure["kind"] == "host_oom"
    assert failure["pid"] == first_child
    assert failure["signal"] == 9
    assert "cgroup oom_kill counter rose" in failure["evidence"]
    remedy = next(e for e in journal if e["event"] == "remediation")
    assert remedy["per_device_train_batch_size"] == [2, 1]
    assert remedy["gradient_accumulation_steps"] == [1, 2]
    launches = [e for e in journal if e["event"] == "launch"]
    assert len(launches) == 2
    assert {k: launches[1][k] for k in HALVED} == HALVED
    started = [e for e in journal if e["event"] == "child_started"]
    assert [e["start"] for e in started] == ["cold", "cold"], started
    if standby == "auto":
        # Born in the 192 MiB cgroup, the supervisor kept no standby (auto's memory
        # rule); had it kept one, it would have been for the old micro-batch.
        why = started[1]["why"]
        assert "MiB of host memory available" in why or "other settings" in why, started

    report = status_json(job.output_dir, env)
    assert report["restarts_by_kind"] == {"host_oom": 1}, report
    last = report["last_failure"]
    assert isinstance(last, dict)
    assert last["kind"] == "host_oom"
    assert "cgroup oom_kill counter rose" in str(last["evidence"])

    final = _records(job.output_dir)["final"]
    assert final.step == STANDARD_SFT["max_steps"]
    assert {k: getattr(final, k) for k in HALVED} == HALVED
    diff = max_abs_diff(job.output_dir / "final", no_dropout_reference.final())
    print(f"host_oom: evidence={failure['evidence']!r} max_abs_diff={diff:.2e}")
    assert diff < 1e-3


def test_cuda_oom_halves_the_micro_batch_and_keeps_the_step_count(
    tmp_path: Path, env: dict[str, str], no_dropout_reference: BackgroundReference
) -> None:
    """CUDA OOM (a failpoint: no GPU here): half micro-batch, same steps, weights within 1e-3."""
    job = write_config(
        tmp_path,
        train=NO_DROPOUT_TRAIN,
        env={"TRAINWARDEN_FAILPOINTS": "cuda_oom@step=6,times=1"},
    )
    with supervisor_process(job, env) as proc:
        code = proc.wait(240)
        log = proc.log()

    assert code == 0, log
    journal = events(job.layout)
    failure = next(e for e in journal if e["event"] == "failure")
    assert failure["kind"] == "cuda_oom"
    assert "OutOfMemoryError" in failure["evidence"]
    remedy = next(e for e in journal if e["event"] == "remediation")
    assert remedy["kind"] == "cuda_oom"
    assert remedy["per_device_train_batch_size"] == [2, 1]
    assert remedy["gradient_accumulation_steps"] == [1, 2]
    launches = [e for e in journal if e["event"] == "launch"]
    assert len(launches) == 2
    assert launches[1]["resume_from"] == "checkpoint-4"
    assert {k: launches[1][k] for k in HALVED} == HALVED

    records = _records(job.output_dir)
    after_restart = {name: r for name, r in records.items() if r.attempt == 2}
    assert "final" in after_restart
    assert len(after_restart) >= 2, records
    for name, record in after_restart.items():
        assert {k: getattr(record, k) for k in HALVED} == HALVED, name
    reference = read_model(no_dropout_reference.final() / COMMIT_RECORD, CommitRecord)
    assert reference is not None
    assert records["final"].step == reference.step == STANDARD_SFT["max_steps"]
    diff = max_abs_diff(job.output_dir / "final", no_dropout_reference.final())
    print(f"cuda_oom: max_abs_diff={diff:.2e}")
    assert diff < 1e-3
