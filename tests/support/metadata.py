"""A STAND-IN for the AWS (IMDSv2) and GCP metadata endpoints, on loopback.

Not the clouds' services: a small HTTP server on 127.0.0.1 that answers the
documented requests the way they are documented to be answered (IMDSv2 tokens,
404 until a spot interruption is scheduled, ``Metadata-Flavor: Google``
required, ``FALSE``/``TRUE``). It proves trainwarden speaks that protocol; it
cannot prove the clouds still do.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer


class MetadataStandIn:
    """A loopback stand-in for the AWS (IMDSv2) and GCP metadata endpoints the poller uses."""

    def __init__(self, *, imds_v2: bool = True) -> None:
        self.imds_v2 = imds_v2
        #: Answer this many token requests with 503 first (throttling, a passing outage).
        self.token_outages = 0
        self.aws_action: dict[str, str] | None = None
        self.gcp_preempted = False
        self.tokens: set[str] = set()
        self.token_requests = 0
        self.action_requests = 0
        self.gcp_requests = 0
        self.bad_requests: list[str] = []
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, status: int, body: bytes = b"") -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:
                if self.path != "/latest/api/token" or not standin.imds_v2:
                    self._answer(403 if self.path == "/latest/api/token" else 404)
                    return
                if standin.token_outages > 0:
                    standin.token_outages -= 1
                    self._answer(503)
                    return
                if "X-aws-ec2-metadata-token-ttl-seconds" not in self.headers:
                    standin.bad_requests.append("token PUT without ttl header")
                    self._answer(400)
                    return
                standin.token_requests += 1
                token = f"token-{standin.token_requests}"
                standin.tokens.add(token)
                self._answer(200, token.encode())

            def do_GET(self) -> None:
                if self.path == "/latest/meta-data/spot/instance-action":
                    standin.action_requests += 1
                    token = self.headers.get("X-aws-ec2-metadata-token")
                    if standin.imds_v2 and token not in standin.tokens:
                        self._answer(401)
                        return
                    if standin.aws_action is None:
                        self._answer(404)
                        return
                    self._answer(200, json.dumps(standin.aws_action).encode())
                elif self.path == "/computeMetadata/v1/instance/preempted":
                    standin.gcp_requests += 1
                    if self.headers.get("Metadata-Flavor") != "Google":
                        standin.bad_requests.append("GCP request without Metadata-Flavor")
                        self._answer(403)
                        return
                    self._answer(200, b"TRUE" if standin.gcp_preempted else b"FALSE")
                else:
                    self._answer(404)

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, name="standin"
        )

    def start(self) -> MetadataStandIn:
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> MetadataStandIn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
