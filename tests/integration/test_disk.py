"""StatvfsDisk and FakeDisk report free and total bytes."""

from __future__ import annotations

import os
from pathlib import Path

from supervisor.shell.disk import DiskProbe, FakeDisk, StatvfsDisk


def test_statvfs_reports_available_bytes(tmp_path: Path) -> None:
    """Free is f_bavail x f_frsize (what an unprivileged writer can use), never above total."""
    usage = StatvfsDisk(tmp_path).usage()
    st = os.statvfs(tmp_path)
    assert usage.total == st.f_blocks * st.f_frsize
    assert 0 <= usage.free <= usage.total
    assert abs(usage.free - st.f_bavail * st.f_frsize) < 64 << 20  # other writers may race


def test_fake_disk_returns_scripted_numbers() -> None:
    """FakeDisk returns what the test set and counts samples."""
    fake: DiskProbe = FakeDisk(free=10, total=100)
    assert isinstance(fake, FakeDisk)
    fake.free = 0
    usage = fake.usage()
    assert (usage.free, usage.total, fake.samples) == (0, 100, 1)
