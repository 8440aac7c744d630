"""``trainwarden demo``: the first thing a newcomer runs must work end to end."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.support.processes import REPO_ROOT
from trainer_child.protocol import COMMIT_RECORD, Layout


def summary_rows(output: str) -> dict[str, str]:
    """Map the first cell of each summary-table line to its second cell."""
    rows: dict[str, str] = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if len(cells) == 2 and cells[0] and cells[0] not in rows:
            rows[cells[0]] = cells[1]
    return rows


@pytest.mark.slow
def test_demo_survives_both_kills_and_completes(tmp_path: Path, env: dict[str, str]) -> None:
    """`trainwarden demo` exits 0 after both chaos kills; its summary says completed, 2 crashes."""
    directory = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "demo", "--dir", str(directory)],
        env={**env, "COLUMNS": "160"},
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            # The demo's training child leads its own session: kill it by PID too.
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signal.SIGKILL)
            proc.kill()
            proc.wait(10)
    output = stdout + stderr
    assert proc.returncode == 0, output[-6000:]
    kills = [line for line in stdout.splitlines() if line.startswith("chaos: SIGKILL")]
    assert len(kills) == 2, output[-6000:]
    assert "mid-training" in kills[0]
    assert "is being written" in kills[1]
    assert "was left without a commit record" in stdout
    rows = summary_rows(stdout)
    assert rows["result"] == "completed", rows
    assert rows["restarts"] == "2 crash", rows
    assert rows["attempts"] == "3", rows
    # Whether a standby was ready by each kill depends on the machine's pace.
    assert re.fullmatch(r"[0-2] of 3 \(restart\.standby\)", rows["attempts started warm"]), rows
    assert (Layout(directory).final / COMMIT_RECORD).is_file()
