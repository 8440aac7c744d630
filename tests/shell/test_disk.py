"""StatvfsDisk reports free and total bytes; FakeDisk keeps the same contract."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from supervisor.core.model import Disk
from supervisor.shell.disk import DiskProbe, StatvfsDisk
from supervisor.shell.testing import FakeDisk


def test_statvfs_reports_available_bytes(tmp_path: Path) -> None:
    """Free is f_bavail x f_frsize (what an unprivileged writer can use), never above total."""
    usage = StatvfsDisk(tmp_path).usage()
    st = os.statvfs(tmp_path)
    assert usage.total == st.f_blocks * st.f_frsize
    assert 0 <= usage.free <= usage.total
    assert abs(usage.free - st.f_bavail * st.f_frsize) < 64 << 20  # other writers may race


@pytest.mark.parametrize("kind", ["statvfs", "fake"])
def test_both_probes_report_whole_bytes_free_within_total(kind: str, tmp_path: Path) -> None:
    """The real probe and its fake alike: every sample is a Disk of ints, 0 <= free <= total."""
    probe: DiskProbe = StatvfsDisk(tmp_path) if kind == "statvfs" else FakeDisk()
    for _ in range(2):
        usage = probe.usage()
        assert isinstance(usage, Disk)
        assert isinstance(usage.free, int)
        assert isinstance(usage.total, int)
        assert 0 <= usage.free <= usage.total
