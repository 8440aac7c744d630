"""Free space on the filesystem that holds output_dir."""

from __future__ import annotations

import os
from typing import Protocol

from supervisor.core.model import Disk

__all__ = ["DiskProbe", "StatvfsDisk"]


class DiskProbe(Protocol):
    """Report free and total bytes where the checkpoints are written."""

    def usage(self) -> Disk:
        """Sample the filesystem now."""
        ...


class StatvfsDisk:
    """Read ``statvfs`` of a path on the filesystem to watch."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    def usage(self) -> Disk:
        """Return free bytes as an unprivileged writer sees them.

        ``f_bavail``, not ``f_bfree``: ext4 reserves ~5% for root, and the child
        gets ENOSPC when the available count, not the free count, runs out.
        """
        st = os.statvfs(self.path)
        return Disk(free=st.f_bavail * st.f_frsize, total=st.f_blocks * st.f_frsize)
