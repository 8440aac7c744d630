"""Prometheus metrics: ``/metrics`` over HTTP and/or a node_exporter textfile.

The loop hands over plain data; nothing here reads the run's files or the policy
state. Every value comes from one frozen ``MetricsSnapshot``, swapped in whole by
``update``, so a scrape never sees half an update and the HTTP thread only reads.

How the loop uses it::

    exporter = MetricsExporter(config.metrics, output_dir=config.output_dir)
    exporter.start()                       # binds address:port (OSError if taken)
    ...
    # on every Tick (or every few seconds) and after every Record:
    exporter.update(MetricsSnapshot.build(
        ledger.summary(now=wall), mode=state.mode, attempt=state.attempt,
        step=beat.step, max_steps=beat.max_steps,
        steps_per_second=1 / beat.last_step_seconds,
        newest_checkpoint_step=state.newest_valid,   # age: from its commit record
        disk_free_bytes=state.disk.free,
        now=wall,
    ))
    ...
    exporter.close()                       # on the way out: shutdown + join

``update`` never raises: a textfile that cannot be written (full disk, the
exact night this matters) is logged once and retried at the next update.

Names follow the Prometheus conventions: a ``trainwarden_`` prefix, base units in
the name (``_seconds``, ``_bytes``, ``_ratio``), ``_total`` for counters, and
every label value a counter can take is exported from the start (at 0) so
``rate()`` and ``increase()`` see the first failure. Every series carries an
``output_dir`` label so two runs on one node_exporter never collide.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import write_to_textfile
from prometheus_client.registry import Collector

from supervisor.core.accounting import Accounting, Activity
from supervisor.core.model import FailureKind, Mode

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from supervisor.config import MetricsConfig

__all__ = ["MetricsExporter", "MetricsSnapshot"]

log = structlog.get_logger("trainwarden")

#: Failure kinds exported at 0 before they ever happen (FailureKind minus preempted,
#: which is not a failure: it has its own counter).
_FAILURE_KINDS = tuple(k.value for k in FailureKind if k is not FailureKind.PREEMPTED)


@dataclass(frozen=True)
class MetricsSnapshot:
    """Everything exported, as plain values; None means unknown and is left out."""

    mode: Mode = Mode.STARTING
    attempt: int = 0
    step: int | None = None
    max_steps: int | None = None
    steps_per_second: float | None = None
    newest_checkpoint_step: int | None = None
    newest_checkpoint_age_seconds: float | None = None
    restarts: int = 0
    preemptions: int = 0
    failures_by_kind: Mapping[str, int] = field(default_factory=dict)
    lost_seconds: float = 0.0
    lost_steps: int = 0
    #: Wall seconds per accounting activity (training, restarting, waiting, down).
    activity_seconds: Mapping[str, float] = field(default_factory=dict)
    goodput_ratio: float | None = None
    disk_free_bytes: int | None = None
    #: Valid local checkpoints not yet on the remote mirror; None while no mirror exists.
    mirror_lag_checkpoints: int | None = None

    @classmethod
    def build(
        cls,
        accounting: Accounting,
        *,
        mode: Mode,
        attempt: int,
        step: int | None = None,
        max_steps: int | None = None,
        steps_per_second: float | None = None,
        newest_checkpoint_step: int | None = None,
        newest_checkpoint_age_seconds: float | None = None,
        disk_free_bytes: int | None = None,
        mirror_lag_checkpoints: int | None = None,
        now: float | None = None,
    ) -> MetricsSnapshot:
        """Combine the run's accounting with the loop's live values.

        Without an explicit age, the newest checkpoint's age is taken from its
        ``checkpoint_committed`` record, measured to ``now`` (wall time).
        """
        if newest_checkpoint_age_seconds is None and newest_checkpoint_step is not None and now:
            committed = [c.ts for c in accounting.commits if c.step == newest_checkpoint_step]
            if committed:
                newest_checkpoint_age_seconds = max(0.0, now - committed[-1])
        return cls(
            mode=mode,
            attempt=attempt,
            step=step if step is not None else accounting.last_step,
            max_steps=max_steps,
            steps_per_second=steps_per_second,
            newest_checkpoint_step=newest_checkpoint_step,
            newest_checkpoint_age_seconds=newest_checkpoint_age_seconds,
            restarts=accounting.restarts,
            preemptions=accounting.preemptions,
            failures_by_kind=accounting.failures_by_kind,
            lost_seconds=accounting.lost_seconds,
            lost_steps=accounting.steps_lost,
            activity_seconds={a.value: accounting.seconds(a) for a in Activity},
            goodput_ratio=accounting.goodput,
            disk_free_bytes=disk_free_bytes,
            mirror_lag_checkpoints=mirror_lag_checkpoints,
        )


class _SnapshotCollector(Collector):
    """Turn the current snapshot into metric families at each scrape."""

    def __init__(self, labels: Mapping[str, str]) -> None:
        self._names = list(labels)
        self._values = list(labels.values())
        self.snapshot = MetricsSnapshot()
        #: High-water marks: a counter must never go down between two scrapes,
        #: though an interpolated regain time can trim a loss after the fact.
        self._counters: dict[tuple[str, str], float] = {}
        # Scrapes (HTTP threads) and textfile writes (the loop) collect concurrently.
        self._lock = threading.Lock()

    def _gauge(self, name: str, doc: str, value: float | None) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=self._names)
        if value is not None:
            family.add_metric(self._values, value)
        return family

    def _counter(
        self, name: str, doc: str, values: Mapping[str, float], label: str | None = None
    ) -> CounterMetricFamily:
        family = CounterMetricFamily(
            name, doc, labels=[*self._names, label] if label else self._names
        )
        for key, value in values.items():
            mark = (name, key)
            kept = max(value, self._counters.get(mark, 0.0))
            self._counters[mark] = kept
            family.add_metric([*self._values, key] if label else self._values, kept)
        return family

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            return iter(list(self._families()))

    def _families(self) -> Iterator[Metric]:
        snap = self.snapshot  # one read: a concurrent update swaps the whole object
        yield from self._progress_families(snap)
        yield from self._cost_families(snap)

    def _progress_families(self, snap: MetricsSnapshot) -> Iterator[Metric]:
        """Where the run is: state, attempt, step, speed, newest checkpoint, disk, mirror."""
        state = GaugeMetricFamily(
            "trainwarden_state",
            "1 for the supervisor's current state, 0 for the others.",
            labels=[*self._names, "state"],
        )
        for mode in Mode:
            state.add_metric([*self._values, mode.value], 1.0 if mode is snap.mode else 0.0)
        yield state
        yield self._gauge("trainwarden_attempt", "Current attempt number (1-based).", snap.attempt)
        yield self._gauge("trainwarden_step", "Optimizer step last reported.", snap.step)
        yield self._gauge(
            "trainwarden_max_steps", "Optimizer steps of the whole run.", snap.max_steps
        )
        yield self._gauge(
            "trainwarden_steps_per_second", "Training speed of the child.", snap.steps_per_second
        )
        yield self._gauge(
            "trainwarden_newest_checkpoint_step",
            "Step of the newest valid checkpoint.",
            snap.newest_checkpoint_step,
        )
        yield self._gauge(
            "trainwarden_newest_checkpoint_age_seconds",
            "Seconds since the newest valid checkpoint was committed.",
            snap.newest_checkpoint_age_seconds,
        )
        yield self._gauge(
            "trainwarden_disk_free_bytes",
            "Free bytes on the filesystem of output_dir.",
            snap.disk_free_bytes,
        )
        yield self._gauge(
            "trainwarden_mirror_lag_checkpoints",
            "Valid checkpoints not yet on the remote mirror.",
            snap.mirror_lag_checkpoints,
        )

    def _cost_families(self, snap: MetricsSnapshot) -> Iterator[Metric]:
        """What the night cost: restarts, failures by kind, time and steps lost, goodput."""
        yield self._counter(
            "trainwarden_restarts", "Attempts launched after the first.", {"": snap.restarts}
        )
        failures = dict.fromkeys(_FAILURE_KINDS, 0.0)
        failures.update({k: float(v) for k, v in snap.failures_by_kind.items()})
        yield self._counter("trainwarden_failures", "Failed attempts by kind.", failures, "kind")
        yield self._counter(
            "trainwarden_preemptions",
            "Children stopped by SIGTERM and restarted (not failures).",
            {"": snap.preemptions},
        )
        yield self._counter(
            "trainwarden_lost_seconds",
            "Wall seconds from each failure until its step was regained.",
            {"": snap.lost_seconds},
        )
        yield self._counter(
            "trainwarden_lost_steps",
            "Optimizer steps done again after failures.",
            {"": snap.lost_steps},
        )
        activity = {a.value: 0.0 for a in Activity}
        activity.update(snap.activity_seconds)
        yield self._counter(
            "trainwarden_activity_seconds",
            "Wall seconds spent training, restarting, waiting, and with no supervisor (down).",
            activity,
            "activity",
        )
        yield self._gauge(
            "trainwarden_goodput_ratio",
            "Share of supervised wall time not lost to failures or waits.",
            snap.goodput_ratio,
        )


class MetricsExporter:
    """Serve the latest snapshot at ``/metrics`` and/or write it to a textfile."""

    def __init__(
        self,
        config: MetricsConfig,
        *,
        output_dir: str | os.PathLike[str],
    ) -> None:
        self._config = config
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = _SnapshotCollector({"output_dir": str(output_dir)})
        self.registry.register(self._collector)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._textfile_failing = False

    @property
    def port(self) -> int | None:
        """The port actually bound (useful with ``port: 0``); None when not serving."""
        if self._server is None:
            return None
        return int(self._server.server_address[1])

    @property
    def textfile(self) -> Path | None:
        return self._config.textfile

    def start(self) -> None:
        """Start serving when a port is configured; OSError if it cannot bind."""
        if self._config.port is None or self._server is not None:
            return
        server, thread = start_http_server(
            self._config.port, addr=self._config.address, registry=self.registry
        )
        thread.name = "trainwarden-metrics"
        self._server, self._thread = server, thread
        log.info("metrics_serving", address=self._config.address, port=self.port)

    def update(self, snapshot: MetricsSnapshot) -> None:
        """Publish ``snapshot``; rewrite the textfile if one is configured. Never raises."""
        self._collector.snapshot = snapshot
        path = self._config.textfile
        if path is None:
            return
        try:
            write_to_textfile(str(path), self.registry)
        except OSError as exc:
            if not self._textfile_failing:
                log.warning("metrics_textfile_failed", path=str(path), error=str(exc))
            self._textfile_failing = True
        else:
            if self._textfile_failing:
                log.info("metrics_textfile_recovered", path=str(path))
            self._textfile_failing = False

    def render(self) -> bytes:
        """The exposition text of the current snapshot (what a scrape gets)."""
        return generate_latest(self.registry)

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving and join the server thread (idempotent)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> MetricsExporter:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.close()
