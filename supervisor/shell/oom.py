"""Evidence that the kernel's OOM killer, not a bug, ended the child.

A child killed by SIGKILL that nobody here sent was usually killed by the OOM
killer, but "usually" is not evidence. Two sources are read:

1. The memory cgroup's kill counter, snapshotted at spawn and compared at exit:
   cgroup v2 ``memory.events`` field ``oom_kill`` (hierarchical: it counts kills
   in descendant cgroups too), or cgroup v1 ``memory.oom_control`` field
   ``oom_kill`` (kernel >= 4.13; counts tasks of that memcg only). The counter
   belongs to the *cgroup*: another process in the same cgroup being OOM-killed
   also raises it, which is why the policy pairs it with "died of SIGKILL".
2. The kernel log (``/dev/kmsg``): "Killed process PID" / "oom-kill:...,pid=PID".
   Readable by root (or with CAP_SYSLOG / dmesg_restrict=0); best effort. A
   cursor taken at spawn keeps an old record of a reused pid from matching.

Known limit: the cgroup is resolved right after spawn. A child that moves itself
to another cgroup later (``systemd-run --scope`` inside the job) is not followed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import structlog

__all__ = [
    "CgroupRef",
    "OomEvidence",
    "OomSnapshot",
    "OomWatch",
    "OomWatchFactory",
    "cgroup_of",
    "kernel_log_oom",
    "kmsg_cursor",
    "oom_kill_count",
    "parse_proc_cgroup",
]

log = structlog.get_logger()

SYSFS_CGROUP = "/sys/fs/cgroup"
KMSG = "/dev/kmsg"
#: kmsg records are at most ~1 KiB of text plus dictionary lines; a read with a
#: smaller buffer fails with EINVAL.
_KMSG_READ = 16384
_KILLED_RE = re.compile(r"Killed process (\d+)\b")
_OOM_KILL_RE = re.compile(r"oom-kill:.*\bpid=(\d+)\b")


@dataclass(frozen=True)
class CgroupRef:
    """Which cgroup holds a process's memory: the hierarchy version and the path in it."""

    version: Literal[1, 2]
    path: str


def parse_proc_cgroup(text: str) -> CgroupRef | None:
    """Find the memory cgroup in ``/proc/PID/cgroup`` text.

    A v1 line that lists the ``memory`` controller wins: on a hybrid host the
    unified ("0::") hierarchy carries no memory controller, and a controller can
    be bound to one hierarchy only. Otherwise the "0::/path" line is the answer.
    """
    unified: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            unified = path
        elif "memory" in controllers.split(","):
            return CgroupRef(version=1, path=path)
    if unified is not None:
        return CgroupRef(version=2, path=unified)
    return None


def cgroup_of(pid: int, proc_root: str = "/proc") -> CgroupRef | None:
    """Return the memory cgroup of a live ``pid``; None if it is gone or has none."""
    try:
        text = Path(f"{proc_root}/{pid}/cgroup").read_text()
    except OSError:
        return None
    return parse_proc_cgroup(text)


def cgroup_folders(base: Path, path: str) -> list[Path]:
    """Where the cgroup at ``path`` may be mounted under ``base``, most specific first."""
    # Without a cgroup namespace, /proc/PID/cgroup shows the host path
    # ("/docker/<id>/...") while the container's mount is rooted at its own
    # cgroup; dropping leading components finds the same cgroup under that mount.
    parts = [p for p in path.split("/") if p]
    return [base.joinpath(*parts[i:]) for i in range(len(parts) + 1)]


def read_field(path: Path, key: str) -> int | None:
    """The integer after ``key`` in a ``key value`` file (memory.stat, memory.events)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            with contextlib.suppress(ValueError):
                return int(value)
    return None


def oom_kill_count(ref: CgroupRef, sysfs_root: str = SYSFS_CGROUP) -> int | None:
    """Read the cgroup's ``oom_kill`` counter; None when the kernel does not expose it."""
    root = Path(sysfs_root)
    if ref.version == 1:
        bases, filename = [root / "memory"], "memory.oom_control"
    else:
        # Pure v2 mounts at the root; hybrid hosts mount it at unified/.
        bases, filename = [root, root / "unified"], "memory.events"
    for base in bases:
        for directory in cgroup_folders(base, ref.path):
            count = read_field(directory / filename, "oom_kill")
            if count is not None:
                return count
    return None


