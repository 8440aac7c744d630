"""The preemption-notice poller against a STAND-IN metadata server on loopback.

``MetadataStandIn`` is not AWS's or GCP's metadata service: it is a small HTTP
server on 127.0.0.1 that answers the documented requests the way they are
documented to be answered (IMDSv2 tokens, 404 until a spot interruption is
scheduled, ``Metadata-Flavor: Google`` required, ``FALSE``/``TRUE``). It proves
the poller speaks that protocol; it cannot prove the clouds still do.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator

import pytest

from supervisor.shell.preemption_notice import (
    AwsToken,
    NoticePoller,
    NoticeUnavailable,
    PreemptionNotice,
    Provider,
    check_notice,
)
from tests.support.metadata import MetadataStandIn
from tests.support.processes import wait_for
from tests.support.seaweed import free_ports


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


def test_a_passing_token_failure_is_retried_not_taken_for_imdsv1(standin: MetadataStandIn) -> None:
    """A 503 from the token endpoint is one unanswered poll; the next one gets a token."""
    token = AwsToken()
    standin.token_outages = 1
    with pytest.raises(NoticeUnavailable, match="HTTP 503"):
        check_notice(Provider.AWS, standin.url, token=token)
    assert not token.v1_only
    standin.aws_action = {"action": "terminate", "time": "2026-11-28T08:22:00Z"}
    notice = check_notice(Provider.AWS, standin.url, token=token)
    assert notice is not None
    assert notice.action == "terminate"
    assert standin.token_requests == 1


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
