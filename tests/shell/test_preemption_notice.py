"""The preemption-notice poller against a STAND-IN metadata server on loopback.

``MetadataStandIn`` is not AWS's or GCP's metadata service: it is a small HTTP
server on 127.0.0.1 that answers the documented requests the way they are
documented to be answered (IMDSv2 tokens, 404 until a spot interruption is
scheduled, ``Metadata-Flavor: Google`` required, ``FALSE``/``TRUE``). It proves
the poller speaks that protocol; it cannot prove the clouds still do.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from supervisor.shell.preemption_notice import (
    AwsToken,
    NoticePoller,
    NoticeUnavailable,
    PreemptionNotice,
    Provider,
    check_notice,
)
from tests.support.processes import wait_for
from tests.support.seaweed import free_ports


class MetadataStandIn:
    """A loopback stand-in for the AWS (IMDSv2) and GCP metadata endpoints the poller uses."""

    def __init__(self, *, imds_v2: bool = True) -> None:
        self.imds_v2 = imds_v2
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


@pytest.fixture
def standin() -> Iterator[MetadataStandIn]:
    server = MetadataStandIn().start()
    try:
        yield server
    finally:
        server.close()


def test_aws_spot_interruption_is_reported_once(standin: MetadataStandIn) -> None:
    """404 while nothing is scheduled; the scheduled action (with its time) is reported once."""
    notices: queue.SimpleQueue[PreemptionNotice] = queue.SimpleQueue()
    poller = NoticePoller(Provider.AWS, notices.put, base_url=standin.url, interval=0.02)
    poller.start()
    try:
        wait_for(lambda: standin.action_requests >= 3, timeout=10, what="three quiet polls")
        assert notices.empty()
        standin.aws_action = {"action": "terminate", "time": "2026-11-28T08:22:00Z"}
        notice = notices.get(timeout=10)
    finally:
        assert poller.close()
    assert notice.provider is Provider.AWS
    assert notice.action == "terminate"
    assert notice.deadline_wall_time == 1795854120.0
    assert poller.notice == notice
    assert standin.token_requests == 1  # one IMDSv2 token serves every poll
    assert standin.bad_requests == []
    assert notices.empty()


def test_aws_expired_token_is_renewed(standin: MetadataStandIn) -> None:
    """A revoked IMDSv2 token (401) is replaced by a fresh one and the poll answered."""
    token = AwsToken()
    assert check_notice(Provider.AWS, standin.url, token=token) is None
    standin.tokens.clear()
    standin.aws_action = {"action": "stop", "time": "not a time"}
    notice = check_notice(Provider.AWS, standin.url, token=token)
    assert notice is not None
    assert (notice.action, notice.deadline_wall_time) == ("stop", None)
    assert standin.token_requests == 2


def test_aws_imdsv1_host_falls_back_to_plain_gets() -> None:
    """Where the token request is refused, the poller still reads instance-action."""
    server = MetadataStandIn(imds_v2=False).start()
    try:
        token = AwsToken()
        assert check_notice(Provider.AWS, server.url, token=token) is None
        server.aws_action = {"action": "hibernate", "time": "2026-11-28T08:22:00Z"}
        notice = check_notice(Provider.AWS, server.url, token=token)
    finally:
        server.close()
    assert token.v1_only
    assert notice is not None
    assert notice.action == "hibernate"


def test_gcp_preempted_flag_is_reported(standin: MetadataStandIn) -> None:
    """FALSE while running, TRUE once preemption began; every request says Metadata-Flavor."""
    notices: queue.SimpleQueue[PreemptionNotice] = queue.SimpleQueue()
    poller = NoticePoller(Provider.GCP, notices.put, base_url=standin.url, interval=0.02)
    poller.start()
    try:
        wait_for(lambda: standin.gcp_requests >= 3, timeout=10, what="three quiet polls")
        assert notices.empty()
        standin.gcp_preempted = True
        notice = notices.get(timeout=10)
    finally:
        assert poller.close()
    assert (notice.provider, notice.action, notice.deadline_wall_time) == (
        Provider.GCP,
        "preempted",
        None,
    )
    assert standin.bad_requests == []


def test_no_metadata_service_is_quiet_and_closes_promptly() -> None:
    """Nothing listening: check_notice says unavailable; the poller keeps trying, never notifies."""
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(NoticeUnavailable):
        check_notice(Provider.GCP, url, timeout=0.5)
    notices: queue.SimpleQueue[PreemptionNotice] = queue.SimpleQueue()
    poller = NoticePoller(Provider.AWS, notices.put, base_url=url, interval=0.02, timeout=0.5)
    poller.start()
    try:
        wait_for(lambda: poller.polls >= 3, timeout=10, what="three unanswered polls")
    finally:
        assert poller.close(timeout=5)
    assert notices.empty()
    assert poller.notice is None
