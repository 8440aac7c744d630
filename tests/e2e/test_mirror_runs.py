"""Whole supervised runs with a ``mirror:`` on a real S3 server: the machine goes, the run stays.

Nothing is mocked: SeaweedFS serves S3 on loopback (started and stopped by PID),
the supervisor talks to it through s3fs, the child trains the built-in tiny job,
signals are real, the outage is the server killed and started again, and the
slow upload goes through a real TCP link throttled to a few KiB/s
(``tests/support/slow_link.py``). One SIGTERMed run is shared by two tests: the
machine lost (restore, finish, bit-identical) and a flipped byte in a copy of
its remote (caught, an older checkpoint used).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from supervisor.shell.mirror import RemoteStatus, RemoteStore
from tests.support.checkpoints import ADAPTER
from tests.support.jobs import Job, supervisor_argv, write_config
from tests.support.outputs import assert_bit_identical, events
from tests.support.processes import REPO_ROOT, wait_for
from tests.support.seaweed import BUCKET, SECRET_KEY, SeaweedS3, free_ports, running_seaweed
from tests.support.slow_link import slow_link
from tests.support.supervised import status_json, supervisor_process
from trainer_child.protocol import COMMIT_RECORD, CommitRecord, Layout, RunStateFile, read_model

pytestmark = pytest.mark.slow

#: The uplink of the machine that is killed mid-upload: a checkpoint (~80 KiB) takes seconds.
SLOW_UPLINK = 16 * 1024
WIDE = {"COLUMNS": "240"}


# --- helpers ---------------------------------------------------------------------------------


def unique_prefix() -> str:
    return uuid.uuid4().hex[:12]


def mirror_section(
    server: SeaweedS3, prefix: str, *, endpoint: str | None = None, **extra: Any
) -> dict[str, Any]:
    """A job file's ``mirror:`` for ``s3://runs/PREFIX`` on ``server`` (or through ``endpoint``)."""
    options = server.storage_options()
    if endpoint is not None:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return {"url": f"s3://{BUCKET}/{prefix}", "storage_options": options, **extra}


def remote(server: SeaweedS3, prefix: str) -> RemoteStore:
    """The test's own view of the remote prefix (straight to the server)."""
    return RemoteStore(f"s3://{BUCKET}/{prefix}", server.storage_options())


def named(layout: Layout, name: str) -> list[dict[str, Any]]:
    return [e for e in events(layout) if e["event"] == name]


def only(layout: Layout, name: str) -> dict[str, Any]:
    found = named(layout, name)
    assert len(found) == 1, f"{name}: {found}\n{events(layout)}"
    return found[0]


def uploaded(layout: Layout, step: int) -> Callable[[], bool]:
    """The journal says checkpoint-N is remote-valid."""
    return lambda: any(e.get("step") == step for e in named(layout, "mirror_uploaded"))


def run_to_end(job: Job, env: dict[str, str], timeout: float = 240) -> str:
    with supervisor_process(job, env) as proc:
        code = proc.wait(timeout)
        log = proc.log()
    assert code == 0, log
    return log


def copy_prefix(server: SeaweedS3, source: str, target: str) -> None:
    """Copy every object of a remote prefix, byte for byte (a second remote to damage)."""
    store = remote(server, source)
    for path in store.fs.find(store.root):
        relative = path[len(store.root) + 1 :]
        store.fs.pipe_file(f"{BUCKET}/{target}/{relative}", store.fs.cat_file(path))


def flip_remote_byte(store: RemoteStore, relpath: str, offset: int) -> None:
    path = f"{store.root}/{relpath}"
    data = bytearray(store.fs.cat_file(path))
    data[offset] ^= 0xFF
    store.fs.pipe_file(path, bytes(data))


