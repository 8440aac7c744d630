"""Which attempts a warm standby can run, and when one may be kept (``restart.standby``).

Pure: the shell (``supervisor/shell/standby.py``) passes in the attempt's argv,
environment and cwd, and the host's free memory; this module says whether a
standby can start that attempt in-process, what it must have prepared for it
(the *key*), and whether one fits in memory. A standby serves an attempt only
when its key is the attempt's: a changed micro-batch (after an OOM), another
environment or another command means another key, so a stale standby is
rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

from trainer_child.protocol import ENV_ATTEMPT, ENV_RESUME_FROM

__all__ = [
    "LAUNCHER_MODULES",
    "Cold",
    "Recipe",
    "memory_shortfall",
    "recipe_for",
]

#: Modules that start their ranks in fresh interpreters: nothing prepared here
#: would reach them, so they start cold.
LAUNCHER_MODULES = frozenset(
    {
        "torch.distributed.run",
        "torch.distributed.launch",
        "accelerate.commands.launch",
        "accelerate.commands.accelerate_cli",
        "deepspeed",
        "deepspeed.launcher.runner",
        # The built-in job with train.nproc_per_node > 1 (torch.distributed.run's agent).
        "trainer_child.launch",
    }
)
#: The variables that change with every attempt: delivered on go, not part of the key.
PER_ATTEMPT_ENV = frozenset({ENV_RESUME_FROM, ENV_ATTEMPT})
_PYTHON_NAME = re.compile(r"python(\d+(\.\d+)?)?")
#: Interpreter options that take no argument, alone or combined (``-uB``).
_FLAGS = re.compile(r"-[bBdEiIOqsSuvR]+|-OO")
#: Interpreter options whose argument may follow as the next word.
_WITH_ARGUMENT = ("-W", "-X")
#: Keep a standby only while free memory is at least this many times its size:
#: the training child's own memory grows too, and a standby is a luxury.
MEMORY_FACTOR = 2.0


@dataclass(frozen=True)
class Recipe:
    """How a standby runs an attempt, and what it prepares for it."""

    kind: Literal["builtin", "module", "script"]
    #: The module name or script path; "" for the built-in job.
    target: str
    #: The interpreter and its options, to start the standby with the same ones.
    interpreter: tuple[str, ...]
    #: What follows the module or script in the command.
    args: tuple[str, ...]
    key: str

    @property
    def what(self) -> str:
        """A few words for logs and status: ``python -m trl.scripts.sft``."""
        if self.kind == "builtin":
            return "the built-in job"
        return f"python -m {self.target}" if self.kind == "module" else f"python {self.target}"


@dataclass(frozen=True)
class Cold:
    """Why this attempt must start cold (said in the journal and by ``status``)."""

    reason: str


def _split_interpreter(argv: Sequence[str]) -> tuple[int, str] | Cold:
    """Find where the interpreter's options end; return (index of target, "-m" or "")."""
    index = 1
    while index < len(argv):
        word = argv[index]
        if word == "-m":
            if index + 1 >= len(argv):
                return Cold("python -m without a module")
            return index + 1, "-m"
        if word in _WITH_ARGUMENT:
            index += 2
            continue
        if _FLAGS.fullmatch(word) or word.startswith(_WITH_ARGUMENT):
            index += 1
            continue
        if word == "-c":
            return Cold("python -c runs code from the command line: nothing to prepare")
        if word.startswith("-"):
            return Cold(f"python option {word} is not supported by a standby")
        return index, ""
    return Cold("python with no script or module")


def _digest(parts: object) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def recipe_for(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    *,
    python: str,
    job_text: str = "",
) -> Recipe | Cold:
    """Say how a standby would run ``argv``, or why it cannot.

    The built-in job is ``python -m trainer_child ...`` with this supervisor's
    own interpreter (``python``); ``job_text`` is its job file, whose train spec
    and overrides the key covers. A ``command:`` job qualifies when it is
    ``python [options] -m module ...`` or ``python [options] script.py ...``.
    """
    if not argv:
        return Cold("empty command")
    name = PurePosixPath(argv[0]).name
    if name != PurePosixPath(python).name and not _PYTHON_NAME.fullmatch(name):
        return Cold(f"not a python module or script ({name})")
    found = _split_interpreter(argv)
    if isinstance(found, Cold):
        return found
    index, flag = found
    target = argv[index]
    kind: Literal["builtin", "module", "script"] = "module" if flag else "script"
    if flag and target == "trainer_child" and argv[0] == python:
        kind, target = "builtin", ""
    elif flag and target in LAUNCHER_MODULES:
        return Cold(f"{target} starts its ranks in fresh interpreters")
    interpreter = tuple(argv[: index - 1 if flag else index])
    stable_env = {k: v for k, v in env.items() if k not in PER_ATTEMPT_ENV}
    key = _digest([kind, target, interpreter, cwd, stable_env, job_text])
    return Recipe(kind, target, interpreter, tuple(argv[index + 1 :]), key)


def memory_shortfall(available: int | None, expected: int) -> str | None:
    """Say why a standby of ``expected`` bytes does not fit comfortably; None if it does.

    Comfortably: ``MEMORY_FACTOR`` times its size is available (the host's
    MemAvailable, or the cgroup's headroom if smaller). Unknown availability
    (no /proc/meminfo) keeps none: a standby is not worth an OOM kill.
    """
    need = int(expected * MEMORY_FACTOR)
    if available is None:
        return "host memory unknown"
    if available >= need:
        return None
    return (
        f"{available / 2**20:.0f} MiB of host memory available, a standby needs "
        f"{need / 2**20:.0f} MiB ({MEMORY_FACTOR:g} x its {expected / 2**20:.0f} MiB)"
    )
