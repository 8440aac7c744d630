"""Failpoints that count their fires in ``.warden/failpoints.json``, across processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer_child.failpoints import Failpoints, parse


def test_failpoint_times_is_counted_across_restarts(tmp_path: Path) -> None:
    """times=1 fires once, then never again in a later process reading the same counter file."""
    for expect_fire in (True, False):
        points = Failpoints(parse("crash@step=2,times=1"))
        points.bind(tmp_path)
        points.at_step_begin(1)  # not due yet
        if expect_fire:
            with pytest.raises(RuntimeError, match="failpoint crash at step 2"):
                points.at_step_begin(2)
        else:
            points.at_step_begin(2)
