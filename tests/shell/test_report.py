"""`trainwarden report` and the status progress bar, on a realistic synthetic night."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from supervisor.cli import app
from supervisor.core.accounting import RunResult
from supervisor.plot import load_run, render_report
from tests.support.night import MAX_STEPS, write_night
from tests.support.processes import REPO_ROOT
from trainer_child.protocol import TRAINER_STATE, Heartbeat, Layout, Phase, atomic_write_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"}, catch_exceptions=False)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"
    return width, height


def test_report_draws_a_night_with_four_failures(tmp_path: Path) -> None:
    """The CLI writes a PNG of sensible size for a run with a crash, an OOM, a hang, a full disk."""
    output_dir = tmp_path / "sft-llama"
    write_night(output_dir)
    target = tmp_path / "figures" / "night.png"
    result = cli("report", str(output_dir), "-o", str(target))
    assert result.exit_code == 0, result.output
    assert str(target) in result.stdout
    width, height = png_size(target)
    assert (width, height) >= (1200, 800)
    assert width <= 2400
    assert height <= 2000
    assert target.stat().st_size > 50_000  # four panels' worth of lines, not a blank canvas


def test_report_reads_what_happened(tmp_path: Path) -> None:
    """What the picture shows: attempts, failures by kind, steps lost, the result."""
    output_dir = tmp_path / "sft-llama"
    write_night(output_dir)
    run = load_run(output_dir)
    acc = run.accounting
    assert run.loss_source == "metrics.jsonl"
    assert run.max_steps == MAX_STEPS
    assert acc.result is RunResult.COMPLETED
    assert acc.failures_by_kind == {"crash": 1, "cuda_oom": 1, "hang": 1, "disk_full": 1}
    assert [f.steps_lost for f in acc.failures] == [37, 13, 1, 26]
    assert acc.restarts == 4
    assert {p.attempt for p in run.points} == {1, 2, 3, 4, 5}
    assert acc.goodput is not None
    assert 0.3 < acc.goodput < 0.8


def test_report_of_a_run_that_gave_up_defaults_into_the_run(tmp_path: Path) -> None:
    """Without -o the PNG lands in the output_dir; a give-up's reason is kept for the title."""
    output_dir = tmp_path / "sft"
    write_night(output_dir, gave_up=True)
    result = cli("report", str(output_dir))
    assert result.exit_code == 0, result.output
    png_size(output_dir / "report.png")
    run = load_run(output_dir)
    assert run.accounting.result is RunResult.GAVE_UP
    assert run.accounting.reason is not None
    assert "restart budget spent" in run.accounting.reason


def test_report_falls_back_to_trainer_state(tmp_path: Path) -> None:
    """A plain HF run (no loss log) is drawn from the newest checkpoint's log_history."""
    output_dir = tmp_path / "plain"
    history = [
        {"step": s, "loss": 3.0 - s / 100, "learning_rate": 1e-4, "epoch": s / 50}
        for s in range(10, 110, 10)
    ]
    for step in (50, 100):
        folder = output_dir / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        state = {"global_step": step, "log_history": [h for h in history if h["step"] <= step]}
        (folder / TRAINER_STATE).write_text(json.dumps(state))
    run = load_run(output_dir)
    assert run.loss_source == f"checkpoint-100/{TRAINER_STATE}"
    assert [p.step for p in run.points] == list(range(10, 110, 10))
    assert run.accounting.result is RunResult.NOT_STARTED
    png_size(render_report(run, tmp_path / "plain.png"))


def test_report_of_an_empty_dir_still_draws(tmp_path: Path) -> None:
    """Nothing to read is said on the picture instead of failing."""
    png_size(render_report(load_run(tmp_path), tmp_path / "empty.png"))


def test_missing_matplotlib_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without matplotlib the command says which extra to install and exits 1."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = CliRunner().invoke(app, ["report", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 1
    assert "trainwarden[report]" in result.stderr


def test_cli_import_loads_no_plotting_or_notification_library() -> None:
    """`trainwarden status` stays fast: matplotlib, apprise, wandb load only when used."""
    code = (
        "import json, sys\n"
        "import supervisor.cli\n"
        "print(json.dumps([m for m in ('matplotlib', 'apprise', 'wandb') if m in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_status_shows_progress_eta_and_losses(tmp_path: Path) -> None:
    """A running run's status has a bar with step/max_steps, speed and ETA; losses are counted."""
    output_dir = tmp_path / "sft"
    layout = write_night(output_dir, gave_up=True)
    beat = Heartbeat(
        step=120,
        max_steps=MAX_STEPS,
        phase=Phase.TRAIN,
        pid=1,
        attempt=4,
        wall_time=time.time(),
        last_step_seconds=0.5,
    )
    atomic_write_model(layout.heartbeat, beat)
    result = cli("status", str(output_dir))
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.startswith("step"))
    assert "━" in line
    assert "120/300 40%" in line
    assert "2 steps/s" in line
    assert "ETA 1m30s" in line
    lost = next(line for line in result.stdout.splitlines() if line.startswith("lost"))
    assert "steps" in lost
    assert "goodput" in lost
    report = json.loads(cli("status", str(output_dir), "--json").stdout)
    assert report["steps_per_second"] == 2.0
    assert report["steps_lost"] == 51
    assert 0 < report["goodput"] < 1
    assert report["lost_seconds"] > 0


def test_status_bar_is_full_when_completed(tmp_path: Path) -> None:
    """A completed run shows a full bar at 100%."""
    layout: Layout = write_night(tmp_path / "done")
    assert layout.state.exists()
    result = cli("status", str(tmp_path / "done"))
    line = next(line for line in result.stdout.splitlines() if line.startswith("step"))
    assert "300/300 100%" in line
