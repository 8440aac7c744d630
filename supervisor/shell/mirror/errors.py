"""Errors of the remote mirror, and the redaction every message about storage goes through.

MirrorError                 a storage operation failed; the message names the URL
 +-- ProbeFailed            the mirror is unusable at start: exit 78 (backend not installed,
                            wrong bucket, bad credentials, no permission to list/read/delete)
 +-- RemoteCorrupt          downloaded bytes disagree with the remote commit record
 +-- LocalMismatch          the local folder is gone or disagrees with its own record:
                            retrying cannot help, so the worker does not retry
 +-- Pinned                 refused to delete a remote checkpoint being up- or downloaded

Everything else a backend raises (``OSError`` subclasses from s3fs/gcsfs, botocore's
connection errors, timeouts) is "storage unreachable or refusing" and is retried by
the worker; ``describe_error`` turns it into a one-line, secret-free text.

Credentials reach the backend through ``storage_options`` or the environment. They
must never appear in a log line, a journal entry or anything under ``.warden/``, so
``Redactor`` blanks the values of secret-looking option keys wherever a message
might echo them, and the password part of a URL.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from supervisor.errors import TrainwardenError
from trainer_child.protocol import EXIT_CONFIG

__all__ = [
    "LocalMismatch",
    "MirrorError",
    "Pinned",
    "ProbeFailed",
    "Redactor",
    "RemoteCorrupt",
    "redact_url",
]

#: Option keys whose values are secrets (matched case-insensitively, as substrings).
_SECRET_KEY_RE = re.compile(
    r"secret|token|password|passwd|credential|private|signature|sas|session|key",
    re.IGNORECASE,
)
#: Keys that match the pattern above but only name where to connect.
_NOT_SECRET_KEYS = frozenset({"endpoint_url", "region_name", "key_id_name"})
#: Values shorter than this are not scrubbed from messages: "1" or "us" would
#: blank half of every message while protecting nothing.
_MIN_SCRUB_LENGTH = 4
REDACTED = "***"


class MirrorError(TrainwardenError):
    """A storage operation of the mirror failed; ``str()`` names the (redacted) URL."""


class ProbeFailed(MirrorError):
    """The mirror is unusable (no backend, or the probe could not write, list, read, delete).

    Found at start, so the run refuses to begin rather than train for hours with
    no remote copy; ``exit_code`` is 78 so systemd does not restart into it.
    """

    exit_code = EXIT_CONFIG


class RemoteCorrupt(MirrorError):
    """A remote checkpoint's bytes disagree with its record: quarantine it, use an older one."""

    def __init__(self, message: str, *, step: int | None, files: Iterable[str]) -> None:
        super().__init__(message)
        self.step = step
        self.files = tuple(files)


class LocalMismatch(MirrorError):
    """The local folder vanished or its bytes disagree with its record; not worth a retry."""


class Pinned(MirrorError):
    """A remote checkpoint is being uploaded or downloaded and may not be deleted now."""


def _is_secret_key(key: str) -> bool:
    return key.lower() not in _NOT_SECRET_KEYS and bool(_SECRET_KEY_RE.search(key))


def redact_url(url: str) -> str:
    """Hide the password (and any token-like query) of a URL; keep scheme, bucket and path."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{REDACTED}@{host}" if ":" in userinfo else f"{REDACTED}@{host}"
    query = REDACTED if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class Redactor:
    """Blank every secret of one mirror's configuration out of texts and option dicts."""

    def __init__(self, url: str, storage_options: Mapping[str, Any]) -> None:
        self.url = redact_url(url)
        secrets: set[str] = set()
        _collect_secrets(storage_options, secrets)
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if password:
            secrets.add(password)
        # Longest first, so a secret that contains another is blanked whole.
        self._secrets = sorted(
            (s for s in secrets if len(s) >= _MIN_SCRUB_LENGTH), key=len, reverse=True
        )
        self._raw_url = url

    def text(self, message: str) -> str:
        """Return ``message`` with the raw URL shown redacted and every secret value blanked."""
        if self._raw_url != self.url:
            message = message.replace(self._raw_url, self.url)
        for secret in self._secrets:
            message = message.replace(secret, REDACTED)
        return message

    def options(self, storage_options: Mapping[str, Any]) -> dict[str, Any]:
        """Return a copy of ``storage_options`` fit for a log line: secret values blanked."""
        return _redact_mapping(storage_options)

    def describe(self, exc: BaseException) -> str:
        """One line about an exception: its type and its (scrubbed) message."""
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        name = type(exc).__name__
        return self.text(f"{name}: {detail}" if detail else name)


def _collect_secrets(value: object, into: set[str], *, secret: bool = False) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _collect_secrets(item, into, secret=secret or _is_secret_key(str(key)))
    elif isinstance(value, list | tuple):
        for item in value:
            _collect_secrets(item, into, secret=secret)
    elif secret and isinstance(value, str | bytes):
        into.add(value.decode(errors="replace") if isinstance(value, bytes) else value)


def _redact_mapping(value: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        if _is_secret_key(str(key)):
            out[key] = REDACTED
        elif isinstance(item, Mapping):
            out[key] = _redact_mapping(item)
        else:
            out[key] = item
    return out
