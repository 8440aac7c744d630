"""The `metrics:` and `notify:` sections: optional, strict, with useful defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.config import json_schema, parse_config
from supervisor.errors import ConfigError

MINIMAL = {"output_dir": "runs/x", "train": {}}


def problems(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def test_sections_are_optional() -> None:
    """A job without metrics or notify has neither."""
    config = parse_config(MINIMAL)
    assert config.metrics is None
    assert config.notify is None


def test_metrics_defaults_to_loopback() -> None:
    """A port alone serves on 127.0.0.1; a textfile alone is fine too."""
    config = parse_config({**MINIMAL, "metrics": {"port": 9400}})
    assert config.metrics is not None
    assert (config.metrics.address, config.metrics.port) == ("127.0.0.1", 9400)
    config = parse_config({**MINIMAL, "metrics": {"textfile": "/var/lib/ne/tw.prom"}})
    assert config.metrics is not None
    assert config.metrics.textfile == Path("/var/lib/ne/tw.prom")


def test_metrics_needs_a_sink_and_known_keys() -> None:
    """An empty metrics section, a bad port and a typo are all named."""
    assert any(p.startswith("metrics:") for p in problems({**MINIMAL, "metrics": {}}))
    assert any(
        p.startswith("metrics.port:") for p in problems({**MINIMAL, "metrics": {"port": 70000}})
    )
    found = problems({**MINIMAL, "metrics": {"port": 1, "adress": "0.0.0.0"}})
    assert "metrics.adress: unknown key (check the spelling)" in found


def test_notify_defaults_to_every_event() -> None:
    """`on` defaults to gave_up, completed and failure."""
    config = parse_config({**MINIMAL, "notify": {"urls": ["json://localhost/"]}})
    assert config.notify is not None
    assert config.notify.on == ["gave_up", "completed", "failure"]


def test_notify_rejects_unknown_events_and_no_urls() -> None:
    """An event name that is not notifiable, or no URL at all, is an error."""
    found = problems({**MINIMAL, "notify": {"urls": ["json://x/"], "on": ["crashed"]}})
    assert any(p.startswith("notify.on[0]:") for p in found)
    assert any(p.startswith("notify.urls:") for p in problems({**MINIMAL, "notify": {"urls": []}}))


def test_schema_lists_the_new_sections() -> None:
    """The JSON Schema documents metrics and notify."""
    props = json_schema()["properties"]
    assert "metrics" in props
    assert "notify" in props