def assert_no_secret_under(folder: Path, *texts: str) -> None:
    """No file below ``folder`` and no text given holds the secret key."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert SECRET_KEY.encode() not in path.read_bytes(), f"secret written to {path}"
    for text in texts:
        assert SECRET_KEY not in text


# --- one run preempted by SIGTERM, shared -------------------------------------------------


@dataclass(frozen=True)
class Preempted:
    """A run SIGTERMed at step 6 with a mirror, and a pristine copy of its remote."""

    job: Job
    prefix: str
    copy: str
    emergency: int
    log: str


@pytest.fixture(scope="module")
def preempted(
    tmp_path_factory: pytest.TempPathFactory, env: dict[str, str], seaweed: SeaweedS3
) -> Preempted:
    root = tmp_path_factory.mktemp("machine-1")
    prefix = unique_prefix()
    job = write_config(
        root,
        preemption={"grace": "60s"},
        mirror=mirror_section(seaweed, prefix),
        # Step 6 starts with a 3 s pause in which SIGTERM lands.
        env={"TRAINWARDEN_FAILPOINTS": "slow_step@step=6,seconds=3,times=1"},
    )
    with supervisor_process(job, env) as proc:
        wait_for(
            lambda: job.layout.failpoints.exists() or proc.poll() is not None,
            180,
            what="step 6 to begin",
        )
        proc.signal(signal.SIGTERM)
        code = proc.wait(120)
        log = proc.log()
    assert code == 0, log
    records = {
        step: read_model(job.output_dir / f"checkpoint-{step}" / COMMIT_RECORD, CommitRecord)
        for step in (4, 5, 6, 7)
    }
    emergency = [s for s, r in records.items() if r is not None and r.reason == "emergency"]
    assert len(emergency) == 1, records
    copy = unique_prefix()
    copy_prefix(seaweed, prefix, copy)
    return Preempted(job, prefix, copy, emergency[0], log)


def test_machine_lost_after_sigterm_restores_from_s3_and_finishes_bit_identical(
    preempted: Preempted,
    env: dict[str, str],
    seaweed: SeaweedS3,
    reference_final: Callable[..., Path],
) -> None:
    """SIGTERM: the emergency checkpoint goes remote; a new empty machine finishes the run."""
    job, emergency = preempted.job, preempted.emergency
    drained = only(job.layout, "mirror_drained")
    assert drained["complete"] is True, drained
    assert drained["step"] == drained["newest_local"] == emergency
    assert drained["newest_is_remote"] is True
    assert drained["mode"] == "preempted"
    assert remote(seaweed, preempted.prefix).inventory().newest_valid() == emergency
    assert_no_secret_under(job.output_dir, preempted.log)

    # The machine is gone, disk and all; a new one runs the same job file.
    shutil.rmtree(job.output_dir)
    again = write_config(
        job.path.parent,
        name="machine-2.yaml",
        output_dir=job.output_dir,
        mirror=mirror_section(seaweed, preempted.prefix),
    )
    log = run_to_end(again, env)
    restored = only(again.layout, "mirror_restored")
    assert restored["downloaded"] == emergency
    assert restored["state_restored"] is True
    (launch,) = named(again.layout, "launch")
    assert launch["resume_from"] == f"checkpoint-{emergency}"
    assert not named(again.layout, "failure")
    assert_bit_identical(again.output_dir / "final", reference_final())
    assert only(again.layout, "mirror_drained")["complete"] is True
    assert remote(seaweed, preempted.prefix).inventory().final_complete
    assert_no_secret_under(again.output_dir, log)

    # And a third machine finds the run complete remotely: complete here too, nothing trained.
    shutil.rmtree(again.output_dir)
    run_to_end(again, env)
    assert only(again.layout, "mirror_restored")["final_restored"] is True
    assert named(again.layout, "already_complete")
    assert not named(again.layout, "launch")
    assert_bit_identical(again.output_dir / "final", reference_final())


def test_a_flipped_remote_byte_is_caught_at_restore_and_an_older_checkpoint_used(
    preempted: Preempted,
    env: dict[str, str],
    seaweed: SeaweedS3,
    reference_final: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """Bit rot in the newest remote checkpoint: quarantined remotely, the older one restored."""
    store = remote(seaweed, preempted.copy)
    emergency = preempted.emergency
    valid = store.inventory().valid_steps()
    older = max(step for step in valid if step < emergency)
    name = f"checkpoint-{emergency}"
    header = int.from_bytes(
        store.fs.cat_file(f"{store.root}/{name}/{ADAPTER}", start=0, end=8), "little"
    )
    flip_remote_byte(store, f"{name}/{ADAPTER}", 8 + header + 5)
    # Sizes still match: only a hash, read on download, can tell.
    assert store.inventory().get(emergency).status is RemoteStatus.VALID  # type: ignore[union-attr]

    job = write_config(tmp_path, mirror=mirror_section(seaweed, preempted.copy))
    run_to_end(job, env)
    restored = only(job.layout, "mirror_restored")
    (rejected,) = restored["rejected"]
    assert rejected["step"] == emergency
    assert "hash mismatch" in rejected["why"]
    assert restored["downloaded"] == older
    (launch,) = named(job.layout, "launch")
    assert launch["resume_from"] == f"checkpoint-{older}"
    assert_bit_identical(job.output_dir / "final", reference_final())
    assert name in store.inventory().quarantined


# --- the supervisor killed in the middle of an upload ------------------------------------------


def partial_upload(store: RemoteStore, after: int) -> int | None:
    """A remote checkpoint newer than ``after`` with bytes but no record: an upload under way."""
    for entry in store.inventory().checkpoints:
        if entry.step > after and entry.status is RemoteStatus.NO_RECORD and entry.size_bytes:
            return entry.step
    return None


def test_supervisor_killed_mid_upload_resumes_from_the_newest_complete_remote_checkpoint(
    tmp_path: Path, env: dict[str, str], seaweed: SeaweedS3, reference_final: Callable[..., Path]
) -> None:
    """SIGKILL mid-upload, disk lost: restore takes the newest valid copy, never the partial."""
    prefix = unique_prefix()
    store = remote(seaweed, prefix)
    (port,) = free_ports(1)
    with slow_link(port, seaweed.ports["s3"], SLOW_UPLINK, tmp_path / "link.log"):
        job = write_config(
            tmp_path,
            mirror=mirror_section(
                seaweed, prefix, endpoint=f"http://127.0.0.1:{port}", upload_concurrency=1
            ),
            env={"TRAINWARDEN_FAILPOINTS": "slow_step@step=5,seconds=1"},
        )
        with supervisor_process(job, env) as proc:
            wait_for(uploaded(job.layout, 4), 180, what="checkpoint-4 to be remote")
            partial = wait_for(
                lambda: partial_upload(store, 4) or proc.poll() is not None,
                120,
                interval=0.1,
                what="an upload under way",
            )
            assert proc.poll() is None, proc.log()
            # The machine is lost: supervisor and child SIGKILLed, by pid, at once.
            proc.close()
    newest_valid = store.inventory().newest_valid()
    assert newest_valid is not None
    assert partial > newest_valid

    shutil.rmtree(job.output_dir)
    again = write_config(
        tmp_path,
        name="machine-2.yaml",
        output_dir=job.output_dir,
        mirror=mirror_section(seaweed, prefix),
    )
    run_to_end(again, env)
    restored = only(again.layout, "mirror_restored")
    assert restored["downloaded"] == newest_valid
    (launch,) = named(again.layout, "launch")
    assert launch["resume_from"] == f"checkpoint-{newest_valid}"
    # The record-less leftover is cleaned up by the prune queued at start.
    pruned = named(again.layout, "mirror_pruned")
    assert any(partial in e["partial_removed"] for e in pruned), pruned
    assert_bit_identical(again.output_dir / "final", reference_final())
    assert store.inventory().final_complete


# --- storage down for a while -----------------------------------------------------------------


def lagging(layout: Layout) -> RunStateFile | None:
    state = read_model(layout.state, RunStateFile)
    if state and state.mirror_lag and "retrying" in (state.mirror_status or ""):
        return state
    return None


def test_storage_outage_training_goes_on_status_shows_the_lag_and_uploads_catch_up(
    tmp_path: Path, env: dict[str, str], reference_final: Callable[..., Path]
) -> None:
    """S3 killed mid-run: no failure, `status` shows the lag, all lands once the server is back."""
    with running_seaweed(tmp_path / "s3") as server:
        prefix = unique_prefix()
        job = write_config(
            tmp_path,
            mirror=mirror_section(server, prefix),
            env={"TRAINWARDEN_FAILPOINTS": "slow_step@step=5,seconds=0.5"},
        )
        with supervisor_process(job, env) as proc:
            wait_for(uploaded(job.layout, 4), 180, what="checkpoint-4 to be remote")
            server.kill()
            down_at = time.time()
            wait_for(lambda: lagging(job.layout), 60, what="state.json to show the lag")
            report = status_json(job.output_dir, env)
            server.start()
            up_at = time.time()
            code = proc.wait(240)
            log = proc.log()
        assert code == 0, log
        assert report["mirror_lag"] >= 1, report
        assert "behind, retrying in" in report["mirror"], report

        journal = events(job.layout)
        assert not [e for e in journal if e["event"] == "failure"]
        commits_while_down = [
            e for e in journal if e["event"] == "checkpoint_committed" and down_at < e["ts"] < up_at
        ]
        assert commits_while_down, "training stopped while storage was down"
        assert named(job.layout, "mirror_retrying")
        assert named(job.layout, "mirror_recovered")
        drained = only(job.layout, "mirror_drained")
        assert drained["complete"] is True
        assert drained["step"] == 16
        inventory = remote(server, prefix).inventory()
        assert inventory.newest_valid() == 16
        assert inventory.final_complete
        assert_bit_identical(job.output_dir / "final", reference_final())
        state = read_model(job.layout.state, RunStateFile)
        assert state is not None
        assert state.mirror_lag == 0


# --- a mirror that cannot be used ----------------------------------------------------------------


def test_wrong_bucket_or_bad_credentials_exit_78_at_start_naming_the_url(
    tmp_path: Path, env: dict[str, str], seaweed: SeaweedS3
) -> None:
    """Refused at start with exit 78: the message names the URL, never a secret; nothing created."""
    bad_secret = "wrong-secret-abcdefghijklmnop"
    cases = {
        "wrong-bucket": mirror_section(seaweed, unique_prefix())
        | {"url": f"s3://no-such-bucket-{unique_prefix()}/run"},
        "bad-secret": mirror_section(seaweed, unique_prefix())
        | {"storage_options": seaweed.storage_options(secret=bad_secret)},
    }
    for name, mirror in cases.items():
        job = write_config(tmp_path, name=f"{name}.yaml", output_dir=tmp_path / name, mirror=mirror)
        done = subprocess.run(
            supervisor_argv(job.path),
            cwd=REPO_ROOT,
            env={**env, **WIDE},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        said = " ".join((done.stdout + done.stderr).split())
        assert done.returncode == 78, said
        assert mirror["url"] in said, said
        assert "probe" in said
        for secret in (SECRET_KEY, bad_secret):
            assert secret not in said
        assert not job.output_dir.exists(), "a refused mirror must leave nothing behind"
