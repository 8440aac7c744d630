"""Inject faults that cannot be produced for real on a test machine. TEST FACILITY ONLY.

A CPU-only box has no CUDA memory to exhaust, and a real hang or a SIGKILL in the
middle of a checkpoint write cannot be timed by hand. This module fakes exactly
those, at step boundaries, so the supervisor's recovery paths can be tested end
to end with the same child binary that runs in production. Nothing here runs
unless ``TRAINWARDEN_FAILPOINTS`` is set; production jobs never set it.

Syntax: ``kind@key=value,key=value;kind@...``, for example
``TRAINWARDEN_FAILPOINTS="cuda_oom@step=3,times=1;hang@step=5"``.

=============  ==============================================================
kind           what happens
=============  ==============================================================
cuda_oom       raise a real ``torch.OutOfMemoryError("CUDA out of memory ...")``
hang           block forever in ``hang_forever`` (faulthandler stacks show it)
crash          raise ``RuntimeError``
exit           ``os._exit(code)`` (``code=N``, default 1): no cleanup, no report
sigkill        SIGKILL itself, as the kernel OOM killer would
enospc         raise ``OSError(ENOSPC)``
slow_step      sleep ``seconds=S`` at the start of every step from ``step`` on
slow_save      sleep ``seconds=S`` before every ``torch.save`` of a checkpoint,
               stretching the window in which the folder is half-written
=============  ==============================================================

``step=N`` fires at the start of optimizer step N (steps 1..N-1 are done, step N
never finishes), like a fault in that step's forward pass. ``times=N`` caps how
often a point fires in total, counted across restarts in
``.warden/failpoints.json``, which is written (durably) *before* firing because
``exit`` and ``sigkill`` never return. A malformed spec is a config error (78).
"""

from __future__ import annotations

import enum
import errno
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from trainer_child.errors import ConfigError
from trainer_child.protocol import ENV_FAILPOINTS, Layout, atomic_write_bytes

__all__ = [
    "Failpoint",
    "FailpointError",
    "Failpoints",
    "Kind",
    "hang_forever",
    "parse",
]

log = logging.getLogger("trainer_child")


class FailpointError(ConfigError):
    """``TRAINWARDEN_FAILPOINTS`` does not parse."""


class Kind(str, enum.Enum):
    """The faults on offer (see the module docstring)."""

    CUDA_OOM = "cuda_oom"
    HANG = "hang"
    CRASH = "crash"
    EXIT = "exit"
    SIGKILL = "sigkill"
    ENOSPC = "enospc"
    SLOW_STEP = "slow_step"
    SLOW_SAVE = "slow_save"


# Which keys each kind takes; `step` is required for the faults that fire once.
_STEP_FAULTS = {Kind.CUDA_OOM, Kind.HANG, Kind.CRASH, Kind.EXIT, Kind.SIGKILL, Kind.ENOSPC}
_ALLOWED_KEYS: dict[Kind, set[str]] = {
    **{kind: {"step", "times"} for kind in _STEP_FAULTS},
    Kind.EXIT: {"step", "times", "code"},
    Kind.SLOW_STEP: {"seconds", "step", "times"},
    Kind.SLOW_SAVE: {"seconds", "times"},
}


@dataclass(frozen=True)
class Failpoint:
    """One parsed fault, e.g. ``cuda_oom@step=3,times=1``."""

    kind: Kind
    step: int | None = None
    times: int | None = None
    seconds: float | None = None
    code: int = 1

    @property
    def key(self) -> str:
        """Return the canonical spelling, used as the counter's key across restarts."""
        parts = [
            f"{name}={value}"
            for name, value in (
                ("step", self.step),
                ("seconds", self.seconds),
                ("times", self.times),
                ("code", self.code if self.kind is Kind.EXIT else None),
            )
            if value is not None
        ]
        return f"{self.kind.value}@{','.join(parts)}" if parts else self.kind.value


def _parse_one(text: str) -> Failpoint:
    kind_text, _, params_text = text.partition("@")
    try:
        kind = Kind(kind_text.strip())
    except ValueError:
        choices = ", ".join(k.value for k in Kind)
        raise FailpointError(
            f"unknown failpoint {kind_text!r} in {text!r}: use one of {choices}"
        ) from None
    values: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in params_text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not value.strip():
            raise FailpointError(f"failpoint parameter {item!r} in {text!r} must be key=value")
        if name.strip() not in _ALLOWED_KEYS[kind]:
            allowed = ", ".join(sorted(_ALLOWED_KEYS[kind]))
            raise FailpointError(f"{kind.value} takes {allowed}; got {name.strip()!r} in {text!r}")
        values[name.strip()] = value.strip()
    try:
        point = Failpoint(
            kind=kind,
            step=int(values["step"]) if "step" in values else None,
            times=int(values["times"]) if "times" in values else None,
            seconds=float(values["seconds"]) if "seconds" in values else None,
            code=int(values.get("code", "1")),
        )
    except ValueError as exc:
        raise FailpointError(f"bad number in failpoint {text!r}: {exc}") from None
    if kind in _STEP_FAULTS and (point.step is None or point.step < 1):
        raise FailpointError(f"{kind.value} needs step=N with N >= 1 (in {text!r})")
    if kind in (Kind.SLOW_STEP, Kind.SLOW_SAVE) and (point.seconds is None or point.seconds < 0):
        raise FailpointError(f"{kind.value} needs seconds=S with S >= 0 (in {text!r})")
    if point.times is not None and point.times < 1:
        raise FailpointError(f"times must be >= 1 (in {text!r})")
    return point


