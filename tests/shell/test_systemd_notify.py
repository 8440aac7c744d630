"""The sd_notify datagram protocol, checked against real unix datagram sockets."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.shell.systemd import (
    Notifier,
    SystemdNotifier,
    child_environment,
)
from supervisor.shell.testing import FakeNotifier


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Listener:
    """A bound datagram socket standing in for systemd's notify socket."""

    def __init__(self, sock: socket.socket, notify_socket: str) -> None:
        self.sock = sock
        self.notify_socket = notify_socket

    def receive_all(self) -> list[str]:
        """Return every datagram waiting, oldest first, without blocking."""
        messages: list[str] = []
        while True:
            try:
                data = self.sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return messages
            messages.append(data.decode())


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Listener]:
    """Yield a listener on a filesystem socket and on an abstract '@' socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        path = tmp_path / "notify.sock"
        sock.bind(str(path))
        notify_socket = str(path)
    else:
        name = f"trainwarden-test-{uuid.uuid4().hex}"
        sock.bind(b"\0" + name.encode())
        notify_socket = "@" + name
    with sock:
        yield Listener(sock, notify_socket)


def test_ready_sends_ready_and_mainpid(listener: Listener) -> None:
    """READY=1 goes out with MAINPID so the manager knows who the main process is."""
    notifier = SystemdNotifier({"NOTIFY_SOCKET": listener.notify_socket}, pid=1234)
    notifier.ready()
    assert listener.receive_all() == ["READY=1\nMAINPID=1234"]


def test_every_message_has_its_exact_payload(listener: Listener) -> None:
    """Each call sends one datagram with the documented assignment."""
    notifier = SystemdNotifier({"NOTIFY_SOCKET": listener.notify_socket}, pid=7)
    notifier.status("step 1200/5000, last checkpoint 1000, 2 restarts")
    notifier.stopping()
    notifier.extend_timeout(90)
    notifier.extend_timeout(1.5)
    assert listener.receive_all() == [
        "STATUS=step 1200/5000, last checkpoint 1000, 2 restarts",
        "STOPPING=1",
        "EXTEND_TIMEOUT_USEC=90000000",
        "EXTEND_TIMEOUT_USEC=1500000",
    ]


def test_status_is_folded_onto_one_line(listener: Listener) -> None:
    """A newline in STATUS= would start a bogus assignment, so it becomes a space."""
    notifier = SystemdNotifier({"NOTIFY_SOCKET": listener.notify_socket})
    notifier.status("waiting for disk\nREADY=1")
    assert listener.receive_all() == ["STATUS=waiting for disk READY=1"]


def test_watchdog_is_rate_limited_to_half_the_period(listener: Listener) -> None:
    """WATCHDOG=1 goes out at most once per WATCHDOG_USEC/2, the first one at once."""
    clock = FakeClock()
    env = {"NOTIFY_SOCKET": listener.notify_socket, "WATCHDOG_USEC": "10000000"}
    notifier = SystemdNotifier(env, pid=99, clock=clock)
    assert notifier.watchdog_interval() == 5.0

    notifier.watchdog()
    assert listener.receive_all() == ["WATCHDOG=1"]
    clock.now += 4.9
    notifier.watchdog()
    notifier.watchdog()
    assert listener.receive_all() == []
    clock.now += 0.1
    notifier.watchdog()
    assert listener.receive_all() == ["WATCHDOG=1"]
    clock.now += 1.0
    notifier.watchdog()
    assert listener.receive_all() == []


def test_watchdog_pings_when_watchdog_pid_is_ours(listener: Listener) -> None:
    """WATCHDOG_PID naming this process arms the watchdog."""
    env = {
        "NOTIFY_SOCKET": listener.notify_socket,
        "WATCHDOG_USEC": "2000000",
        "WATCHDOG_PID": "99",
    }
    notifier = SystemdNotifier(env, pid=99, clock=FakeClock())
    assert notifier.watchdog_interval() == 1.0
    notifier.watchdog()
    assert listener.receive_all() == ["WATCHDOG=1"]


def test_watchdog_pid_mismatch_means_no_pings(listener: Listener) -> None:
    """A watchdog armed for another PID (an inherited environment) is not ours to feed."""
    env = {
        "NOTIFY_SOCKET": listener.notify_socket,
        "WATCHDOG_USEC": "2000000",
        "WATCHDOG_PID": "98",
    }
    notifier = SystemdNotifier(env, pid=99, clock=FakeClock())
    assert notifier.watchdog_interval() is None
    notifier.watchdog()
    notifier.status("still talking")
    assert listener.receive_all() == ["STATUS=still talking"]


@pytest.mark.parametrize("usec", ["", "0", "soon"])
def test_no_watchdog_without_a_valid_period(listener: Listener, usec: str) -> None:
    """Without a positive WATCHDOG_USEC no watchdog is armed and nothing is pinged."""
    env = {"NOTIFY_SOCKET": listener.notify_socket, "WATCHDOG_USEC": usec}
    notifier = SystemdNotifier(env, clock=FakeClock())
    assert notifier.watchdog_interval() is None
    notifier.watchdog()
    assert listener.receive_all() == []


def test_everything_is_a_noop_without_notify_socket(listener: Listener) -> None:
    """Outside systemd nothing is sent, nothing raises, and no watchdog is armed."""
    notifier = SystemdNotifier({"WATCHDOG_USEC": "2000000"}, pid=1)
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    notifier.ready()
    notifier.status("x")
    notifier.watchdog()
    notifier.stopping()
    notifier.extend_timeout(1)
    assert listener.receive_all() == []


def test_reads_os_environ_by_default(listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no env given, the notifier reads the process environment and our PID."""
    monkeypatch.setenv("NOTIFY_SOCKET", listener.notify_socket)
    SystemdNotifier().ready()
    assert listener.receive_all() == [f"READY=1\nMAINPID={os.getpid()}"]


def test_send_failure_never_raises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A vanished socket is logged once and otherwise ignored."""
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    notifier.ready()
    notifier.status("a")
    notifier.stopping()
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("sd_notify_failed") == 1


def test_unsupported_socket_address_is_a_noop() -> None:
    """A relative or vsock address is refused up front instead of failing every send."""
    notifier = SystemdNotifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    notifier.ready()


def test_child_environment_drops_notify_variables() -> None:
    """The training child never sees the supervisor's notify socket or watchdog."""
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "2", "HF_HOME": "/c"}
    assert child_environment(env) == {"HF_HOME": "/c"}


def test_fake_notifier_records_exactly_what_the_real_one_sends(listener: Listener) -> None:
    """For the same calls, FakeNotifier records the very datagrams SystemdNotifier sends."""
    env = {"NOTIFY_SOCKET": listener.notify_socket, "WATCHDOG_USEC": "5000000"}
    real = SystemdNotifier(env, pid=5, clock=FakeClock())
    fake = FakeNotifier(watchdog_interval=real.watchdog_interval(), pid=5)
    notifiers: list[Notifier] = [real, fake]
    for notifier in notifiers:
        notifier.ready()
        notifier.status("step 1/2\nsecond line")
        notifier.watchdog()
        notifier.extend_timeout(2)
        notifier.stopping()
    sent = listener.receive_all()
    assert sent == fake.messages
    assert sent[1] == "STATUS=step 1/2 second line"
    assert fake.statuses == ["step 1/2 second line"]
    assert fake.pings == 1
    assert fake.watchdog_interval() == real.watchdog_interval() == 2.5
