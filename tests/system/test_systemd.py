"""Real systemd, booted as PID 1 of a throwaway namespace, running our units.

One systemd per module (it boots in about 0.3 s, see the harness). The first
group drives a tiny Type=notify service (notify_service.py, speaking through
SystemdNotifier) to prove the harness and the notifier against the real
manager. The second drives the SHIPPED ``systemd/trainwarden@.service`` and the
real ``trainwarden run``, with a drop-in that changes only where the binary and
its interpreter live and shortens WatchdogSec=. Every child start costs ~20 s of
torch imports on 2 cores, so each real-run test chains several scenarios on one
run; the whole file takes about two minutes.
"""

from __future__ import annotations

import fcntl
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.capabilities import require
from tests.system.systemd_harness import (
    FAKE_NVIDIA_NODES,
    FORBIDDEN_NODE,
    SERVICE_USER,
    NamespacedSystemd,
)

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "tests" / "system" / "notify_service.py"
SHIPPED_UNIT = REPO / "systemd" / "trainwarden@.service"
PYTHON = sys.executable


@pytest.fixture(scope="module")
def systemd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NamespacedSystemd]:
    """Boot one namespaced systemd for the module; SIGKILL its PID 1 at the end."""
    require("systemd")
    manager = NamespacedSystemd(
        tmp_path_factory.mktemp("systemd-ns"), shared=tmp_path_factory.getbasetemp()
    )
    try:
        manager.boot()
        print(f"namespaced systemd booted in {manager.boot_seconds:.2f}s")
        yield manager
    finally:
        manager.shutdown()


