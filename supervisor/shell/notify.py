"""Tell people about a run through apprise (chat, mail, webhooks), never at training's cost.

``Alerts`` turns journal records into messages and hands them to its own worker
thread through a bounded queue; the caller only ever does a ``put_nowait``. So a
receiver that is slow, failing or down costs the loop nothing: the worker waits
on it (each send is bounded by a timeout), the loop goes on.

A crash loop must not send hundreds of messages. Failures pass a token bucket
(``burst`` at once, then one per ``refill_seconds``); the ones held back are
counted and named in the next message that does go out ("and 7 more failures
not sent: 7 crash"). ``gave_up`` and ``completed`` happen once a run, so they
always go out, and they carry that count too.

URLs carry tokens: logs name a service by apprise's privacy form (secrets
masked), never by the URL given.

How the loop uses it::

    alerts = Alerts(config.notify, job=config.output_dir.name) if config.notify else None
    ...
    # in _record(event, fields), after the journal append:
    if alerts is not None:
        alerts.record(event, self.state.attempt, fields)
    ...
    if alerts is not None:
        alerts.close(timeout=10)   # on exit: sends what is queued (the give-up), then joins
"""

from __future__ import annotations

import contextlib
import enum
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import structlog

if TYPE_CHECKING:
    from supervisor.config import NotifyConfig

__all__ = [
    "DEFAULT_BURST",
    "DEFAULT_REFILL_SECONDS",
    "Alerts",
    "AppriseSender",
    "Message",
    "Sender",
    "Severity",
    "redact",
]

log = structlog.get_logger("trainwarden")

#: Failure messages that may go out at once before the rate limit holds them back.
DEFAULT_BURST = 3
#: One more failure message is allowed per this many seconds.
DEFAULT_REFILL_SECONDS = 600.0
#: Messages waiting for the worker; beyond it they are dropped (and counted).
DEFAULT_QUEUE_SIZE = 64
#: Upper bound on one delivery to all URLs, so close() is never held hostage.
DEFAULT_SEND_TIMEOUT = 20.0


class Severity(str, enum.Enum):
    """How a message should look; maps onto apprise's notify types."""

    INFO = "info"
    SUCCESS = "success"
    WARNING = "warning"
    FAILURE = "failure"


@dataclass(frozen=True)
class Message:
    """One notification: which journal event caused it, and what it says."""

    event: str
    title: str
    body: str
    severity: Severity


class Sender(Protocol):
    """Delivers one message; returns whether every service took it. May block; may raise."""

    def send(self, message: Message) -> bool: ...


def redact(url: str) -> str:
    """Name a notification URL without its secrets (apprise's privacy form, no query)."""
    scheme = url.split("://", 1)[0] if "://" in url else "?"
    try:
        import apprise  # noqa: PLC0415 - deferred: only a run with `notify:` needs it

        plugin = apprise.Apprise.instantiate(url)
        # apprise's url() is untyped; privacy=True masks passwords and tokens.
        shown = str(plugin.url(privacy=True)) if plugin is not None else ""  # type: ignore[no-untyped-call]
    except Exception:  # naming a URL must never fail
        shown = ""
    return shown.split("?", 1)[0] if shown else f"{scheme}://…"


class AppriseSender:
    """Send through apprise to every configured URL."""

    def __init__(self, urls: Sequence[str], *, timeout: float = DEFAULT_SEND_TIMEOUT) -> None:
        import apprise  # noqa: PLC0415 - deferred: only a run with `notify:` needs it

        self._apprise = apprise.Apprise()
        self._types = {
            Severity.INFO: apprise.NotifyType.INFO,
            Severity.SUCCESS: apprise.NotifyType.SUCCESS,
            Severity.WARNING: apprise.NotifyType.WARNING,
            Severity.FAILURE: apprise.NotifyType.FAILURE,
        }
        self._timeout = timeout
        self.services: list[str] = []
        for url in urls:
            if self._apprise.add(url):
                self.services.append(redact(url))
            else:
                log.warning("notify_url_invalid", url=redact(url))

    def send(self, message: Message) -> bool:
        if not self.services:
            return False
        return bool(
            self._apprise.notify(
                body=message.body,
                title=message.title,
                notify_type=self._types[message.severity],
                timeout=self._timeout,
            )
        )


class _TokenBucket:
    def __init__(self, burst: int, refill_seconds: float, now: float) -> None:
        self.capacity = float(burst)
        self.tokens = float(burst)
        self.rate = 1.0 / refill_seconds if refill_seconds > 0 else float("inf")
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


_STOP = object()


