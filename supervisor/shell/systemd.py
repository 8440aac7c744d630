"""Talk to systemd's service manager with the sd_notify datagram protocol.

No libsystemd: the protocol is one datagram of newline-separated ``KEY=VALUE``
lines sent to the unix socket named in ``$NOTIFY_SOCKET`` (a filesystem path, or an
abstract socket written with a leading ``@``). The manager learns who sent it from
the kernel-attached credentials, so nothing else is needed. Outside systemd the
variable is unset and every call is a no-op, so the supervisor runs the same in a
terminal.

The supervisor sends ``READY=1`` once the config is valid and the lock is held,
``STATUS=`` lines for ``systemctl status``, ``WATCHDOG=1`` from its main loop only
(so a wedged loop stops pinging and systemd restarts it) and ``STOPPING=1``.

Sending never raises: losing a status line must not take down a training run. The
first failure is logged, later ones are silent so a vanished socket cannot flood
the journal at the watchdog rate.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import structlog

__all__ = [
    "NOTIFY_ENV_VARS",
    "Notifier",
    "SystemdNotifier",
    "child_environment",
]

log = structlog.get_logger(__name__)

# The variables systemd hands the main process. The training child must not
# inherit them: with NotifyAccess=main its messages would be dropped anyway, but a
# library inside it that speaks sd_notify would log "refused" noise on every step,
# and a child pinging WATCHDOG=1 would keep a wedged supervisor alive under
# NotifyAccess=all.
NOTIFY_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def child_environment(env: Mapping[str, str]) -> dict[str, str]:
    """Return ``env`` without the sd_notify variables, for the training child."""
    return {key: value for key, value in env.items() if key not in NOTIFY_ENV_VARS}


class Notifier(Protocol):
    """What the main loop tells the service manager; a terminal run ignores it all."""

    def ready(self) -> None:
        """Say startup is over: config valid, lock held. Type=notify waits for this."""

    def status(self, text: str) -> None:
        """Set the one-line status ``systemctl status`` shows."""

    def watchdog(self) -> None:
        """Prove the main loop is alive; cheap to call every iteration."""

    def watchdog_interval(self) -> float | None:
        """Return how often (seconds) the loop must call ``watchdog()``, or None if unarmed."""

    def stopping(self) -> None:
        """Say a clean shutdown has begun."""

    def extend_timeout(self, seconds: float) -> None:
        """Ask for ``seconds`` more before the current start/stop timeout fires."""


def _socket_address(raw: str) -> str | bytes | None:
    """Turn ``$NOTIFY_SOCKET`` into an ``AF_UNIX`` address, or None if unusable.

    A leading ``@`` names a Linux abstract socket, whose address starts with NUL.
    Anything else that is not an absolute path (systemd >= 254 also allows
    ``vsock:``) is not something a supervisor on the same host needs.
    """
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None


def usec(seconds: float) -> int:
    return max(0, round(seconds * 1_000_000))


def one_line(text: str) -> str:
    # A newline would end the STATUS= assignment and start a bogus one.
    return " ".join(text.splitlines())


class SystemdNotifier:
    """Send sd_notify messages to ``$NOTIFY_SOCKET``; do nothing when it is unset.

    The environment, PID and clock are injectable so tests can drive the watchdog
    rate limit without sleeping and point the notifier at their own socket.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        pid: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        environ = os.environ if env is None else env
        self._pid = os.getpid() if pid is None else pid
        self._clock = clock
        raw_socket = environ.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(raw_socket) if raw_socket else None
        self._failed = False
        if raw_socket and self._address is None:
            log.warning("sd_notify_unsupported_socket", notify_socket=raw_socket)
        # No socket, no one to ping: the loop need not wake up for the watchdog.
        self._ping_every = self._ping_interval(environ) if self._address else None
        self._last_ping: float | None = None

    def _ping_interval(self, environ: Mapping[str, str]) -> float | None:
        """Half of WatchdogSec, as sd_watchdog_enabled(3) advises, if it is meant for us.

        WATCHDOG_PID names the process the watchdog was armed for; a supervisor that
        inherited the variables from a parent (e.g. started by another service's
        script) must not ping on that parent's behalf.
        """
        usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        try:
            timeout_usec = int(usec)
            if watchdog_pid and int(watchdog_pid) != self._pid:
                return None
        except ValueError:
            return None
        if timeout_usec <= 0:
            return None
        return timeout_usec / 2_000_000

    @property
    def enabled(self) -> bool:
        """Whether a service manager is listening at all."""
        return self._address is not None

    def ready(self) -> None:
        """Send READY=1 with our PID, so the manager trusts us as the main process."""
        self._send(f"READY=1\nMAINPID={self._pid}")

    def status(self, text: str) -> None:
        """Send STATUS= with ``text`` folded onto one line."""
        self._send(f"STATUS={one_line(text)}")

    def watchdog(self) -> None:
        """Send WATCHDOG=1 at most once per half watchdog period.

        The loop may call this every iteration; the rate limit keeps a busy loop
        from sending hundreds of datagrams a second.
        """
        if self._ping_every is None:
            return
        now = self._clock()
        if self._last_ping is not None and now - self._last_ping < self._ping_every:
            return
        self._last_ping = now
        self._send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Return half of WatchdogSec in seconds, or None when no watchdog is armed for us."""
        return self._ping_every

    def stopping(self) -> None:
        """Send STOPPING=1."""
        self._send("STOPPING=1")

    def extend_timeout(self, seconds: float) -> None:
        """Send EXTEND_TIMEOUT_USEC=, e.g. while an emergency checkpoint is written."""
        self._send(f"EXTEND_TIMEOUT_USEC={usec(seconds)}")

    def _send(self, message: str) -> None:
        if self._address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode(), self._address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning(
                    "sd_notify_failed",
                    message=message.split("\n", 1)[0],
                    error=str(exc),
                    errno=exc.errno,
                )
