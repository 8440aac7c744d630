"""Benchmark 1: how fast the supervisor notices a dead child, and a hung one.

Kill: SIGKILL the child at a known ``time.time()``; latency = the journal's
``failure`` event ``ts`` minus that time. The child is ``bench/fake_child.py``
(heartbeats only, ~30 ms to start) so 20+ kills take seconds: from the moment
the child is dead, nothing the supervisor does depends on what the child was.
The same latency is also read off every kill of the real job in the goodput
and save-interval runs (added to this section by ``real_job_rows``).

Hang: SIGSTOP the child (it stays alive, its heartbeat goes stale); latency =
the ``hang_detected`` event ``ts`` minus the ``wall_time`` of the last heartbeat
it wrote, against the configured ``hang.timeout``. The supervisor ages the
heartbeat on its own monotonic clock from when it *saw* it change, and ticks
every ``loop.TICK_SECONDS``, so up to two ticks on top of the timeout are expected.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import (
    Sizes,
    Workspace,
    fmt_seconds,
    median,
    quantile,
)
from bench.report import Section, verdict_of
from bench.runs import RunRecord
from supervisor.loop import TICK_SECONDS
from tests.support.jobs import PYTHON, supervisor_argv, write_yaml
from tests.support.outputs import events, heartbeat
from tests.support.processes import REPO_ROOT, live_descendants, run_process

HANG_TIMEOUT = 1.0
TARGET_P95 = 0.100
#: Memory the ballast fake child holds, about what the tiny job's child does.
BALLAST_MB = 512
FAKE_CHILD = str(REPO_ROOT / "bench" / "fake_child.py")


def _is_fake_child(cmdline: Sequence[str]) -> bool:
    return any(part.endswith("fake_child.py") for part in cmdline)


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise TimeoutError(f"detection benchmark: no {what} within {timeout:.0f}s")


def _running_child(sup_pid: int, output_dir: Path, seen: set[int]) -> int | None:
    """A new fake child that the supervisor has registered and that has heartbeaten."""
    children = [p.pid for p in live_descendants(sup_pid, _is_fake_child) if p.pid not in seen]
    if not children:
        return None
    pid = children[0]
    beat = heartbeat(output_dir)
    registered = any(
        e["event"] == "child_started" and e.get("pid") == pid for e in events(output_dir)
    )
    return pid if beat is not None and beat.pid == pid and registered else None


def _event_for(output_dir: Path, event: str, pid: int | None = None) -> dict[str, Any] | None:
    for entry in reversed(events(output_dir)):
        if entry["event"] == event and (pid is None or entry.get("pid") == pid):
            return entry
    return None


def _all(output_dir: Path, event: str) -> list[dict[str, Any]]:
    return [e for e in events(output_dir) if e["event"] == event]


def _nth(output_dir: Path, event: str, index: int) -> dict[str, Any] | None:
    found = _all(output_dir, event)
    return found[index] if len(found) > index else None


def _config(folder: Path, argv: list[str]) -> Path:
    return write_yaml(
        folder / "job.yaml",
        {
            "output_dir": str(folder / "run"),
            "command": argv,
            "restart": {
                "backoff_initial": "0.05s",
                "backoff_max": "0.05s",
                "max_restarts": 10_000,
                "no_progress_limit": 10_000,
                # The fake child stays a 30 ms heartbeat-only process: a standby
                # would pre-import torch for it, and its teardown would be timed.
                "standby": "off",
            },
            "hang": {"timeout": HANG_TIMEOUT, "kill_grace": "2s"},
        },
    )


def _measure(
    ws: Workspace, folder: Path, argv: list[str], kills: int, hangs: int
) -> tuple[list[float], list[float]]:
    """SIGKILL ``kills`` children, then SIGSTOP ``hangs``; return both latency lists."""
    output_dir = folder / "run"
    config = _config(folder, argv)
    rng = random.Random(1)
    kill_latency: list[float] = []
    hang_latency: list[float] = []
    seen: set[int] = set()
    with run_process(supervisor_argv(config), ws.env, folder / "supervisor.log") as sup:
        for _ in range(kills):
            pid = _wait(lambda: _running_child(sup.pid, output_dir, seen), 60, "fake child")
            seen.add(pid)
            # A random phase against the supervisor's 250 ms tick: the exit path
            # must not depend on it, and this shows whether it does.
            time.sleep(rng.uniform(0.0, 2 * TICK_SECONDS))
            killed_at = time.time()
            os.kill(pid, signal.SIGKILL)
            failure = _wait(partial(_event_for, output_dir, "failure", pid), 30, "failure")
            kill_latency.append(failure["ts"] - killed_at)
        for _ in range(hangs):
            pid = _wait(lambda: _running_child(sup.pid, output_dir, seen), 60, "fake child")
            seen.add(pid)
            time.sleep(rng.uniform(0.0, 1.0))
            os.kill(pid, signal.SIGSTOP)
            last = heartbeat(output_dir)
            before = len(_all(output_dir, "hang_detected"))
            hang = _wait(partial(_nth, output_dir, "hang_detected", before), 30, "hang_detected")
            if last is not None and last.pid == pid:
                hang_latency.append(hang["ts"] - last.wall_time)
            _wait(partial(_event_for, output_dir, "failure", pid), 30, "hang failure")
        sup.signal(signal.SIGTERM)
        sup.exit_within(15)
    return kill_latency, hang_latency


def run(ws: Workspace, sizes: Sizes) -> Section:
    section = Section("detection", "1 detection")
    kill_latency, hang_latency = _measure(
        ws,
        ws.fresh("detection"),
        [PYTHON, FAKE_CHILD],
        sizes.detection_kills,
        sizes.detection_hangs,
    )
    ballast_kills = max(5, sizes.detection_kills // 4)
    ballast_latency, _ = _measure(
        ws,
        ws.fresh("detection-ballast"),
        [PYTHON, FAKE_CHILD, "--ballast-mb", str(BALLAST_MB)],
        ballast_kills,
        0,
    )
    p50, p95 = quantile(kill_latency, 0.5), quantile(kill_latency, 0.95)
    section.add(
        f"SIGKILL -> failure event, p50 (n={len(kill_latency)}, fake child)", fmt_seconds(p50)
    )
    section.check(
        "SIGKILL -> failure event, p95", fmt_seconds(p95), "p95 < 100 ms", p95 < TARGET_P95
    )
    section.add("SIGKILL -> failure event, max", fmt_seconds(max(kill_latency)))
    b50, b95 = quantile(ballast_latency, 0.5), quantile(ballast_latency, 0.95)
    section.add(
        f"same, fake child holding {BALLAST_MB} MB, p50 / p95 (n={len(ballast_latency)})",
        f"{fmt_seconds(b50)} / {fmt_seconds(b95)}",
    )
    h50, h95 = quantile(hang_latency, 0.5), quantile(hang_latency, 0.95)
    allowed = HANG_TIMEOUT + 2 * TICK_SECONDS
    section.add(
        f"last heartbeat -> hang_detected, p50 (n={len(hang_latency)})",
        fmt_seconds(h50),
        f"timeout {HANG_TIMEOUT:.1f} s",
    )
    section.add(
        "last heartbeat -> hang_detected, p95",
        fmt_seconds(h95),
        f"<= timeout + 2 ticks = {allowed:.2f} s",
        verdict_of(h95 <= allowed),
    )
    section.notes.append(
        "kills use bench/fake_child.py (heartbeats only) so 20+ kills cost seconds; after the "
        "child is dead the supervisor's path (waiter thread -> queue -> evidence, inventory, "
        "policy -> journal fsync) does not depend on the child. But the kernel frees a "
        "process's memory before its parent can reap it: the ballast row (and the real job's, "
        "whose child holds several hundred MB) add that teardown, which the supervisor cannot "
        f"see past. Hangs: SIGSTOP, hang.timeout={HANG_TIMEOUT:.0f}s, tick "
        f"{TICK_SECONDS * 1000:.0f} ms."
    )
    section.data.update(
        kill_latency_s=kill_latency,
        ballast_mb=BALLAST_MB,
        ballast_kill_latency_s=ballast_latency,
        hang_latency_s=hang_latency,
        hang_timeout_s=HANG_TIMEOUT,
        tick_s=TICK_SECONDS,
        kill_p50_s=p50,
        kill_p95_s=p95,
        hang_p50_s=h50,
        hang_p95_s=h95,
    )
    return section


def real_job_latencies(runs: Sequence[RunRecord]) -> list[float]:
    """SIGKILL -> failure event for every kill of a supervised real-job run."""
    latencies = []
    for record in runs:
        if record.system != "trainwarden":
            continue
        failures = {e.get("pid"): e for e in record.events if e["event"] == "failure"}
        for kill in record.kills:
            event = failures.get(kill.pid)
            if event is not None:
                latencies.append(event["ts"] - kill.ts)
    return latencies


def real_job_rows(section: Section, runs: Sequence[RunRecord]) -> None:
    """Add the real job's kill-detection latency (from the goodput and sweep runs)."""
    latencies = real_job_latencies(runs)
    if not latencies:
        return
    rss = median(k.rss_mb for r in runs for k in r.kills if r.system == "trainwarden")
    p50, p95 = quantile(latencies, 0.5), quantile(latencies, 0.95)
    section.add(
        f"SIGKILL -> failure event, real job (child RSS {rss:.0f} MB), p50 (n={len(latencies)})",
        fmt_seconds(p50),
    )
    section.check(
        "SIGKILL -> failure event, real job, p95",
        fmt_seconds(p95),
        "p95 < 100 ms",
        p95 < TARGET_P95,
    )
    section.data.update(real_job_kill_latency_s=latencies, real_job_median_s=median(latencies))


__all__ = ["real_job_latencies", "real_job_rows", "run"]