def parse(text: str) -> tuple[Failpoint, ...]:
    """Parse a ``TRAINWARDEN_FAILPOINTS`` value; raise FailpointError if malformed."""
    return tuple(_parse_one(part.strip()) for part in text.split(";") if part.strip())


def hang_forever(step: int) -> NoReturn:
    """Block this thread for good, as a deadlocked collective or a stuck kernel would.

    The name is the point: the supervisor's SIGUSR1 stack dump must show it. The
    sleep is restarted after any signal handler (PEP 475), so SIGTERM only sets
    the preemption flag and the process stays hung until SIGKILL.
    """
    log.warning("failpoint_hang step=%d", step)
    while True:
        time.sleep(3600)


def _raise_cuda_oom(step: int) -> NoReturn:
    import torch

    raise torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
        f"79.14 GiB of which 1.02 GiB is free. (trainwarden failpoint at step {step})"
    )


class Failpoints:
    """The faults configured for this process, fired from the training callback."""

    def __init__(self, points: tuple[Failpoint, ...]) -> None:
        self.points = points
        self._counter_path: Path | None = None
        self._saved_torch_save: Callable[..., Any] | None = None

    @classmethod
    def from_env(cls) -> Failpoints:
        """Parse ``TRAINWARDEN_FAILPOINTS`` (empty when unset)."""
        return cls(parse(os.environ.get(ENV_FAILPOINTS, "")))

    def __bool__(self) -> bool:
        return bool(self.points)

    def bind(self, output_dir: str | os.PathLike[str]) -> None:
        """Count fires in ``output_dir/.warden/failpoints.json`` from now on."""
        self._counter_path = Layout(output_dir).failpoints

    def _counts(self) -> dict[str, int]:
        if self._counter_path is None:
            return {}
        try:
            raw = json.loads(self._counter_path.read_bytes())
        except (FileNotFoundError, ValueError):
            return {}
        return {str(k): int(v) for k, v in raw.items()} if isinstance(raw, dict) else {}

    def _claim(self, point: Failpoint) -> bool:
        """Return whether ``point`` may fire now, recording the fire first if so."""
        if point.times is None:
            return True
        counts = self._counts()
        if counts.get(point.key, 0) >= point.times:
            return False
        counts[point.key] = counts.get(point.key, 0) + 1
        if self._counter_path is not None:
            self._counter_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self._counter_path, json.dumps(counts, sort_keys=True).encode())
        return True

    def at_step_begin(self, step: int) -> None:
        """Fire what is due at the start of optimizer step ``step`` (1-based)."""
        for point in self.points:
            if point.kind is Kind.SLOW_STEP:
                if (point.step is None or step >= point.step) and self._claim(point):
                    time.sleep(point.seconds or 0.0)
            elif point.kind in _STEP_FAULTS and point.step == step and self._claim(point):
                self._fire(point, step)

    def _fire(self, point: Failpoint, step: int) -> None:
        log.warning("failpoint_fire point=%s step=%d", point.key, step)
        if point.kind is Kind.CUDA_OOM:
            _raise_cuda_oom(step)
        if point.kind is Kind.HANG:
            hang_forever(step)
        if point.kind is Kind.CRASH:
            raise RuntimeError(f"trainwarden failpoint crash at step {step}")
        if point.kind is Kind.EXIT:
            os._exit(point.code)
        if point.kind is Kind.SIGKILL:
            os.kill(os.getpid(), signal.SIGKILL)
        if point.kind is Kind.ENOSPC:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "trainwarden-failpoint")

    def save_started(self) -> None:
        """Slow every ``torch.save`` until ``save_finished``, if ``slow_save`` is set.

        HF's checkpoint writes training_args.bin, optimizer.pt, scheduler.pt and
        rng_state.pth with ``torch.save`` (looked up on the module at call time)
        after the adapter files, so sleeping before each one leaves the folder
        visibly half-written for a few seconds: a test can SIGKILL inside it.
        """
        point = next((p for p in self.points if p.kind is Kind.SLOW_SAVE), None)
        if point is None or self._saved_torch_save is not None or not self._claim(point):
            return
        import torch

        original = torch.save
        seconds = point.seconds or 0.0

        def slow_torch_save(*args: Any, **kwargs: Any) -> Any:
            time.sleep(seconds)
            return original(*args, **kwargs)

        log.warning("failpoint_slow_save seconds=%s", seconds)
        self._saved_torch_save = original
        torch.save = slow_torch_save

    def save_finished(self) -> None:
        """Undo ``save_started``."""
        if self._saved_torch_save is None:
            return
        import torch

        torch.save = self._saved_torch_save
        self._saved_torch_save = None
