"""Turn SIGTERM, SIGINT and SIGHUP into events on the loop's queue, and nothing more.

Handlers only enqueue (as gunicorn's arbiter does): deciding what
a signal means (forward it, wait for the emergency checkpoint, exit) is the
policy's job, in the main loop, where no state can be half-updated.

Why ``queue.SimpleQueue.put`` and never ``queue.Queue.put``: a Python signal
handler runs in the main thread between two bytecodes, possibly while that
same thread is inside ``Queue.put``/``get`` holding the queue's internal
``threading.Lock`` (not reentrant). The handler's ``put`` would then wait for a
lock its own thread holds: a deadlock. ``SimpleQueue.put`` is implemented in C,
takes no Python-level lock and is documented as reentrant, safe to call from
signal handlers and ``__del__``. A handler blocked in ``SimpleQueue.get`` is
also woken: lock waits are interrupted by signals, the handler runs, and the
``get`` returns the event just put.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType

__all__ = ["HANDLED", "install"]

#: The signals that mean "stop" (TERM: systemd, SLURM, preemption; INT: Ctrl-C)
#: or, for HUP, a closed terminal; the policy treats them alike.
HANDLED: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None


def install(
    queue_put: Callable[[object], None], make_event: Callable[[str], object]
) -> Callable[[], None]:
    """Route SIGTERM/SIGINT/SIGHUP to ``queue_put(make_event(name))``; return ``restore``.

    ``queue_put`` must be reentrant: pass a ``queue.SimpleQueue``'s ``put``.
    ``make_event`` gets the signal's name (``"SIGTERM"``) and must be cheap and
    lock-free (a frozen dataclass constructor is). Must be called from the main
    thread (Python only runs handlers there). ``restore()`` puts the previous
    handlers back; call it before exiting so a late signal meets the default.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        queue_put(make_event(signal.Signals(signum).name))

    previous: dict[signal.Signals, _Handler] = {}
    try:
        for sig in HANDLED:
            previous[sig] = signal.signal(sig, handler)
    except BaseException:
        _restore(previous)
        raise

    def restore() -> None:
        """Put back the handlers that were in place before ``install``."""
        _restore(previous)

    return restore


def _restore(previous: dict[signal.Signals, _Handler]) -> None:
    for sig, old in previous.items():
        # None means the handler was not installed from Python; the default is
        # the closest we can put back.
        signal.signal(sig, old if old is not None else signal.SIG_DFL)
