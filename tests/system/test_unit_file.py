"""The shipped unit file, judged by systemd's own tools (no running systemd needed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config import PreemptionConfig
from tests.support.capabilities import require
from trainer_child.protocol import EXIT_CONFIG, EXIT_GAVE_UP

pytestmark = pytest.mark.system

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "trainwarden@.service"
INSTANCE = "trainwarden@job.service"
SHIPPED_EXEC = "/usr/local/bin/trainwarden"
MAX_EXPOSURE = 3.0


@pytest.fixture(autouse=True)
def _systemd_analyze() -> None:
    require("systemd-analyze")


def _analyze(unit_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run systemd-analyze with ``unit_dir`` searched first.

    The trailing ':' keeps the default search path behind it, so the targets the
    unit names (network-online.target, sysinit.target) resolve.
    """
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:", "SYSTEMD_PAGER": "cat"}
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, env=env, check=False
    )


def _shipped(tmp_path: Path) -> Path:
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    shutil.copy(UNIT, unit_dir / UNIT.name)
    return unit_dir


def _settings(key: str) -> list[str]:
    """Return every value of ``key`` in the unit, in order (keys repeat in unit files)."""
    values = []
    for line in UNIT.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#") and name.strip() == key:
            values.append(value.strip())
    return values


def _seconds(span: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min|h)", span)
    assert match, f"unexpected time span {span!r}"
    return int(match.group(1)) * {"s": 1, "min": 60, "h": 3600}[match.group(2)]


def test_verify_only_misses_the_binary_it_is_not_installed_here(tmp_path: Path) -> None:
    """As shipped, verify's one complaint can be the ExecStart binary missing on this box."""
    result = _analyze(_shipped(tmp_path), "verify", INSTANCE)
    if Path(SHIPPED_EXEC).exists():
        assert (result.returncode, result.stderr) == (0, "")
    else:
        assert result.stderr.strip() == (
            f"{INSTANCE}: Command {SHIPPED_EXEC} is not executable: No such file or directory"
        )


def test_verify_is_clean_with_exec_start_pointing_at_an_installed_binary(tmp_path: Path) -> None:
    """With a drop-in moving ExecStart to this checkout's binary, verify says nothing."""
    unit_dir = _shipped(tmp_path)
    binary = Path(sys.executable).with_name("trainwarden")
    command = f"{binary}" if binary.exists() else f"{sys.executable} -m supervisor"
    drop_in = unit_dir / f"{UNIT.name}.d"
    drop_in.mkdir()
    (drop_in / "exec.conf").write_text(
        f"[Service]\nExecStart=\nExecStart={command} run /etc/trainwarden/%i.yaml\n"
    )
    result = _analyze(unit_dir, "verify", INSTANCE)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_security_exposure_is_at_most_three(tmp_path: Path) -> None:
    """systemd-analyze security --offline rates the shipped unit 3.0 or better."""
    result = _analyze(
        _shipped(tmp_path),
        "security",
        "--offline=true",
        f"--threshold={int(MAX_EXPOSURE * 10)}",
        "--no-pager",
        INSTANCE,
    )
    match = re.search(
        rf"Overall exposure level for {re.escape(INSTANCE)}: (\d+\.\d+)", result.stdout
    )
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    print(f"exposure {exposure}")
    assert exposure <= MAX_EXPOSURE
    assert result.returncode == 0, "--threshold disagrees with the parsed score"


def test_device_access_is_the_nvidia_nodes_only() -> None:
    """DevicePolicy=closed plus the NVIDIA character devices, named one by one."""
    assert _settings("DevicePolicy") == ["closed"]
    allowed = {entry.split()[0]: entry.split()[1] for entry in _settings("DeviceAllow")}
    assert allowed == {
        "char-nvidia-frontend": "rw",
        "char-nvidia": "rw",
        "char-nvidiactl": "rw",
        "char-nvidia-uvm": "rw",
        "/dev/nvidiactl": "rw",
        "/dev/nvidia-modeset": "rw",
        "/dev/nvidia-uvm": "rw",
        "/dev/nvidia-uvm-tools": "rw",
    }
    # systemd matches char-* names with fnmatch: a glob would be a blanket allow.
    assert not any(set(name) & set("*?[") for name in allowed)
    # PrivateDevices=yes would hide every /dev/nvidia* node again.
    assert _settings("PrivateDevices") == []


def test_service_semantics_match_the_supervisor_contract() -> None:
    """Exit codes, stop handling and notify agree with the contract (docs/architecture.md)."""
    assert _settings("Type") == ["notify"]
    assert _settings("NotifyAccess") == ["main"]
    assert _settings("Restart") == ["on-failure"]
    assert _settings("RestartPreventExitStatus") == [f"{EXIT_GAVE_UP} {EXIT_CONFIG}"]
    assert _settings("KillMode") == ["mixed"]
    assert _seconds(_settings("TimeoutStopSec")[0]) > PreemptionConfig().grace
    assert _seconds(_settings("WatchdogSec")[0]) >= 10
    assert _settings("ExecStart") == [f"{SHIPPED_EXEC} run /etc/trainwarden/%i.yaml"]
    assert _settings("User") == ["trainwarden"]
    assert _settings("DynamicUser") == []
    assert _settings("StateDirectory") == ["trainwarden/%i"]
    assert _settings("WorkingDirectory") == ["%S/trainwarden/%i"]
    assert "HF_HOME=%C/trainwarden/huggingface" in _settings("Environment")
