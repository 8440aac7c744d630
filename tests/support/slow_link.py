"""A thin uplink for tests: a TCP relay on loopback whose client-to-server bytes trickle.

``python -m tests.support.slow_link LISTEN_PORT TARGET_PORT BYTES_PER_SECOND`` relays
every connection to ``127.0.0.1:TARGET_PORT`` unchanged; the bytes the clients
send share one budget of ``BYTES_PER_SECOND`` (a slow uplink, as from a VM with
little egress), replies pass at full speed. Nothing is faked: the bytes are the
real S3 requests, the server behind is real; only the link is slow, so an upload
of a few hundred KiB takes seconds and a test can kill its sender mid-way.
``slow_link`` runs one as a process for the duration of a block, stopped by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.processes import REPO_ROOT, wait_for

__all__ = ["slow_link"]

CHUNK = 4096
READY = "listening"


class Budget:
    """Bytes per second shared by every connection of the link."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.free_at = time.monotonic()

    async def take(self, count: int) -> None:
        now = time.monotonic()
        start = max(now, self.free_at)
        self.free_at = start + count / self.rate
        await asyncio.sleep(self.free_at - now)


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, budget: Budget | None
) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(CHUNK):
            if budget is not None:
                await budget.take(len(data))
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(ConnectionError, OSError):
        writer.close()


async def _serve(listen: int, target: int, rate: float) -> None:
    budget = Budget(rate)

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pump(client_r, server_w, budget), _pump(server_r, client_w, None))

    server = await asyncio.start_server(relay, "127.0.0.1", listen)
    print(READY, flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    listen, target, rate = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    asyncio.run(_serve(listen, target, rate))


@contextlib.contextmanager
def slow_link(listen: int, target: int, rate: float, log_path: Path) -> Iterator[int]:
    """Run a link from ``listen`` to ``target`` at ``rate`` bytes/s uplink; yield ``listen``."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.slow_link", str(listen), str(target), str(rate)],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: READY in log_path.read_text() or proc.poll() is not None,
            30,
            what="the slow link to listen",
        )
        assert proc.poll() is None, log_path.read_text()
        yield listen
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
