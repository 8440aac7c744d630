"""The small files the loop itself writes under output_dir: its folders, the job file, log notes.

Checkpoints go through the store, the journal and state.json through the
journal, the child's output through the launcher; what is left is here, so the
loop touches the disk only through its seams.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

from trainer_child.protocol import JobFile, Layout, atomic_write_model

__all__ = ["NOTE_PREFIX", "FileRunDir", "RunDir"]

#: Every line the supervisor adds to an attempt log starts so; evidence skips them.
NOTE_PREFIX = "# trainwarden "


class RunDir(Protocol):
    """The output_dir as the loop sees it, apart from checkpoints and the journal."""

    def prepare(self) -> None:
        """Create output_dir and ``.warden/`` with its subfolders (idempotent)."""
        ...

    def write_job(self, job: JobFile) -> Path:
        """Write ``.warden/job.json`` for the built-in child; return its path."""
        ...

    def note(self, attempt: int, text: str) -> None:
        """Add one line of ours to the attempt's log, before its child writes there."""
        ...


class FileRunDir:
    """The real output_dir."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout

    def prepare(self) -> None:
        """Create output_dir and ``.warden/``."""
        self._layout.output_dir.mkdir(parents=True, exist_ok=True)
        self._layout.ensure()

    def write_job(self, job: JobFile) -> Path:
        """Write the job file atomically."""
        atomic_write_model(self._layout.job, job)
        return self._layout.job

    def note(self, attempt: int, text: str) -> None:
        """Append ``# trainwarden <text>``; a log that cannot be written is no reason to stop."""
        with contextlib.suppress(OSError), self._layout.attempt_log(attempt).open("ab") as log:
            log.write(f"{NOTE_PREFIX}{text}\n".encode())
