"""A stand-in training child that only heartbeats: ``command: [python, bench/fake_child.py]``.

Detection latency is the supervisor's business from the moment the child dies,
so what the child was doing does not matter; a real child costs seconds of
imports per restart, this one about 30 ms, which makes 20+ kills cheap. It
speaks the heartbeat contract (``.warden/heartbeat.json``, phase ``train``, once
a second, atomically replaced) without importing pydantic, and dumps its stack on
SIGUSR1 like the real child. It never exits on its own.

``--ballast-mb N`` makes it hold N MB of touched memory first: the kernel frees
a process's memory before its parent can reap it, so a real child's exit is
only visible after a teardown that grows with its RSS. The ballast shows how
much of the real job's detection latency is that teardown.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time
from pathlib import Path

INTERVAL_SECONDS = 1.0


def main() -> int:
    ballast = bytearray(0)  # lives as long as main(), which never returns
    if len(sys.argv) == 3 and sys.argv[1] == "--ballast-mb":
        ballast = bytearray(int(sys.argv[2]) << 20)
        ballast[:: 1 << 12] = b"\1" * len(range(0, len(ballast), 1 << 12))
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    warden = Path(os.environ["TRAINWARDEN_OUTPUT_DIR"]) / ".warden"
    warden.mkdir(parents=True, exist_ok=True)
    target = warden / "heartbeat.json"
    tmp = warden / f".heartbeat.json.{os.getpid()}.tmp"
    attempt = int(os.environ.get("TRAINWARDEN_ATTEMPT", "0") or 0) or None
    step = 0
    while True:
        step += 1
        beat = {
            "step": step,
            "max_steps": None,
            "phase": "train",
            "pid": os.getpid(),
            "attempt": attempt,
            "wall_time": time.time(),
            "last_step_seconds": INTERVAL_SECONDS,
        }
        tmp.write_text(json.dumps(beat))
        os.replace(tmp, target)
        time.sleep(INTERVAL_SECONDS)


if __name__ == "__main__":
    raise SystemExit(main())