def _records(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stop(systemd: NamespacedSystemd, unit: str) -> None:
    """Stop a unit and forget its failure, so the next test starts clean."""
    # Up to TimeoutStopSec= (180 s) if a child ignores SIGTERM.
    systemd.systemctl("stop", unit, check=False, timeout=200)
    systemd.systemctl("reset-failed", unit, check=False)


def _install_probe(
    systemd: NamespacedSystemd, unit: str, record: Path, args: str, extra: str = ""
) -> None:
    systemd.install(
        unit,
        f"""[Unit]
Description=notify probe {unit}

[Service]
Type=notify
NotifyAccess=main
ExecStart={PYTHON} {PROBE} --record {record} {args}
Restart=on-failure
RestartSec=200ms
RestartPreventExitStatus=76 78
TimeoutStartSec=20s
{extra}
""",
    )
    systemd.daemon_reload()


# --------------------------------------------------------- the harness, a dummy
def test_notify_service_is_active_only_after_ready(
    systemd: NamespacedSystemd, tmp_path: Path
) -> None:
    """Type=notify: the unit stays 'activating' until READY=1 and turns active right after."""
    unit = "probe-ready.service"
    record = tmp_path / "record.jsonl"
    _install_probe(systemd, unit, record, "--ready-after 1.5")
    try:
        systemd.systemctl("start", "--no-block", unit)
        early = systemd.wait_for(unit, lambda s: s["MainPID"] != "0", timeout=10)
        assert early["ActiveState"] == "activating"
        assert early["SubState"] == "start"
        systemd.wait_for(unit, lambda s: s["ActiveState"] == "active", timeout=15)
        times = systemd.show(
            unit, "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic"
        )
        ready = next(r for r in _records(record) if r["event"] == "ready")
        active_at = int(times["ActiveEnterTimestampMonotonic"]) / 1e6
        started_at = int(times["ExecMainStartTimestampMonotonic"]) / 1e6
        assert isinstance(ready["t"], float)
        assert active_at >= ready["t"], "active before the service said READY=1"
        assert active_at - started_at >= 1.4
    finally:
        _stop(systemd, unit)


def test_status_text_reaches_systemctl(systemd: NamespacedSystemd, tmp_path: Path) -> None:
    """STATUS= lines show up as StatusText (what `systemctl status` prints)."""
    unit = "probe-status.service"
    _install_probe(systemd, unit, tmp_path / "r.jsonl", "--status 'step 3/40'")
    try:
        systemd.systemctl("start", unit)
        state = systemd.wait_for(
            unit, lambda s: s["StatusText"].startswith("step 3/40 tick"), timeout=10
        )
        assert state["ActiveState"] == "active"
    finally:
        _stop(systemd, unit)


def test_watchdog_kills_and_restarts_a_stopped_service(
    systemd: NamespacedSystemd, tmp_path: Path
) -> None:
    """A SIGSTOPped service stops pinging WATCHDOG=1; systemd kills and restarts it."""
    unit = "probe-watchdog.service"
    record = tmp_path / "record.jsonl"
    _install_probe(systemd, unit, record, "", extra="WatchdogSec=2s")
    try:
        systemd.systemctl("start", unit)
        first = systemd.wait_for(unit, lambda s: s["ActiveState"] == "active", timeout=10)
        started = next(r for r in _records(record) if r["event"] == "started")
        assert started["watchdog"] == 1.0, "the notifier pings at half of WatchdogSec"
        frozen_pid = systemd.host_pid(int(first["MainPID"]))
        stopped_at = time.monotonic()
        systemd.run(["kill", "-STOP", first["MainPID"]])
        after = systemd.wait_for(
            unit,
            lambda s: s["NRestarts"] == "1" and s["ActiveState"] == "active",
            timeout=15,
        )
        elapsed = time.monotonic() - stopped_at
        assert after["MainPID"] != first["MainPID"]
        assert elapsed >= 1.5, "killed before the watchdog period ran out"
        assert not Path(f"/proc/{frozen_pid}").exists(), "the frozen process survived"
        assert "Watchdog timeout" in systemd.log_tail(400)
    finally:
        _stop(systemd, unit)


@pytest.mark.parametrize("code", [76, 78])
def test_prevented_exit_status_fails_without_restart(
    systemd: NamespacedSystemd, tmp_path: Path, code: int
) -> None:
    """Exit 76 (gave up) or 78 (bad config) leaves the unit failed, never restarted."""
    unit = f"probe-exit{code}.service"
    record = tmp_path / "record.jsonl"
    _install_probe(systemd, unit, record, f"--exit-after-ready {code}")
    try:
        systemd.systemctl("start", "--no-block", unit)
        state = systemd.wait_for(unit, lambda s: s["ActiveState"] == "failed", timeout=10)
        assert state["ExecMainStatus"] == str(code)
        assert state["Result"] == "exit-code"
        time.sleep(1.0)  # five RestartSec periods: a restart would have happened by now
        state = systemd.show(unit, "ActiveState", "NRestarts")
        assert state == {"ActiveState": "failed", "NRestarts": "0"}
        assert sum(r["event"] == "started" for r in _records(record)) == 1
    finally:
        _stop(systemd, unit)


def test_other_failures_are_restarted(systemd: NamespacedSystemd, tmp_path: Path) -> None:
    """Exit 1 is restarted, so the previous test's "no restart" is RestartPreventExitStatus=."""
    unit = "probe-exit1.service"
    _install_probe(systemd, unit, tmp_path / "r.jsonl", "--exit-after-ready 1")
    try:
        systemd.systemctl("start", "--no-block", unit)
        systemd.wait_for(unit, lambda s: int(s["NRestarts"] or 0) >= 1, timeout=10)
    finally:
        _stop(systemd, unit)


# ------------------------------------------------------------ the shipped unit
TRAINWARDEN = Path(PYTHON).with_name("trainwarden")
# Short enough to see within a test, long enough for a loaded 2-core CI box
# (the supervisor's loop pings every tick, 0.25 s).
TEST_WATCHDOG = "4s"
# The training child spends most of its start importing torch/transformers:
# about 20 s on 2 cores.
RUN_TIMEOUT = 150.0
JOB = """output_dir: run
restart: {{backoff_initial: 1s, backoff_max: 2s}}
train:
  model: builtin:tiny-gpt2
  dataset: builtin:tiny
  sft: {{max_steps: {max_steps}, save_steps: 5, per_device_train_batch_size: 2, seed: 0}}
"""


def _trees_under_home() -> list[Path]:
    """Return the folders the service must see that ProtectHome= would hide.

    ProtectHome= hides /root and /home. On this machine the venv's python is a
    symlink into /root/.pyenv, and a user's first clone (with its .venv and the
    source the editable install points at) usually lives in their home: the
    drop-in shows exactly those trees again, read-only, as a user with a venv
    in their home would (docs/service.md).
    """
    trees: list[Path] = []
    for candidate in (Path(sys.base_prefix).resolve(), REPO.resolve()):
        if any(candidate.is_relative_to(home) for home in (Path("/root"), Path("/home"))):
            trees.append(candidate)
    return [t for t in trees if not any(t != o and t.is_relative_to(o) for o in trees)]


def _trainwarden_cli_reason() -> str | None:
    if not TRAINWARDEN.exists():
        return f"{TRAINWARDEN} is not installed (pip install -e .)"
    probe = subprocess.run(
        [str(TRAINWARDEN), "run", "--help"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        return f"`trainwarden run --help` fails: {probe.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def shipped(systemd: NamespacedSystemd) -> NamespacedSystemd:
    """Install systemd/trainwarden@.service as shipped, plus this machine's drop-in.

    The drop-in changes only where the binary and its interpreter live, and
    shortens WatchdogSec=. Outputs go where the shipped unit puts them: the job
    files say ``output_dir: run``, relative to WorkingDirectory=, i.e. inside
    StateDirectory= /var/lib/trainwarden/NAME.
    """
    reason = _trainwarden_cli_reason()
    if reason is not None:
        pytest.fail(reason)
    systemd.install("trainwarden@.service", SHIPPED_UNIT.read_text())
    bind = ""
    trees = _trees_under_home()
    if trees:
        # Not a relaxation: /root stays an empty tmpfs except these read-only trees.
        bind = f"ProtectHome=tmpfs\nBindReadOnlyPaths={' '.join(map(str, trees))}\n"
    systemd.drop_in(
        "trainwarden@.service",
        "10-test",
        f"""[Service]
ExecStart=
ExecStart={TRAINWARDEN} run /etc/trainwarden/%i.yaml
WatchdogSec={TEST_WATCHDOG}
{bind}""",
    )
    systemd.daemon_reload()
    return systemd


def test_shipped_unit_sandbox_still_reaches_the_gpu_nodes(shipped: NamespacedSystemd) -> None:
    """Under the shipped hardening the job opens /dev/nvidia* and nothing else.

    The harness's /dev holds fake NVIDIA nodes with no driver behind them: ENXIO
    means the device cgroup let the open through, EPERM that it refused it. The
    probe (run in place of the supervisor by an instance drop-in) also reports
    who it runs as and what it may write.
    """
    unit = "trainwarden@probe.service"
    state_dir = "/var/lib/trainwarden/probe"
    devices = [*FAKE_NVIDIA_NODES, FORBIDDEN_NODE[0], "null"]
    writable = [state_dir, "/var/cache/trainwarden", "/etc", "/work", "/var/lib", "/tmp"]
    shipped.drop_in(
        unit,
        "20-probe",
        f"""[Service]
ExecStart=
ExecStart={PYTHON} {PROBE} --record {state_dir}/record.jsonl --exit-after-ready 0 \
  --probe-devices {" ".join(devices)} --probe-writable {" ".join(writable)}
""",
    )
    shipped.daemon_reload()
    try:
        shipped.systemctl("start", unit)
        shipped.wait_for(unit, lambda s: s["ActiveState"] in ("inactive", "failed"), timeout=15)
        records = _records(shipped.path(f"{state_dir}/record.jsonl"))
        probe = next(r for r in records if r["event"] == "probe")
    finally:
        _stop(shipped, unit)
    assert probe["uid"] == shipped.service_uid, f"not running as {SERVICE_USER}"
    assert probe["devices"] == {
        "nvidiactl": "ENXIO",
        "nvidia-modeset": "ENXIO",
        "nvidia-uvm": "ENXIO",
        "nvidia-uvm-tools": "ENXIO",
        # /dev/nvidiaN are allowed by driver major (char-nvidia-frontend or
        # char-nvidia), which exists only where the driver is loaded.
        "nvidia0": "EPERM",
        FORBIDDEN_NODE[0]: "EPERM",
        "null": "ok",
    }
    assert probe["cwd"] == state_dir
    assert probe["hf_home"] == "/var/cache/trainwarden/huggingface"
    assert probe["writable"] == {
        state_dir: True,
        "/var/cache/trainwarden": True,
        "/etc": False,
        "/work": False,
        "/var/lib": False,
        "/tmp": True,  # its own PrivateTmp=
    }


class Job:
    """One trainwarden@NAME instance: its job file, outputs and journal."""

    def __init__(self, systemd: NamespacedSystemd, name: str, job_text: str) -> None:
        self.systemd = systemd
        self.unit = f"trainwarden@{name}.service"
        systemd.path(f"/etc/trainwarden/{name}.yaml").write_text(job_text)
        # WorkingDirectory= is the state directory; `output_dir: run` is relative.
        self.output = systemd.path(f"/var/lib/trainwarden/{name}/run")

    def events(self, name: str | None = None) -> list[dict[str, object]]:
        """Return the supervisor's incident journal, optionally only one event type."""
        records = _records(self.output / ".warden" / "events.jsonl")
        return [r for r in records if name is None or r["event"] == name]

    def state(self, predicate: Callable[[dict[str, str]], bool]) -> dict[str, str]:
        return self.systemd.wait_for(self.unit, predicate, timeout=RUN_TIMEOUT)

    def wait_events(self, name: str, count: int = 1) -> list[dict[str, object]]:
        """Wait until the journal holds ``count`` events called ``name``."""
        deadline = time.monotonic() + RUN_TIMEOUT
        while len(found := self.events(name)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {count}x {name} in {self.events()}\n{self.systemd.log_tail()}"
                )
            time.sleep(0.2)
        return found

    def checkpoints(self) -> dict[int, dict[str, object]]:
        """Return step -> commit record of every committed checkpoint-N."""
        found = {}
        for folder in self.output.glob("checkpoint-*"):
            record = folder / "warden.json"
            if record.exists():
                found[int(folder.name.split("-")[1])] = json.loads(record.read_text())
        return found

    def training_child(self) -> int:
        """Return the namespace PID of the training child (from its heartbeat)."""
        beat = json.loads((self.output / ".warden" / "heartbeat.json").read_text())
        return int(beat["pid"])


def _is_locked(path: Path) -> bool:
    """Say whether another process holds the flock on ``path``."""
    with path.open("rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def _step(status: str) -> int:
    """Return N of a StatusText "step N/M, ...", or -1."""
    match = re.match(r"step (\d+)/\d+", status)
    return int(match.group(1)) if match else -1


def _training_step(status: str) -> int:
    """Like _step, but -1 unless the child is in the train phase (no "(save)" etc.)."""
    match = re.match(r"step (\d+)/\d+,", status)
    return int(match.group(1)) if match else -1


def test_trainwarden_runs_survives_kills_and_completes(shipped: NamespacedSystemd) -> None:
    """READY after the lock; progress in StatusText; child and supervisor kills are survived.

    One run, four checks, because every child start costs ~20 s of imports:
    1. `systemctl start` returns (READY=1) only once the output_dir lock is held;
    2. StatusText shows "step N/40, ...";
    3. SIGKILL of the training child: the unit stays active with the same main
       PID, and the supervisor relaunches from the newest checkpoint;
    4. SIGKILL of the supervisor: systemd restarts it (Restart=on-failure,
       KillMode=mixed took the orphaned child down), and the run completes.
    """
    job = Job(shipped, "alpha", JOB.format(max_steps=40))
    try:
        # 1. Type=notify: start blocks until READY=1, sent after the lock is taken.
        shipped.systemctl("start", job.unit)
        assert _is_locked(job.output / ".warden" / "lock"), "READY=1 before the lock was held"
        first = shipped.show(job.unit, "MainPID", "ActiveState", "NRestarts")
        assert first["ActiveState"] == "active"

        # 2. Progress in StatusText: "step 6/40, newest checkpoint 5, 0 restarts".
        state = job.state(lambda s: _step(s["StatusText"]) >= 5)
        assert re.fullmatch(
            r"step \d+/40(?: \(\w+\))?, (?:newest checkpoint \d+|no checkpoint yet), 0 restarts",
            state["StatusText"],
        ), state["StatusText"]
        committed = job.wait_events("checkpoint_committed")

        # 3. Kill the training child: the supervisor, not systemd, recovers.
        shipped.run(["kill", "-KILL", str(job.training_child())])
        relaunch = job.wait_events("launch", count=2)[1]
        assert relaunch["resume_step"] is not None, "the child was restarted from scratch"
        assert int(str(relaunch["resume_step"])) >= int(str(committed[0]["step"]))
        state = shipped.show(job.unit, "MainPID", "ActiveState", "NRestarts", "StatusText")
        assert (state["ActiveState"], state["MainPID"], state["NRestarts"]) == (
            "active",
            first["MainPID"],
            "0",
        )

        # 4. Kill the supervisor: systemd restarts it after RestartSec=, and the
        # new supervisor resumes from disk and finishes the run.
        shipped.run(["kill", "-KILL", first["MainPID"]])
        state = job.state(lambda s: s["NRestarts"] == "1" and s["ActiveState"] == "active")
        assert state["MainPID"] != first["MainPID"]
        state = job.state(lambda s: s["ActiveState"] in ("inactive", "failed"))
        assert (state["ActiveState"], state["Result"], state["ExecMainStatus"]) == (
            "inactive",
            "success",
            "0",
        )
        assert (job.output / "final" / "warden.json").exists()
        assert job.events("completed")
        launches = job.events("launch")
        assert launches[-1]["resume_from"] is not None, "the restarted supervisor started over"
    finally:
        _stop(shipped, job.unit)


def test_trainwarden_stop_checkpoints_resumes_and_survives_the_watchdog(
    shipped: NamespacedSystemd,
) -> None:
    """`systemctl stop` writes an emergency checkpoint; a restart resumes; the watchdog works.

    1. stop mid-run (what a preemptible VM's shutdown does): SIGTERM reaches the
       supervisor only (KillMode=mixed), the child commits checkpoint-N of the
       step it stopped at, the unit ends inactive with status 0 well within
       TimeoutStopSec=, and is not restarted;
    2. start again (the next boot): the run resumes from that checkpoint;
    3. SIGSTOP the supervisor: WATCHDOG=1 stops, systemd kills and restarts it.
    """
    job = Job(shipped, "beta", JOB.format(max_steps=400))
    try:
        shipped.systemctl("start", job.unit)
        job.state(lambda s: _training_step(s["StatusText"]) >= 6)
        stop_started = time.monotonic()
        shipped.systemctl("stop", job.unit, timeout=200)
        stop_seconds = time.monotonic() - stop_started
        state = shipped.show(job.unit, "ActiveState", "Result", "ExecMainStatus", "NRestarts")
        assert state == {
            "ActiveState": "inactive",
            "Result": "success",
            "ExecMainStatus": "0",
            "NRestarts": "0",
        }
        assert stop_seconds < 180, "stop ran into TimeoutStopSec="
        # The child stopped at a step end and saved that step: as an emergency
        # checkpoint, or (SIGTERM during a periodic save) as that save.
        report = json.loads((job.output / ".warden" / "error.json").read_text())
        assert report["kind"] == "preempted", report
        emergency_step = report["step"]
        committed = job.checkpoints()
        assert emergency_step == max(committed), committed
        assert committed[emergency_step]["reason"] in ("emergency", "periodic")

        # 2. The next boot: the job resumes from the emergency checkpoint.
        shipped.systemctl("start", job.unit)
        resumed = job.wait_events("launch", count=2)[-1]
        assert resumed["resume_step"] == emergency_step, resumed

        # 3. A wedged supervisor stops pinging and is restarted by the watchdog.
        before = shipped.show(job.unit, "MainPID")
        shipped.run(["kill", "-STOP", before["MainPID"]])
        state = job.state(lambda s: s["NRestarts"] == "1" and s["ActiveState"] == "active")
        assert state["MainPID"] != before["MainPID"]
        assert f"{job.unit}: Watchdog timeout" in shipped.log_tail(2000)
    finally:
        _stop(shipped, job.unit)


def test_trainwarden_bad_config_fails_with_78_and_no_restart(shipped: NamespacedSystemd) -> None:
    """A job file with an unknown key: start fails, ExecMainStatus=78, NRestarts=0."""
    job = Job(shipped, "broken", "output_dir: run\ntrain: {model: builtin:tiny-gpt2}\ntypo: 1\n")
    try:
        result = shipped.systemctl("start", job.unit, check=False)
        assert result.returncode != 0, "start succeeded without READY=1"
        state = shipped.show(
            job.unit, "ActiveState", "SubState", "ExecMainStatus", "NRestarts", "Result"
        )
        # A restart would show as activating/auto-restart right after the failure.
        assert state == {
            "ActiveState": "failed",
            "SubState": "failed",
            "ExecMainStatus": "78",
            "NRestarts": "0",
            "Result": "exit-code",
        }
        assert "typo" in shipped.log_tail(200)
    finally:
        _stop(shipped, job.unit)
