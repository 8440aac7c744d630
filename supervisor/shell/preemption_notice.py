"""Poll the cloud's preemption notice, so the emergency save starts before SIGTERM arrives.

Spot and preemptible VMs are warned before they are taken: AWS two minutes ahead
through the instance metadata (``spot/instance-action``), GCP about 30 seconds
ahead (``instance/preempted`` turns ``TRUE``). The SIGTERM that trainwarden
already handles comes later or, on AWS, not at all before the power goes. A
``NoticePoller`` watches the metadata service and reports the notice once, by
calling ``notify`` (which must only enqueue, like every handler of the loop); the
loop then starts the preemption path early.

Endpoints (the real ones; tests point ``base_url`` at a stand-in HTTP server on
loopback, never at these):

- AWS, IMDSv2: ``PUT /latest/api/token`` (header
  ``X-aws-ec2-metadata-token-ttl-seconds``) gives a token; ``GET
  /latest/meta-data/spot/instance-action`` with ``X-aws-ec2-metadata-token`` answers
  404 until an interruption is scheduled, then ``{"action": "terminate"|"stop"|
  "hibernate", "time": "2026-11-28T08:22:00Z"}``. A token request refused (IMDSv1-only
  hosts) falls back to plain GETs.
- GCP: ``GET /computeMetadata/v1/instance/preempted`` with ``Metadata-Flavor:
  Google`` answers ``FALSE``, then ``TRUE`` once preemption has begun.

A metadata service that does not answer (not on that cloud, or blocked) is not an
error: the poller keeps trying quietly at its interval and says so once in the log.
"""

from __future__ import annotations

import enum
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import structlog

__all__ = [
    "AWS_METADATA_URL",
    "GCP_METADATA_URL",
    "AwsToken",
    "NoticePoller",
    "NoticeStarter",
    "NoticeUnavailable",
    "NoticeWatch",
    "PreemptionNotice",
    "Provider",
    "check_notice",
]

log = structlog.get_logger()

AWS_METADATA_URL = "http://169.254.169.254"
GCP_METADATA_URL = "http://metadata.google.internal"
#: IMDSv2 token lifetime asked for; the poller renews it well before it ends.
AWS_TOKEN_TTL_SECONDS = 21600
_AWS_TOKEN_PATH = "/latest/api/token"  # noqa: S105 - a URL path, not a secret
_AWS_ACTION_PATH = "/latest/meta-data/spot/instance-action"
_GCP_PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
_HTTP_NOT_FOUND = 404
_HTTP_UNAUTHORIZED = 401
#: Answers to the token request that mean "no IMDSv2 here" (anything else is passing).
_NO_TOKEN_ENDPOINT = frozenset({403, 404, 405})


class Provider(enum.Enum):
    """Whose metadata service to poll."""

    AWS = "aws"
    GCP = "gcp"


@dataclass(frozen=True)
class PreemptionNotice:
    """The cloud said this machine is about to go."""

    provider: Provider
    #: AWS: terminate, stop or hibernate; GCP: preempted.
    action: str
    #: When the machine goes, as wall time (AWS gives it; GCP does not: ~30 s).
    deadline_wall_time: float | None
    #: The metadata answer, verbatim (short), for the journal.
    detail: str


class NoticeUnavailable(Exception):
    """The metadata service did not answer usefully (not on this cloud, or down)."""


class AwsToken:
    """The IMDSv2 session token of one poller, renewed before it expires (or IMDSv1 only)."""

    def __init__(self) -> None:
        self.value: str | None = None
        self.expires = 0.0
        self.v1_only = False


def _request(
    url: str, *, method: str = "GET", headers: dict[str, str], timeout: float
) -> tuple[int, bytes]:
    """One HTTP request; ``(status, body)``; NoticeUnavailable when nothing answers."""
    request = urllib.request.Request(url, method=method, headers=headers)  # noqa: S310 - http only
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return int(response.status), response.read(4096)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(4096) if exc.fp is not None else b""
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise NoticeUnavailable(f"{url}: {exc}") from None


def _aws_headers(base_url: str, token: AwsToken, timeout: float, now: float) -> dict[str, str]:
    if token.v1_only:
        return {}
    if token.value is None or now >= token.expires:
        status, body = _request(
            base_url + _AWS_TOKEN_PATH,
            method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_SECONDS)},
            timeout=timeout,
        )
        if status in _NO_TOKEN_ENDPOINT:
            # IMDSv1-only hosts refuse the token request; plain GETs still work there.
            token.v1_only = True
            return {}
        if status != 200:
            # Throttled or briefly down: ask again at the next poll, still for a token.
            raise NoticeUnavailable(f"IMDSv2 token request answered HTTP {status}")
        token.value = body.decode(errors="replace").strip()
        token.expires = now + AWS_TOKEN_TTL_SECONDS / 2
    return {"X-aws-ec2-metadata-token": token.value}


