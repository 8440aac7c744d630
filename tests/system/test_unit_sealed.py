"""tests/unit writes no file and reads no /proc: shown by running it where it cannot.

``run_sealed.sh`` (also ``make unit-sealed``) runs the unit tests in a private
mount namespace in which every filesystem is read-only and ``/proc`` is an
empty tmpfs. The unit tests' own audit hook (tests/unit/conftest.py) says the
same from inside; this proves it with the kernel's help.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.capabilities import require
from tests.support.processes import REPO_ROOT

pytestmark = pytest.mark.system

SEALED = REPO_ROOT / "tests" / "system" / "run_sealed.sh"


def test_unit_tests_pass_on_a_read_only_machine_without_proc() -> None:
    """Every unit test passes with nothing writable and /proc empty, and none is skipped."""
    require("root", "unshare")
    # A fresh pytest: none of this session's settings (xdist, addopts) may leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    argv = [str(SEALED), sys.executable, "-m", "pytest", "tests/unit", "-q"]
    result = subprocess.run(
        [*argv, "-p", "no:cacheprovider", "--capture=sys", "-p", "no:xdist"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    summary = output.strip().splitlines()[-1]
    assert " passed" in summary, summary
    assert "skipped" not in summary, summary
    assert "failed" not in summary, summary
