"""Exceptions the supervisor raises to its CLI.

TrainwardenError
 +-- ConfigError        the job file is invalid (exit 78); lists every bad field
 +-- LockedError        another supervisor owns this output_dir (exit 78)
 +-- MissingExtra       a command needs an optional extra that is not installed (exit 1)

Giving up (exit 76) is not an exception: it is the policy's decision, and
``Supervisor.run`` returns its code like any other end of a run.
"""

from __future__ import annotations

from trainer_child.protocol import EXIT_CONFIG


class TrainwardenError(Exception):
    """Base of every error the CLI turns into an exit code and a message."""

    exit_code = 1


class ConfigError(TrainwardenError):
    """The configuration is invalid; no child is started and nothing is deleted."""

    exit_code = EXIT_CONFIG

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class LockedError(TrainwardenError):
    """Another live supervisor holds this output_dir; two must never share one."""

    exit_code = EXIT_CONFIG


class MissingExtra(TrainwardenError):
    """A command needs an optional dependency; the message names the pip extra."""
