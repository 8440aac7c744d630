"""What ``WardenCallback`` needs to make several ranks act as one: two collectives.

Under torchrun or ``accelerate launch`` every rank runs its own callback. Left
alone, each would stop at the step its own SIGTERM happened to arrive at, and
rank 0 would seal a checkpoint before the other ranks had written their part
(``rng_state_K.pth``). Two operations fix that:

* ``any(flag)``: an all-reduce (MAX) of one integer, so every rank learns
  whether *some* rank wants to stop, at the same step. It is also a
  rendezvous: no rank returns before every rank has called it, which is what
  makes "every rank finished its part of the save" and "every rank is still
  making progress" observable on rank 0.
* ``barrier()``: every rank waits for the others (rank 0's commit record).

Alone (no process group, or a group of one) both are free and do nothing, so
single-process training pays nothing. ``missing_rank_files`` is the check rank
0 makes before it vouches for every rank's part of a checkpoint. torch is imported only once a group
exists: this module stays importable by the light half of the child.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Ranks", "launched_rank", "missing_rank_files"]


@dataclass(frozen=True)
class Ranks:
    """This process's place in the torch.distributed job it belongs to, if any."""

    rank: int = 0
    world_size: int = 1
    #: Where the one-integer tensor must live for the backend (cuda for nccl).
    device: str = "cpu"

    @property
    def distributed(self) -> bool:
        """Whether there are other ranks to agree with."""
        return self.world_size > 1

    @classmethod
    def current(cls) -> Ranks:
        """Describe the default process group, or a job of one when there is none.

        Read when training begins: the HF Trainer initialises the group while it
        builds its arguments, long after the callback is created.
        """
        torch = sys.modules.get("torch")
        if torch is None:
            return cls()
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        world_size = int(dist.get_world_size())
        if world_size <= 1:
            return cls()
        backend = str(dist.get_backend()).lower()
        # A mixed backend ("cpu:gloo,cuda:nccl") takes CPU tensors through gloo.
        device = "cpu"
        if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
            device = f"cuda:{torch.cuda.current_device()}"
        return cls(rank=int(dist.get_rank()), world_size=world_size, device=device)

    def any(self, flag: bool) -> bool:
        """Return whether ``flag`` is true on at least one rank (a collective: all must call)."""
        if not self.distributed:
            return flag
        import torch

        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        _dist().all_reduce(value, op=_dist().ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        """Wait until every rank has called this (a collective: all must call)."""
        if self.distributed:
            # An all-reduce rather than dist.barrier(): with nccl, barrier() has to
            # guess a device and warns about it; this one names the device.
            self.any(False)


#: What HF's Trainer writes once per rank when several ranks train.
_RANK_RNG_RE = re.compile(r"^rng_state_(\d+)\.pth$")


def missing_rank_files(folder: str | os.PathLike[str], world_size: int) -> list[str]:
    """Name the per-rank files a checkpoint of ``world_size`` ranks should hold and lacks.

    HF writes ``rng_state_K.pth`` from every rank K (unless ``save_only_model``,
    when no rank writes one); a checkpoint with some of them is a checkpoint
    some rank has not finished, and resuming it silently reseeds that rank.
    """
    if world_size <= 1:
        return []
    names = {entry.name for entry in Path(folder).iterdir()}
    if not any(_RANK_RNG_RE.match(name) for name in names):
        return []
    expected = [f"rng_state_{rank}.pth" for rank in range(world_size)]
    return [name for name in expected if name not in names]


def launched_rank() -> tuple[int, int]:
    """Return ``(RANK, WORLD_SIZE)`` as the launcher set them; ``(0, 1)`` when run alone.

    For the light start of a rank, before torch is imported and the process
    group exists: only rank 0 announces the attempt (heartbeat, error.json reset).
    """
    try:
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1
    return max(rank, 0), max(world_size, 1)


def _dist() -> Any:
    import torch.distributed

    return torch.distributed
