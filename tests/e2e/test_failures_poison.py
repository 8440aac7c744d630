"""Poisoned checkpoints: silent byte flips, and a fault that kills every attempt at one step."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.jobs import FAST_RESTART, write_config
from tests.support.outputs import assert_bit_identical, events
from tests.support.processes import wait_for
from tests.support.supervised import status_json, supervisor_process
from trainer_child.protocol import checkpoint_step

pytestmark = pytest.mark.slow

#: Attempt 1 pauses 3 s at the start of step 9; the failpoint notes its fire in
#: .warden/failpoints.json first, which is when SIGTERM is sent: it lands in step 9.
PAUSE_AT_STEP_9 = {"TRAINWARDEN_FAILPOINTS": "slow_step@step=9,seconds=3,times=1"}
_ZIP_LOCAL_HEADER = 30


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    """output_dir of a supervised standard job stopped by SIGTERM after step 9.

    It holds checkpoint-4 and -8 (periodic) and checkpoint-9 (emergency); tests
    copy it and damage the copy.
    """
    root = tmp_path_factory.mktemp("stopped-run")
    job = write_config(root, env=PAUSE_AT_STEP_9)
    with supervisor_process(job, env) as proc:
        wait_for(lambda: job.layout.failpoints.exists() or proc.proc.poll() is not None, 120)
        proc.signal(signal.SIGTERM)
        code = proc.wait(60)
        assert code == 0, proc.log()
    steps = sorted(s for p in job.output_dir.glob("checkpoint-*") if (s := checkpoint_step(p.name)))
    assert steps == [4, 8, 9], steps
    return job.output_dir


def _flip_byte(path: Path, offset: int) -> None:
    """Invert one byte in place, keeping size and timestamps: what bit rot looks like."""
    before = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size


def _flip_in_torch_tensor_data(path: Path) -> None:
    """Flip a byte inside the largest tensor payload of a torch.save zip archive."""
    with zipfile.ZipFile(path) as archive:
        tensors = [i for i in archive.infolist() if "/data/" in i.filename and i.file_size]
        member = max(tensors, key=lambda info: info.file_size)
    assert member.compress_type == zipfile.ZIP_STORED
    with open(path, "rb") as handle:
        handle.seek(member.header_offset)
        header = handle.read(_ZIP_LOCAL_HEADER)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    payload = member.header_offset + _ZIP_LOCAL_HEADER + name_length + extra_length
    _flip_byte(path, payload + member.file_size // 2)


def _flip_in_safetensors_data(path: Path) -> None:
    """Flip a byte inside the largest tensor's data of a safetensors file (header untouched)."""
    with open(path, "rb") as handle:
        (header_length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_length))
    spans = [v["data_offsets"] for k, v in header.items() if k != "__metadata__"]
    begin, end = max(spans, key=lambda span: span[1] - span[0])
    _flip_byte(path, 8 + header_length + (begin + end) // 2)


#: (file damaged, flip, what the verifier says). torch.load would not notice the
#: optimizer.pt flip: only the zip member's CRC-32 (and the record's hash) do.
DAMAGES = {
    "optimizer": ("optimizer.pt", _flip_in_torch_tensor_data, "CRC-32 mismatch"),
    "adapter": ("adapter_model.safetensors", _flip_in_safetensors_data, "hash mismatch"),
}


def test_silently_corrupted_newest_checkpoint_is_quarantined_and_the_older_one_used(
    tmp_path: Path, env: dict[str, str], reference_final: Callable[..., Path], stopped_run: Path
) -> None:
    """A flipped tensor byte in the newest checkpoint is caught before resume and quarantined."""
    jobs = {}
    for name, (filename, flip, _) in DAMAGES.items():
        out = tmp_path / name
        shutil.copytree(stopped_run, out, symlinks=True)
        flip(out / "checkpoint-9" / filename)
        jobs[name] = write_config(
            tmp_path, output_dir=out, name=f"{name}.yaml", env=PAUSE_AT_STEP_9
        )
    earlier = {name: len(events(job.layout)) for name, job in jobs.items()}
    # Each damage in its own copy, both runs at once (one core each).
    with contextlib.ExitStack() as stack:
        procs = {
            name: stack.enter_context(supervisor_process(job, env)) for name, job in jobs.items()
        }
        results = {name: (proc.wait(240), proc.log()) for name, proc in procs.items()}

    for name, (filename, _, found_by) in DAMAGES.items():
        code, log = results[name]
        job = jobs[name]
        assert code == 0, log
        journal = events(job.layout)[earlier[name] :]
        quarantined = [e for e in journal if e["event"] == "quarantined"]
        assert [e["step"] for e in quarantined] == [9], quarantined
        assert f"{filename}: {found_by}" in quarantined[0]["reason"]
        assert (job.layout.quarantine / "checkpoint-9" / filename).is_file()
        launches = [e for e in journal if e["event"] == "launch"]
        assert [e["resume_from"] for e in launches] == ["checkpoint-8"]
        assert journal.index(quarantined[0]) < journal.index(launches[0])
        assert journal[-1]["event"] == "completed"
        assert_bit_identical(job.output_dir / "final", reference_final())


def test_a_crash_at_the_same_step_every_time_falls_back_once_then_gives_up(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """A step that always crashes: fall back to the previous checkpoint once, then exit 76."""
    limit = 2
    job = write_config(
        tmp_path,
        restart={**FAST_RESTART, "no_progress_limit": limit},
        env={"TRAINWARDEN_FAILPOINTS": "crash@step=10"},
    )
    with supervisor_process(job, env) as proc:
        code = proc.wait(300)
        log = proc.log()

    assert code == 76, log
    journal = events(job.layout)
    launches = [e for e in journal if e["event"] == "launch"]
    assert len(launches) == limit + 1
    assert [e["resume_from"] for e in launches] == [None, "checkpoint-8", "checkpoint-4"]
    fallback = [e for e in journal if e["event"] == "fallback"]
    assert len(fallback) == 1
    assert (fallback[0]["from_step"], fallback[0]["to_step"]) == (8, 4)
    quarantined = [e for e in journal if e["event"] == "quarantined"]
    assert [e["step"] for e in quarantined] == [8]
    assert (job.layout.quarantine / "checkpoint-8").is_dir()
    failures = [e for e in journal if e["event"] == "failure"]
    assert [e["kind"] for e in failures] == ["crash"] * (limit + 1)
    assert {e["step"] for e in failures} == {9}
    gave_up = journal[-1]
    assert gave_up["event"] == "gave_up"
    assert gave_up["kind"] == "no_progress"

    message = " ".join(log.split())  # the console wraps long lines
    assert "trainwarden gave up: no progress" in message
    assert "last failure at step 9" in message
    assert "RuntimeError: trainwarden failpoint crash at step 10" in message

    report = status_json(job.output_dir, env)
    assert report["state"] == "gave up"
    assert report["restarts_by_kind"] == {"crash": limit + 1}
    assert report["last_failure"]["step"] == 9
    assert "trainwarden failpoint crash at step 10" in report["last_failure"]["evidence"]
