"""Notifications through apprise to a real HTTP receiver on loopback."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from supervisor.config import NotifyConfig
from supervisor.shell.notify import Alerts
from tests.support.receiver import Receiver

REASON = "restart budget spent: 20 restarts within 3600s (restart.max_restarts)"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    try:
        yield running
    finally:
        running.stop()


def alerts_for(url: str, **kwargs: object) -> Alerts:
    return Alerts(NotifyConfig(urls=[url]), job="demo", **kwargs)  # type: ignore[arg-type]


def test_give_up_sends_one_message_naming_the_reason(receiver: Receiver) -> None:
    """One gave_up record is one message, of failure type, that says why."""
    alerts = alerts_for(receiver.url)
    assert alerts.record("gave_up", 4, {"kind": "crash", "reason": REASON, "exit_code": 76})
    assert alerts.close(timeout=30)
    assert len(receiver.messages) == 1
    (message,) = receiver.messages
    assert message["type"] == "failure"
    assert "gave up" in str(message["title"])
    assert REASON in str(message["message"])
    assert alerts.sent == 1


def test_crash_loop_sends_at_most_the_rate_limit(receiver: Receiver) -> None:
    """Ten failures in a row send `burst` messages; the give-up counts the rest."""
    alerts = alerts_for(receiver.url, burst=3, refill_seconds=3600)
    queued = [
        alerts.record(
            "failure",
            attempt,
            {"kind": "crash", "step": 7, "evidence": "killed by SIGKILL"},
        )
        for attempt in range(1, 11)
    ]
    assert queued == [True] * 3 + [False] * 7
    alerts.record("gave_up", 10, {"reason": REASON, "exit_code": 76})
    assert alerts.close(timeout=60)
    titles = [str(m["title"]) for m in receiver.messages]
    assert len([t for t in titles if "crash" in t]) == 3
    assert len(receiver.messages) == 4
    assert "And 7 more failures not sent (rate limit): 7 crash." in str(
        receiver.messages[-1]["message"]
    )


def test_slow_receiver_does_not_block_the_caller(receiver: Receiver) -> None:
    """While the worker waits on a receiver that has not answered, record() still returns."""
    receiver.gate.clear()  # the receiver accepts the request and sits on it
    alerts = alerts_for(receiver.url)
    assert alerts.record("failure", 1, {"kind": "crash", "step": 3})
    assert receiver.arrived.wait(30)  # the worker is inside the send now
    # The delivery is in flight and unanswered, yet the loop can go on recording.
    assert not receiver.gate.is_set()
    assert alerts.record("failure", 2, {"kind": "hang", "step": 4})
    assert alerts.record("completed", 3, {"step": 10, "restarts": 2})
    receiver.gate.set()
    assert alerts.close(timeout=60)
    assert len(receiver.messages) == 3
    assert receiver.messages[-1]["type"] == "success"


def test_receiver_down_costs_the_caller_nothing() -> None:
    """Nothing listening: record() queues and returns, the worker logs the failure."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    alerts = alerts_for(f"json://127.0.0.1:{port}/")
    assert alerts.record("gave_up", 1, {"reason": REASON})
    assert alerts.record("completed", 1, {"step": 1})
    assert alerts.close(timeout=60)
    assert (alerts.sent, alerts.failed) == (0, 2)
