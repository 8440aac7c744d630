"""Turn a ``command:`` job's argv template into the argv of one attempt.

``{resume_from}`` is replaced by the checkpoint folder the attempt resumes
from. On a fresh start there is none, and an empty path is worse than no flag:
HF's ``trainer.train(resume_from_checkpoint="")`` fails with "Can't find a
valid checkpoint at" on every attempt (TRL's ``sft`` script passes the flag
straight through). So on a fresh start the placeholder goes away together with
the flag that introduces it:

- ``--resume_from_checkpoint {resume_from}`` (two items): both are dropped;
- ``--resume_from_checkpoint={resume_from}`` (one item): dropped;
- ``{resume_from}`` alone, after no option: dropped;
- anywhere else (``bash -c "train.sh {resume_from}"``): replaced by "".

When resuming, every ``{resume_from}`` becomes the checkpoint's path. An option
followed by a lone placeholder is taken to be its value (``-r {resume_from}``).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["PLACEHOLDER", "launcher_restarts", "render_command"]

PLACEHOLDER = "{resume_from}"
#: The spellings of torchrun's and ``accelerate launch``'s own restart budget.
_RESTART_FLAGS = ("--max-restarts", "--max_restarts")


def render_command(template: Sequence[str], resume_path: str | None) -> list[str]:
    """Return the argv for one attempt; ``resume_path`` None (or "") means a fresh start."""
    if resume_path:
        return [part.replace(PLACEHOLDER, resume_path) for part in template]
    argv: list[str] = []
    for part in template:
        if part == PLACEHOLDER:
            # A lone placeholder: drop it, and the option that takes it as its value.
            if argv and argv[-1].startswith("-") and "=" not in argv[-1]:
                argv.pop()
            continue
        if part.startswith("-") and part.endswith("=" + PLACEHOLDER):
            continue  # --resume_from_checkpoint={resume_from}
        argv.append(part.replace(PLACEHOLDER, ""))
    return argv


def launcher_restarts(template: Sequence[str]) -> str | None:
    """Return the value of a ``--max-restarts`` flag in the command, if it gives one.

    torchrun and ``accelerate launch`` can restart their workers themselves, from
    whatever checkpoint the script then picks. Under trainwarden that budget
    must be 0: the whole group is restarted from a checkpoint proven valid.
    """
    for index, part in enumerate(template):
        name, sep, value = part.partition("=")
        if name not in _RESTART_FLAGS:
            continue
        if sep:
            return value
        return template[index + 1] if index + 1 < len(template) else ""
    return None