def _parse_aws_time(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def check_notice(
    provider: Provider,
    base_url: str,
    *,
    timeout: float = 1.0,
    token: AwsToken | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> PreemptionNotice | None:
    """Ask the metadata service once; the notice if there is one, None if not.

    Raises NoticeUnavailable when the service does not answer as that cloud's does.
    """
    base_url = base_url.rstrip("/")
    if provider is Provider.AWS:
        token = token or AwsToken()
        headers = _aws_headers(base_url, token, timeout, clock())
        status, body = _request(base_url + _AWS_ACTION_PATH, headers=headers, timeout=timeout)
        if status == _HTTP_UNAUTHORIZED and not token.v1_only:
            token.value = None  # expired or revoked: one fresh token, then ask again
            headers = _aws_headers(base_url, token, timeout, clock())
            status, body = _request(base_url + _AWS_ACTION_PATH, headers=headers, timeout=timeout)
        if status == _HTTP_NOT_FOUND:
            return None
        if status != 200:
            raise NoticeUnavailable(f"instance-action answered HTTP {status}")
        try:
            answer = json.loads(body)
        except ValueError:
            raise NoticeUnavailable(f"instance-action is not JSON: {body[:80]!r}") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("action"), str):
            raise NoticeUnavailable(f"instance-action has no action: {body[:80]!r}")
        return PreemptionNotice(
            Provider.AWS,
            answer["action"],
            _parse_aws_time(answer.get("time")),
            body.decode(errors="replace")[:200],
        )
    status, body = _request(
        base_url + _GCP_PREEMPTED_PATH, headers={"Metadata-Flavor": "Google"}, timeout=timeout
    )
    if status != 200:
        raise NoticeUnavailable(f"instance/preempted answered HTTP {status}")
    text = body.decode(errors="replace").strip()
    if text == "TRUE":
        return PreemptionNotice(Provider.GCP, "preempted", None, text)
    if text == "FALSE":
        return None
    raise NoticeUnavailable(f"instance/preempted answered {text[:40]!r}")


class NoticeWatch(Protocol):
    """A running watch for the notice (the loop's seam; ``NoticePoller`` is the real one)."""

    def close(self, timeout: float = 5.0) -> bool:
        """Stop watching; return whether its thread ended within ``timeout``."""
        ...


#: Start watching, reporting the notice through the callback (which only enqueues).
NoticeStarter = Callable[[Callable[["PreemptionNotice"], None]], NoticeWatch]


class NoticePoller:
    """Poll one provider every ``interval`` seconds on a thread; report the notice once.

    ``notify`` runs on the poller's thread and must only enqueue. After a notice
    the thread ends: the machine is going, one report is all the loop needs.
    """

    def __init__(
        self,
        provider: Provider,
        notify: Callable[[PreemptionNotice], None],
        *,
        base_url: str | None = None,
        interval: float = 5.0,
        timeout: float = 1.0,
    ) -> None:
        self.provider = provider
        self.base_url = base_url or (
            AWS_METADATA_URL if provider is Provider.AWS else GCP_METADATA_URL
        )
        self._notify = notify
        self._interval = interval
        self._timeout = timeout
        self._stop = threading.Event()
        self._token = AwsToken()
        self._thread = threading.Thread(
            target=self._run, name=f"preemption-notice-{provider.value}", daemon=True
        )
        #: The notice, once seen (read by status; written once by the thread).
        self.notice: PreemptionNotice | None = None
        #: Polls done so far, answered or not.
        self.polls = 0

    def start(self) -> NoticePoller:
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> bool:
        """Stop polling; return whether the thread ended within ``timeout``."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        said_unavailable = False
        while not self._stop.is_set():
            try:
                notice = check_notice(
                    self.provider, self.base_url, timeout=self._timeout, token=self._token
                )
            except NoticeUnavailable as exc:
                self.polls += 1
                if not said_unavailable:
                    log.info(
                        "preemption_notice_unavailable",
                        provider=self.provider.value,
                        error=str(exc),
                    )
                    said_unavailable = True
                notice = None
            else:
                self.polls += 1
            if notice is not None:
                self.notice = notice
                log.warning(
                    "preemption_notice",
                    provider=notice.provider.value,
                    action=notice.action,
                    deadline_wall_time=notice.deadline_wall_time,
                )
                try:
                    self._notify(notice)
                except Exception as exc:  # a broken handler must not hide the notice
                    log.exception("preemption_notify_failed", error=repr(exc))
                return
            self._stop.wait(self._interval)
