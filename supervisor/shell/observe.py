"""Let people see the run: Prometheus metrics, notifications, one tracking run, one ledger.

The loop's one seam for everything it tells the outside world besides the
journal and systemd. ``RunObserver`` bundles:

* a ``Ledger`` (``core/accounting.py``) fed every journal record and every step
  the heartbeat shows, so restarts, time lost and goodput are known live;
* a ``MetricsExporter`` (``metrics:``), updated from a ``RunView`` at most every
  ``METRICS_INTERVAL`` seconds and after each record;
* ``Alerts`` (``notify:``), which only ever enqueues;
* the tracking run id (``tracking.py``), made once and kept in state.json, and
  the environment that points every attempt at that one run.

Nothing here may slow or stop training: metrics and alerts swallow their own
failures (a full disk under the textfile, a chat service that is down). Only a
metrics port that cannot be bound fails, at start, before any child runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from supervisor.config import Config
from supervisor.core.accounting import Ledger
from supervisor.core.model import Mode
from supervisor.errors import ConfigError
from supervisor.shell.journal import read_events
from supervisor.shell.metrics import MetricsExporter, MetricsSnapshot
from supervisor.shell.notify import Alerts
from supervisor.shell.tracking import tracking_env, tracking_run_id
from trainer_child.protocol import JournalEntry, Layout, RunStateFile

__all__ = ["METRICS_INTERVAL", "Observer", "RunObserver", "RunView"]

#: Seconds between two metrics updates from the timer (records update at once).
METRICS_INTERVAL = 2.0


@dataclass(frozen=True)
class RunView:
    """What the loop knows right now, as plain values (wall-clock ``wall``)."""

    wall: float
    mode: Mode
    attempt: int
    step: int | None = None
    max_steps: int | None = None
    last_step_seconds: float | None = None
    newest_checkpoint_step: int | None = None
    disk_free_bytes: int | None = None
    mirror_lag_checkpoints: int | None = None


class Observer(Protocol):
    """Everything the loop reports beyond the journal; never fails training."""

    @property
    def tracking_run_id(self) -> str | None:
        """The run's experiment-tracker id, to keep in state.json (None before ``start``)."""
        ...

    def start(self, previous: RunStateFile | None) -> None:
        """Take in the run's history and open the metrics port (ConfigError if it is taken)."""
        ...

    def record(self, wall: float, event: str, attempt: int, fields: Mapping[str, object]) -> None:
        """Note one journal record (the ledger, notifications, a metrics update)."""
        ...

    def update(self, view: RunView) -> None:
        """Note the run's live state (each tick); metrics are refreshed now and then."""
        ...

    def child_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """Return variables to add to a child's ``env`` (the user's own settings win)."""
        ...

    def close(self) -> None:
        """Send what is queued (a give-up), stop the metrics server, join every thread."""
        ...


class RunObserver:
    """The real observer of one run: ledger, metrics sinks, alerts, tracking id."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._layout = Layout(config.output_dir)
        self._clock = clock
        self._ledger = Ledger()
        self._exporter = (
            MetricsExporter(config.metrics, output_dir=config.output_dir)
            if config.metrics is not None
            else None
        )
        self._alerts = (
            Alerts(config.notify, job=config.output_dir.name) if config.notify is not None else None
        )
        self._run_id: str | None = None
        self._last_push = float("-inf")
        self._view: RunView | None = None

    @property
    def tracking_run_id(self) -> str | None:
        return self._run_id

    def start(self, previous: RunStateFile | None) -> None:
        self._run_id = tracking_run_id(previous)
        for entry in read_events(self._layout):
            self._ledger.add_entry(entry)
        if self._exporter is not None:
            try:
                self._exporter.start()
            except OSError as exc:
                metrics = self._config.metrics
                where = f"{metrics.address}:{metrics.port}" if metrics else "?"
                raise ConfigError(
                    "metrics", [f"cannot serve /metrics on {where}: {exc.strerror or exc}"]
                ) from exc

    def record(self, wall: float, event: str, attempt: int, fields: Mapping[str, object]) -> None:
        self._ledger.add_entry(JournalEntry(ts=wall, event=event, attempt=attempt, **fields))
        if self._alerts is not None:
            self._alerts.record(event, attempt, dict(fields))
        if self._view is not None:
            self._push(self._view)

    def update(self, view: RunView) -> None:
        if view.step is not None and view.mode in (Mode.RUNNING, Mode.STOPPING):
            self._ledger.add_progress(view.wall, view.step, view.attempt)
        self._view = view
        if self._clock() - self._last_push >= METRICS_INTERVAL:
            self._push(view)

    def _push(self, view: RunView) -> None:
        self._last_push = self._clock()
        if self._exporter is None:
            return
        speed = 1.0 / view.last_step_seconds if view.last_step_seconds else None
        snapshot = MetricsSnapshot.build(
            self._ledger.summary(now=view.wall),
            mode=view.mode,
            attempt=view.attempt,
            step=view.step,
            max_steps=view.max_steps,
            steps_per_second=speed,
            newest_checkpoint_step=view.newest_checkpoint_step,
            disk_free_bytes=view.disk_free_bytes,
            mirror_lag_checkpoints=view.mirror_lag_checkpoints,
            now=view.wall,
        )
        self._exporter.update(snapshot)

    def child_env(self, env: Mapping[str, str]) -> dict[str, str]:
        if self._run_id is None:
            return {}
        return tracking_env(self._run_id, env, self._layout)

    def close(self) -> None:
        if self._view is not None:
            self._push(self._view)  # the final state (completed, gave up) is scraped too
        if self._exporter is not None:
            self._exporter.close()
        if self._alerts is not None:
            self._alerts.close(timeout=10)
