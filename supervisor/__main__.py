"""``python -m supervisor`` is the ``trainwarden`` command."""

from __future__ import annotations

from supervisor.cli import main

main()
