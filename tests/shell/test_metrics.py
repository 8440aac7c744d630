"""Prometheus metrics over real HTTP on loopback and through a node_exporter textfile."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.config import MetricsConfig
from supervisor.core.accounting import ProgressSample, account
from supervisor.core.model import Mode
from supervisor.shell.metrics import MetricsExporter, MetricsSnapshot
from trainer_child.protocol import JournalEntry

T0 = 1_800_000_000.0
OUT = "/runs/demo"


def journal() -> list[JournalEntry]:
    lines: list[dict[str, object]] = [
        {"ts": T0, "event": "launch", "attempt": 1, "resume_step": None},
        {"ts": T0 + 10, "event": "checkpoint_committed", "attempt": 1, "step": 10},
        {"ts": T0 + 12, "event": "failure", "attempt": 1, "kind": "crash", "step": 12},
        {"ts": T0 + 12, "event": "backoff", "attempt": 1, "seconds": 1.0},
        {"ts": T0 + 13, "event": "launch", "attempt": 2, "resume_step": 10},
    ]
    return [JournalEntry.model_validate(line) for line in lines]


def snapshot(**overrides: object) -> MetricsSnapshot:
    summary = account(journal(), [ProgressSample(T0 + 20, 12, 2)], now=T0 + 30)
    values: dict[str, object] = {
        "mode": Mode.RUNNING,
        "attempt": 2,
        "step": 15,
        "max_steps": 100,
        "steps_per_second": 2.5,
        "newest_checkpoint_step": 10,
        "newest_checkpoint_age_seconds": 20.0,
        "disk_free_bytes": 5 << 30,
    }
    values.update(overrides)
    return MetricsSnapshot.build(summary, **values)  # type: ignore[arg-type]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse exposition text strictly; key each sample by name and non-run labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            assert labels.pop("output_dir") == OUT
            found[(sample.name, tuple(sorted(labels.items())))] = sample.value
    return found


def check_values(found: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> None:
    assert found[("trainwarden_state", (("state", "running"),))] == 1
    assert found[("trainwarden_state", (("state", "backoff"),))] == 0
    assert found[("trainwarden_step", ())] == 15
    assert found[("trainwarden_max_steps", ())] == 100
    assert found[("trainwarden_steps_per_second", ())] == 2.5
    assert found[("trainwarden_newest_checkpoint_step", ())] == 10
    assert found[("trainwarden_newest_checkpoint_age_seconds", ())] == 20
    assert found[("trainwarden_restarts_total", ())] == 1
    assert found[("trainwarden_failures_total", (("kind", "crash"),))] == 1
    assert found[("trainwarden_failures_total", (("kind", "hang"),))] == 0
    assert found[("trainwarden_lost_seconds_total", ())] == pytest.approx(8)
    assert found[("trainwarden_lost_steps_total", ())] == 2
    assert found[("trainwarden_activity_seconds_total", (("activity", "restarting"),))] == 1
    assert found[("trainwarden_goodput_ratio", ())] == pytest.approx(1 - 8 / 30)
    assert found[("trainwarden_disk_free_bytes", ())] == 5 << 30
    # No mirror configured: the family is described but has no sample.
    assert not any(name == "trainwarden_mirror_lag_checkpoints" for name, _ in found)


def test_http_metrics_parse_as_prometheus_text() -> None:
    """A real GET of /metrics on loopback returns every metric, parseable and exact."""
    exporter = MetricsExporter(MetricsConfig(port=0), output_dir=OUT)
    exporter.start()
    try:
        assert exporter.port
        exporter.update(snapshot())
        url = f"http://127.0.0.1:{exporter.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
        check_values(samples(text))
        # A later snapshot replaces the whole picture.
        exporter.update(snapshot(step=16, mirror_lag_checkpoints=2))
        with urllib.request.urlopen(url, timeout=10) as response:
            found = samples(response.read().decode())
        assert found[("trainwarden_step", ())] == 16
        assert found[("trainwarden_mirror_lag_checkpoints", ())] == 2
    finally:
        exporter.close()
    assert exporter.port is None


def test_textfile_is_written_whole_and_parses(tmp_path: Path) -> None:
    """The textfile holds the same metrics and leaves no temporary file behind."""
    path = tmp_path / "trainwarden.prom"
    exporter = MetricsExporter(MetricsConfig(textfile=path), output_dir=OUT)
    exporter.start()  # no port: nothing to serve, nothing to stop
    exporter.update(snapshot())
    check_values(samples(path.read_text()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainwarden.prom"]
    exporter.close()


def test_unwritable_textfile_never_raises(tmp_path: Path) -> None:
    """A textfile that cannot be written is skipped, and written once it can be."""
    path = tmp_path / "missing" / "trainwarden.prom"
    exporter = MetricsExporter(MetricsConfig(textfile=path), output_dir=OUT)
    exporter.update(snapshot())
    assert not path.exists()
    path.parent.mkdir()
    exporter.update(snapshot())
    assert path.exists()


def test_counters_never_go_down(tmp_path: Path) -> None:
    """A loss trimmed after the fact (interpolated regain) does not lower the counter."""
    exporter = MetricsExporter(MetricsConfig(textfile=tmp_path / "tw.prom"), output_dir=OUT)
    exporter.update(snapshot())
    before = samples(exporter.render().decode())[("trainwarden_lost_seconds_total", ())]
    exporter.update(MetricsSnapshot(mode=Mode.RUNNING, lost_seconds=before - 1))
    after = samples(exporter.render().decode())
    assert after[("trainwarden_lost_seconds_total", ())] == before


def test_bound_port_is_an_error_at_start() -> None:
    """A port already taken fails at start, where the loop can report it."""
    first = MetricsExporter(MetricsConfig(port=0), output_dir=OUT)
    first.start()
    try:
        second = MetricsExporter(MetricsConfig(port=first.port), output_dir=OUT)
        with pytest.raises(OSError):
            second.start()
    finally:
        first.close()


def test_checkpoint_age_comes_from_its_commit_record() -> None:
    """Given `now`, the newest checkpoint's age is measured from its journal record."""
    summary = account(journal(), now=T0 + 30)
    snap = MetricsSnapshot.build(
        summary, mode=Mode.RUNNING, attempt=2, newest_checkpoint_step=10, now=T0 + 25
    )
    assert snap.newest_checkpoint_age_seconds == 15
    unknown = MetricsSnapshot.build(
        summary, mode=Mode.RUNNING, attempt=2, newest_checkpoint_step=20, now=T0 + 25
    )
    assert unknown.newest_checkpoint_age_seconds is None
