"""structlog set-up: readable lines on a terminal, JSON lines everywhere else.

Under systemd stdout is not a terminal, so journald gets one JSON object per line
that `journalctl -o cat | jq` can filter. The child's own output never comes
through here: it goes to `.warden/logs/attempt-K.log`.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog


def configure(
    *, stream: TextIO | None = None, json: bool | None = None, level: int = logging.INFO
) -> None:
    """Configure structlog once for the process; ``json=None`` picks by isatty."""
    out = stream or sys.stderr
    if json is None:
        json = not out.isatty()
    renderer: structlog.typing.Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
