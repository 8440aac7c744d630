"""What a person sees of a night: /metrics scraped during a run, messages, the report.

Real processes throughout: a supervised built-in job scraped over HTTP on
loopback while its child is SIGKILLed, and a crash loop reporting to a webhook
receiver on loopback (answering, and then one that never answers).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.jobs import Job, write_config, write_yaml
from tests.support.outputs import assert_bit_identical, events, heartbeat
from tests.support.processes import REPO_ROOT, wait_for
from tests.support.receiver import Receiver
from tests.support.supervised import run_supervised, supervisor_process
from trainer_child.protocol import Phase

pytestmark = pytest.mark.slow

CRASHER = "import sys; sys.exit(3)"
FAILURES = 10


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples | None:
    """GET /metrics and parse it as Prometheus text; None while nothing listens yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "output_dir"))
            found[(sample.name, labels)] = sample.value
    return found


def crash_failures(samples: Samples) -> float:
    return samples.get(("trainwarden_failures_total", (("kind", "crash"),)), 0.0)


def test_metrics_during_a_run_with_a_sigkill_and_the_report_of_it(
    tmp_path: Path, env: dict[str, str], reference_final: Callable[..., Path]
) -> None:
    """/metrics parses, counts the SIGKILL as one crash, the step grows; the report draws it."""
    port = free_port()
    textfile = tmp_path / "trainwarden.prom"
    job = write_config(tmp_path, metrics={"port": port, "textfile": str(textfile)})
    with supervisor_process(job, env) as supervisor:
        before = wait_for(lambda: scrape(port), 120, what="/metrics to answer")
        assert crash_failures(before) == 0
        beat = wait_for(
            lambda: (b := heartbeat(job.layout)) is not None and b.phase is Phase.TRAIN
            and b.step >= 5 and b,
            180,
        )  # fmt: skip
        os.kill(beat.pid, signal.SIGKILL)
        after = wait_for(
            lambda: (s := scrape(port)) is not None and crash_failures(s) == 1
            and s.get(("trainwarden_step", ()), 0) > beat.step and s,
            180,
            what="the crash counted and a step past the killed one",
        )  # fmt: skip
        code = supervisor.wait(240)
        log = supervisor.log()
    assert code == 0, log
    assert after[("trainwarden_restarts_total", ())] >= 1
    assert after[("trainwarden_state", (("state", "running"),))] == 1
    assert after[("trainwarden_newest_checkpoint_step", ())] >= 4
    final = {name for name, _ in text_samples(textfile.read_text())}
    assert "trainwarden_goodput_ratio" in final
    assert_bit_identical(job.layout.final, reference_final())

    png = tmp_path / "report.png"
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "report", str(job.output_dir), "-o", str(png)],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000


def text_samples(text: str) -> list[tuple[str, float]]:
    return [(s.name, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def crash_loop(tmp_path: Path, url: str) -> Job:
    out = tmp_path / "out"
    document = {
        "output_dir": str(out),
        "command": [sys.executable, "-c", CRASHER],
        "inject_callback": False,
        "restart": {
            "max_restarts": FAILURES - 1,
            "backoff_initial": "0.05s",
            "backoff_max": "0.1s",
            "no_progress_limit": FAILURES + 1,
        },
        "notify": {"urls": [url]},
    }
    return Job(write_yaml(tmp_path / "job.yaml", document), out)


def test_a_crash_loop_sends_a_few_messages_and_one_give_up_naming_the_reason(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """Ten failures: at most the burst of failure messages, then one give-up with the reason."""
    receiver = Receiver()
    try:
        job = crash_loop(tmp_path, receiver.url)
        code, log = run_supervised(job, env, timeout=120)
    finally:
        receiver.stop()
    assert code == 76, log
    journal = events(job.layout)
    assert len([e for e in journal if e["event"] == "failure"]) == FAILURES
    titles = [str(m["title"]) for m in receiver.messages]
    gave_up = [m for m in receiver.messages if "gave up" in str(m["title"])]
    assert len(gave_up) == 1, titles
    reason = next(e for e in journal if e["event"] == "gave_up")["reason"]
    assert reason in str(gave_up[0]["message"])
    assert len(receiver.messages) <= 4, titles  # 3 failures at once, then the give-up
    assert "more failure" in str(gave_up[0]["message"])


def test_a_receiver_that_never_answers_does_not_hold_the_run_up(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """The crash loop runs to its give-up while the first message still waits for an answer.

    The receiver takes each request and never answers, so the notifier's worker
    sits on message 1 until its send times out and only then posts message 2:
    every launch and the give-up happening before message 2 arrives shows that
    nothing in the loop waited for the notifier.
    """
    receiver = Receiver()
    receiver.gate.clear()  # accept the request, never answer it
    try:
        job = crash_loop(tmp_path, receiver.url)
        code, log = run_supervised(job, env, timeout=120)
        arrivals = list(receiver.arrivals)
    finally:
        receiver.stop()
    assert code == 76, log
    journal = events(job.layout)
    assert len([e for e in journal if e["event"] == "launch"]) == FAILURES
    gave_up = next(e for e in journal if e["event"] == "gave_up")
    assert len(arrivals) >= 2, "the notifier never got past its first, unanswered message"
    assert gave_up["ts"] < arrivals[1]
