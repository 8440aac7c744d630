"""Pure rules of the mirror: redaction, remote retention, the status line, the config key."""

from __future__ import annotations

import pytest

from supervisor.config import parse_config
from supervisor.errors import ConfigError
from supervisor.shell.mirror import (
    MirrorLag,
    RemoteCheckpoint,
    RemoteInventory,
    RemoteStatus,
    plan_remote_retention,
    redact_url,
)
from supervisor.shell.mirror.errors import Redactor


def remote(*entries: tuple[int, RemoteStatus]) -> RemoteInventory:
    return RemoteInventory(
        checkpoints=tuple(RemoteCheckpoint(step, status) for step, status in entries)
    )


VALID = RemoteStatus.VALID


# --- redaction -------------------------------------------------------------------------------


def test_url_password_and_query_are_hidden() -> None:
    """A URL keeps scheme, user, host and path; the password and the query go."""
    assert redact_url("s3://bucket/runs/a") == "s3://bucket/runs/a"
    assert redact_url("sftp://me:hunter22@host/runs") == "sftp://me:***@host/runs"
    assert redact_url("https://acct/c?sig=abc") == "https://acct/c?***"


def test_secret_option_values_are_blanked_in_messages_and_dicts() -> None:
    """key/secret/token values vanish from any text; endpoint and region stay readable."""
    options = {
        "key": "AKIAEXAMPLE",
        "secret": "s3cr3t-value",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"},
        "token": "tok-12345",
        "use_ssl": False,
    }
    redactor = Redactor("s3://bucket/run", options)
    text = redactor.text("signing with AKIAEXAMPLE/s3cr3t-value and tok-12345 failed")
    assert text == "signing with ***/*** and *** failed"
    assert redactor.options(options) == {
        "key": "***",
        "secret": "***",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"},
        "token": "***",
        "use_ssl": False,
    }


def test_describe_scrubs_a_secret_the_backend_echoes() -> None:
    """An exception message that quotes a credential is shown without it."""
    redactor = Redactor("s3://bucket/run", {"secret": "very-secret"})
    line = redactor.describe(PermissionError("bad signature for very-secret\ntraceback..."))
    assert line == "PermissionError: bad signature for ***"


# --- remote retention ------------------------------------------------------------------------


def test_remote_retention_keeps_the_newest_valid_whatever_keep_last() -> None:
    """keep_last=1 keeps the newest *valid* one even when newer folders are broken."""
    inventory = remote(
        (2, VALID),
        (4, VALID),
        (6, VALID),
        (8, RemoteStatus.DAMAGED),
        (10, RemoteStatus.NO_RECORD),
    )
    plan = plan_remote_retention(inventory, keep_last=1)
    assert plan.delete == (2, 4)
    assert dict(plan.kept) == {6: "newest valid"}


def test_remote_retention_spares_pinned_steps() -> None:
    """A step being downloaded (pinned) is never deleted."""
    inventory = remote((2, VALID), (4, VALID), (6, VALID))
    plan = plan_remote_retention(inventory, keep_last=1, pinned={2})
    assert plan.delete == (4,)


def test_remote_retention_follows_keep_best_and_keep_every() -> None:
    """The local rules apply unchanged: best and every-N archives are kept too."""
    inventory = RemoteInventory(
        checkpoints=(
            RemoteCheckpoint(100, VALID),
            RemoteCheckpoint(200, VALID),
            RemoteCheckpoint(300, VALID),
            RemoteCheckpoint(400, VALID, best_step=100),
        )
    )
    plan = plan_remote_retention(inventory, keep_last=1, keep_best=True, keep_every=200)
    assert plan.delete == (300,)
    assert dict(plan.kept) == {100: "best", 200: "keep_every", 400: "newest valid"}


def test_only_complete_valid_remote_checkpoints_are_candidates() -> None:
    """Remote statuses map onto local integrity, so retention never touches a broken one."""
    inventory = remote((2, RemoteStatus.NO_RECORD), (4, RemoteStatus.DAMAGED), (6, VALID))
    assert inventory.newest_valid() == 6
    assert plan_remote_retention(inventory, keep_last=1).delete == ()


# --- lag ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lag", "line"),
    [
        (MirrorLag(400, 400, 0, 0), "remote: checkpoint-400, up to date"),
        (MirrorLag(600, 400, 2, 2), "remote: checkpoint-400, 2 behind"),
        (MirrorLag(200, None, 1, 1), "remote: no checkpoint yet, 1 behind"),
        (
            MirrorLag(600, 400, 2, 2, last_error="EndpointConnectionError: refused", retry_in=7.6),
            "remote: checkpoint-400, 2 behind, retrying in 8s (EndpointConnectionError: refused)",
        ),
    ],
)
def test_status_line(lag: MirrorLag, line: str) -> None:
    """The systemd status fragment says where the remote is and how far behind."""
    assert lag.status_line() == line


def test_status_line_shortens_a_long_error() -> None:
    """A long backend message is cut so the status line stays one short line."""
    lag = MirrorLag(6, 4, 1, 1, last_error="x" * 300, retry_in=1.0)
    assert len(lag.status_line()) < 120
    assert lag.status_line().endswith("...)")


# --- config -----------------------------------------------------------------------------------


def job(**mirror: object) -> dict[str, object]:
    return {"output_dir": "runs/x", "train": {}, "mirror": mirror}


def test_mirror_config_defaults_follow_local_retention() -> None:
    """Without mirror.keep_last the remote keeps as many as retention.keep_last."""
    config = parse_config({**job(url="s3://bucket/runs/x"), "retention": {"keep_last": 5}})
    assert config.mirror is not None
    assert config.mirror.upload_concurrency == 2
    assert config.mirror_keep_last == 5
    assert parse_config(job(url="gs://b/p", keep_last=2)).mirror_keep_last == 2
    assert parse_config({"output_dir": "x", "train": {}}).mirror_keep_last is None


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("/mnt/runs/x", "mirror.url: Value error, '/mnt/runs/x' is not a URL"),
        ("s3://", "mirror.url: Value error, 's3://' is not a URL"),
        ("ftpx://host/x", "mirror.url: Value error, unknown scheme 'ftpx'"),
        ("memory://x", "mirror.url: Value error, memory:// cannot hold a durable"),
    ],
)
def test_bad_mirror_url_names_the_field(url: str, message: str) -> None:
    """A URL that cannot be a mirror is a config error naming mirror.url."""
    with pytest.raises(ConfigError) as caught:
        parse_config(job(url=url))
    assert message in str(caught.value)


def test_mirror_section_is_strict() -> None:
    """Unknown keys under mirror: are errors, like everywhere else in the job file."""
    with pytest.raises(ConfigError, match=r"mirror\.bucket: unknown key"):
        parse_config(job(url="s3://b/p", bucket="b"))