def _kmsg_records(kmsg_path: str) -> list[tuple[int, str]]:
    """Read every record the ring buffer still holds as (sequence number, message)."""
    try:
        fd = os.open(kmsg_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return []
    records: list[tuple[int, str]] = []
    try:
        while True:
            try:
                raw = os.read(fd, _KMSG_READ)
            except BlockingIOError:
                break  # EAGAIN: we reached the newest record
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    continue  # records were overwritten under us; go on with the next
                break
            if not raw:
                break
            # /dev/kmsg returns one record per read: "PRI,SEQ,TS,FLAGS;MESSAGE\n"
            # plus " KEY=VALUE" continuation lines. A plain file of such lines
            # (tests) returns many per read; both parse the same way.
            for line in raw.decode("utf-8", "replace").splitlines():
                header, sep, message = line.partition(";")
                fields = header.split(",")
                if sep and len(fields) >= 2 and fields[1].isdigit():
                    records.append((int(fields[1]), message))
    finally:
        os.close(fd)
    return records


def kmsg_cursor(kmsg_path: str = KMSG) -> int | None:
    """Return the sequence number of the newest kernel log record; None if unreadable."""
    records = _kmsg_records(kmsg_path)
    return records[-1][0] if records else None


def kernel_log_oom(pid: int, after_seq: int | None = None, kmsg_path: str = KMSG) -> bool:
    """Say whether the kernel log reports an OOM kill of ``pid`` after record ``after_seq``.

    Best effort: False when /dev/kmsg is unreadable or the record has rotated out.
    """
    for seq, message in _kmsg_records(kmsg_path):
        if after_seq is not None and seq <= after_seq:
            continue
        for pattern in (_KILLED_RE, _OOM_KILL_RE):
            match = pattern.search(message)
            if match and int(match.group(1)) == pid:
                return True
    return False


@dataclass(frozen=True)
class OomSnapshot:
    """What was known at spawn: the child's memory cgroup, its kill count, the kmsg cursor."""

    pid: int
    cgroup: CgroupRef | None
    oom_kills: int | None
    kmsg_seq: int | None


class OomEvidence(Protocol):
    """One child's OOM evidence: created at spawn, asked at exit."""

    def oom_killed_since(self) -> bool:
        """Say whether the child's cgroup counted an OOM kill since spawn."""
        ...

    def kernel_log_oom(self) -> bool:
        """Say whether the kernel log names the child as an OOM victim since spawn."""
        ...


#: How ``evidence.FileEvidence`` makes one ``OomEvidence`` per child, right after spawn.
OomWatchFactory = Callable[[int], OomEvidence]


class OomWatch:
    """Snapshot a child's OOM counters at spawn; at exit, say whether the OOM killer struck.

    Construct it right after spawn, while /proc/PID still exists: after the
    waiter has reaped the child its cgroup can no longer be looked up. Never
    raises; a source that cannot be read simply yields no evidence.
    """

    def __init__(
        self,
        pid: int,
        *,
        proc_root: str = "/proc",
        sysfs_root: str = SYSFS_CGROUP,
        kmsg_path: str = KMSG,
    ) -> None:
        self._sysfs = sysfs_root
        self._kmsg = kmsg_path
        ref = cgroup_of(pid, proc_root)
        count = oom_kill_count(ref, sysfs_root) if ref is not None else None
        self.snapshot = OomSnapshot(
            pid=pid, cgroup=ref, oom_kills=count, kmsg_seq=kmsg_cursor(kmsg_path)
        )
        log.debug("oom_snapshot", pid=pid, cgroup=ref, oom_kills=count)

    def oom_killed_since(self) -> bool:
        """Say whether the cgroup's ``oom_kill`` counter rose since the snapshot."""
        snap = self.snapshot
        if snap.cgroup is None or snap.oom_kills is None:
            return False
        now = oom_kill_count(snap.cgroup, self._sysfs)
        return now is not None and now > snap.oom_kills

    def kernel_log_oom(self) -> bool:
        """Say whether the kernel log reports killing the child after the snapshot."""
        return kernel_log_oom(self.snapshot.pid, self.snapshot.kmsg_seq, self._kmsg)
