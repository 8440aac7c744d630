"""Signal handlers only enqueue, wake a blocked loop, and can be put back."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from supervisor.shell import signals


@dataclass(frozen=True)
class Received:
    """Stand-in for model.SignalReceived."""

    name: str


@pytest.fixture
def restore_handlers() -> Iterator[None]:
    """Put the test process's own handlers back whatever happens."""
    saved = {sig: signal.getsignal(sig) for sig in signals.HANDLED}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.usefixtures("restore_handlers")
def test_each_signal_becomes_one_event_on_the_queue() -> None:
    """SIGTERM, SIGINT and SIGHUP each put exactly one event named after the signal."""
    events: queue.SimpleQueue[object] = queue.SimpleQueue()
    restore = signals.install(events.put, Received)
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.raise_signal(sig)
    finally:
        restore()
    got = [events.get_nowait() for _ in range(3)]
    assert got == [Received("SIGTERM"), Received("SIGINT"), Received("SIGHUP")]
    assert events.empty()


@pytest.mark.usefixtures("restore_handlers")
def test_restore_puts_previous_handlers_back() -> None:
    """restore() reinstates exactly the handlers that were there before install()."""

    def sentinel(signum: int, frame: object) -> None:
        raise AssertionError("not expected to run")

    signal.signal(signal.SIGHUP, sentinel)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    before = {sig: signal.getsignal(sig) for sig in signals.HANDLED}
    restore = signals.install(lambda item: None, Received)
    assert all(signal.getsignal(sig) is not before[sig] for sig in signals.HANDLED)
    restore()
    assert {sig: signal.getsignal(sig) for sig in signals.HANDLED} == before


@pytest.mark.usefixtures("restore_handlers")
def test_signal_wakes_a_loop_blocked_on_the_queue() -> None:
    """A loop blocked in SimpleQueue.get(timeout) returns the signal's event at once."""
    events: queue.SimpleQueue[object] = queue.SimpleQueue()
    restore = signals.install(events.put, Received)
    sender = threading.Timer(0.2, os.kill, args=(os.getpid(), signal.SIGTERM))
    try:
        sender.start()
        started = time.monotonic()
        got = events.get(timeout=10)
        waited = time.monotonic() - started
    finally:
        sender.cancel()
        sender.join()
        restore()
    assert got == Received("SIGTERM")
    assert waited < 5.0