class Alerts:
    """Notify on chosen journal events from a worker thread, rate-limited (see module doc)."""

    def __init__(
        self,
        config: NotifyConfig,
        *,
        job: str,
        sender: Sender | None = None,
        burst: int = DEFAULT_BURST,
        refill_seconds: float = DEFAULT_REFILL_SECONDS,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job = job
        self.on: frozenset[str] = frozenset(config.on)
        self._sender: Sender = sender if sender is not None else AppriseSender(config.urls)
        self._clock = clock
        self._bucket = _TokenBucket(burst, refill_seconds, clock())
        self._held_back: Counter[str] = Counter()
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._closed = False
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._worker = threading.Thread(target=self._run, name="trainwarden-alerts", daemon=True)
        self._worker.start()

    # --- caller side (the loop's thread) ---------------------------------------------

    def record(self, event: str, attempt: int, fields: Mapping[str, object]) -> bool:
        """Consider one journal record; queue a message if it is wanted. Never blocks.

        Returns whether a message was queued.
        """
        if self._closed or event not in self.on:
            return False
        if event == "failure":
            kind = str(fields.get("kind") or "crash")
            if not self._bucket.take(self._clock()):
                self._held_back[kind] += 1
                log.info("notify_held_back", kind=kind, held=self.held_back)
                return False
            message = self._failure(attempt, kind, fields)
        elif event == "gave_up":
            message = self._gave_up(attempt, fields)
        elif event == "completed":
            message = self._completed(attempt, fields)
        else:
            return False
        return self.send(message)

    def send(self, message: Message) -> bool:
        """Queue ``message`` for the worker at once; False if closed or the queue is full."""
        if self._closed:
            return False
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self.dropped += 1
            log.warning("notify_dropped", notification=message.event, reason="queue full")
            return False
        return True

    @property
    def held_back(self) -> int:
        """Failures not sent because of the rate limit and not yet summarised."""
        return sum(self._held_back.values())

    def close(self, timeout: float = 10.0) -> bool:
        """Send what is queued, stop the worker and join it; True if it finished in time."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_STOP)
        self._worker.join(timeout)
        if self._worker.is_alive():
            log.warning("notify_close_timeout", timeout=timeout, queued=self._queue.qsize())
            return False
        return True

    # --- messages --------------------------------------------------------------------

    def _summary(self) -> str:
        if not self._held_back:
            return ""
        kinds = ", ".join(f"{n} {kind}" for kind, n in self._held_back.most_common())
        count = self.held_back
        self._held_back.clear()
        noun = "failure" if count == 1 else "failures"
        return f"\nAnd {count} more {noun} not sent (rate limit): {kinds}."

    def _failure(self, attempt: int, kind: str, fields: Mapping[str, object]) -> Message:
        step = fields.get("step")
        where = f" at step {step}" if step is not None else ""
        evidence = fields.get("evidence") or "no evidence recorded"
        in_a_row = fields.get("failures_in_a_row")
        body = f"Attempt {attempt} failed{where}: {evidence}."
        if isinstance(in_a_row, int) and in_a_row > 1:
            body += f" {in_a_row} failures in a row."
        body += " trainwarden is restarting it." + self._summary()
        return Message("failure", f"trainwarden {self.job}: {kind}{where}", body, Severity.WARNING)

    def _gave_up(self, attempt: int, fields: Mapping[str, object]) -> Message:
        reason = fields.get("reason") or "no reason recorded"
        code = fields.get("exit_code")
        body = f"Gave up in attempt {attempt}: {reason}."
        if code is not None:
            body += f" Supervisor exit code {code}."
        body += " Nothing restarts it until someone looks." + self._summary()
        return Message("gave_up", f"trainwarden {self.job}: gave up", body, Severity.FAILURE)

    def _completed(self, attempt: int, fields: Mapping[str, object]) -> Message:
        step = fields.get("step")
        restarts = fields.get("restarts")
        body = f"Completed in attempt {attempt}"
        if step is not None:
            body += f" at step {step}"
        if isinstance(restarts, int):
            body += f" after {restarts} {'restart' if restarts == 1 else 'restarts'}"
        body += "." + self._summary()
        return Message("completed", f"trainwarden {self.job}: completed", body, Severity.SUCCESS)

    # --- worker ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            assert isinstance(item, Message)
            try:
                ok = self._sender.send(item)
            except Exception as exc:  # a notifier must never take the loop down
                log.warning(
                    "notify_failed", notification=item.event, error=f"{type(exc).__name__}: {exc}"
                )
                self.failed += 1
                continue
            if ok:
                self.sent += 1
                log.info("notify_sent", notification=item.event)
            else:
                self.failed += 1
                log.warning("notify_failed", notification=item.event, error="not delivered")
