"""Skip a test only when what it needs is truly absent from the machine.

``require("root", "unshare")`` skips with ``capability absent: ...`` when a
capability is missing, and does nothing otherwise. A capability is *absent*
only by a fact of the machine (not root, no binary, no hierarchy mounted),
never because something failed while trying: a failure to use a capability that
is present is a failure of the test. ``tests/conftest.py`` turns every other
skip into a failure, so a test cannot quietly stop testing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

__all__ = ["ABSENT_PREFIX", "V1_MEMORY", "absent", "require"]

#: How a capability skip starts; the conftest hook recognises skips by it.
ABSENT_PREFIX = "capability absent: "
V1_MEMORY = Path("/sys/fs/cgroup/memory")


def _root() -> str | None:
    return None if os.geteuid() == 0 else "not root"


def _tool(name: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        return None if shutil.which(name) else f"`{name}` is not installed"

    return probe


def _cgroup_v1_memory() -> str | None:
    if not (V1_MEMORY / "cgroup.procs").exists():
        return f"no cgroup v1 memory hierarchy at {V1_MEMORY}"
    if not os.access(V1_MEMORY, os.W_OK):
        return f"{V1_MEMORY} is not writable"
    return None


def _systemd() -> str | None:
    from tests.system.systemd_harness import missing_capability

    return missing_capability()


_PROBES: dict[str, Callable[[], str | None]] = {
    "root": _root,
    "unshare": _tool("unshare"),
    "systemd-analyze": _tool("systemd-analyze"),
    "cgroup-v1-memory": _cgroup_v1_memory,
    "systemd": _systemd,
}


def absent(*capabilities: str) -> str | None:
    """Return why the first missing capability is missing, or None when all are present."""
    for name in capabilities:
        reason = _PROBES[name]()
        if reason is not None:
            return f"{name}: {reason}"
    return None


def require(*capabilities: str) -> None:
    """Skip the calling test (or module) unless every capability is present."""
    reason = absent(*capabilities)
    if reason is not None:
        pytest.skip(ABSENT_PREFIX + reason)
