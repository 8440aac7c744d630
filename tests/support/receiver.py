"""A webhook receiver on loopback: what a chat service would get from ``notify:``."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["Receiver"]


class Receiver:
    """A tiny JSON webhook: records every POST; ``gate`` can hold the answer back."""

    def __init__(self) -> None:
        self.messages: list[dict[str, object]] = []
        #: Wall time (time.time()) each message arrived, in order.
        self.arrivals: list[float] = []
        self.arrived = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.messages.append(json.loads(body))
                receiver.arrivals.append(time.time())
                receiver.arrived.set()
                receiver.gate.wait(30)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="test-receiver")
        self.thread.start()

    @property
    def url(self) -> str:
        return f"json://127.0.0.1:{self.server.server_address[1]}/"

    def stop(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
