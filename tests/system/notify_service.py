"""A tiny Type=notify service for the system tests, speaking through SystemdNotifier.

Run by the namespaced systemd as ``python notify_service.py [options]``. It records
what it did in ``--record FILE`` (JSON lines) so a test can compare its own clock
readings with systemd's timestamps: both read CLOCK_MONOTONIC, which a PID
namespace shares with the host.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from pathlib import Path

from supervisor.shell.systemd import SystemdNotifier


def _record(path: Path | None, **fields: object) -> None:
    if path is None:
        return
    with path.open("a") as out:
        out.write(json.dumps({"pid": os.getpid(), "t": time.monotonic(), **fields}) + "\n")


def _probe_devices(names: list[str]) -> dict[str, str]:
    """Open each /dev node; return "ok", or the errno name that stopped us.

    ENXIO means the device cgroup let us through and the kernel found no driver
    behind the node (these are fake NVIDIA nodes); EPERM means the device policy
    refused it.
    """
    results: dict[str, str] = {}
    for name in names:
        try:
            fd = os.open(f"/dev/{name}", os.O_RDWR)
        except OSError as exc:
            results[name] = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        else:
            os.close(fd)
            results[name] = "ok"
    return results


def _can_write(directory: str) -> bool:
    probe = Path(directory) / f".probe-{os.getpid()}"
    try:
        probe.write_text("x")
        probe.unlink()
    except OSError:
        return False
    return True


def main() -> int:
    """Become ready after a delay, then report status and feed the watchdog until told otherwise."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--ready-after", type=float, default=0.0)
    parser.add_argument("--exit-after-ready", type=int, default=None)
    parser.add_argument("--status", default="probe")
    parser.add_argument("--record", type=Path, default=None)
    parser.add_argument("--probe-devices", nargs="*", default=None)
    parser.add_argument("--probe-writable", nargs="*", default=[])
    args = parser.parse_args()

    notifier = SystemdNotifier()
    _record(args.record, event="started", watchdog=notifier.watchdog_interval())
    if args.probe_devices is not None:
        _record(
            args.record,
            event="probe",
            devices=_probe_devices(args.probe_devices),
            writable={d: _can_write(d) for d in args.probe_writable},
            uid=os.getuid(),
            cwd=os.getcwd(),
            hf_home=os.environ.get("HF_HOME"),
            root_listing=sorted(os.listdir("/root")) if os.path.isdir("/root") else None,
        )
    notifier.status(f"{args.status} starting")
    time.sleep(args.ready_after)
    _record(args.record, event="ready")
    notifier.ready()
    if args.exit_after_ready is not None:
        _record(args.record, event="exit", code=args.exit_after_ready)
        return int(args.exit_after_ready)
    tick = 0
    while True:
        tick += 1
        notifier.status(f"{args.status} tick {tick}")
        notifier.watchdog()
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
