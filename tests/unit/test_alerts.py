"""Alerts with a scripted sender and clock: which records notify, and the rate limit."""

from __future__ import annotations

from supervisor.config import NotifyConfig
from supervisor.shell.notify import Alerts, redact
from supervisor.shell.testing import FakeSender


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(sender: FakeSender, clock: Clock, **kwargs: object) -> Alerts:
    config = NotifyConfig(urls=["json://unused/"], **kwargs)
    return Alerts(config, job="demo", sender=sender, burst=2, refill_seconds=60, clock=clock)


def test_the_rate_limit_refills_and_the_next_message_counts_what_was_held() -> None:
    """After the burst, failures are held back until a token refills; then they are counted."""
    sender, clock = FakeSender(), Clock()
    alerts = make(sender, clock)
    for _ in range(4):
        alerts.record("failure", 1, {"kind": "crash"})
    assert alerts.held_back == 2
    clock.now = 61.0
    alerts.record("failure", 2, {"kind": "hang", "step": 9})
    assert alerts.close()
    assert len(sender.messages) == 3
    assert "And 2 more failures not sent (rate limit): 2 crash." in sender.messages[-1].body
    assert sender.messages[-1].title == "trainwarden demo: hang at step 9"
    assert alerts.held_back == 0


def test_only_chosen_events_notify() -> None:
    """`on: [gave_up]` ignores failures and completion, and other journal events always."""
    sender, clock = FakeSender(), Clock()
    alerts = make(sender, clock, on=["gave_up"])
    assert not alerts.record("failure", 1, {"kind": "crash"})
    assert not alerts.record("completed", 1, {})
    assert not alerts.record("checkpoint_committed", 1, {"step": 5})
    assert alerts.record("gave_up", 1, {"reason": "no progress"})
    assert alerts.close()
    assert [m.event for m in sender.messages] == ["gave_up"]


def test_a_raising_sender_does_not_stop_the_worker() -> None:
    """A sender that raises is logged and counted; later messages are still tried."""
    sender, clock = FakeSender(RuntimeError("boom")), Clock()
    alerts = make(sender, clock)
    alerts.record("failure", 1, {"kind": "crash"})
    alerts.record("gave_up", 1, {"reason": "budget"})
    assert alerts.close()
    assert len(sender.messages) == 2
    assert alerts.failed == 2


def test_after_close_nothing_is_queued() -> None:
    """A closed Alerts refuses new messages instead of queueing them for nobody."""
    sender, clock = FakeSender(), Clock()
    alerts = make(sender, clock)
    assert alerts.close()
    assert not alerts.record("gave_up", 1, {"reason": "x"})


def test_urls_are_named_without_their_secrets() -> None:
    """Logs show a URL's service and host, never its password or token."""
    assert "secret" not in redact("json://user:secret@127.0.0.1:8080/hook?token=abc")
    assert "abc" not in redact("json://user:secret@127.0.0.1:8080/hook?token=abc")
    assert "ABCdefGHIjklMNOpqr" not in redact("tgram://123456789:ABCdefGHIjklMNOpqr/12345/")
    assert redact("nonsense-without-scheme") == "?://…"
