"""Session fixtures for the shell tests that need a real service: one S3 server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.seaweed import SeaweedS3, running_seaweed


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One real S3 server (SeaweedFS on loopback) for the session; stopped by PID at the end."""
    with running_seaweed(tmp_path_factory.mktemp("seaweed")) as server:
        yield server
