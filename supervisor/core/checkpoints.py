"""Pure rules that turn verifier verdicts into checkpoint statuses and sizes.

The shell's verifier (``supervisor/shell/verify.py``) says what the *files* of a
``checkpoint-N`` prove (COMPLETE / INCOMPLETE / CORRUPT). Whether an incomplete
folder is still being written or was abandoned depends on something the files
cannot show, whether the child is alive, so that last step lives here, next to
the helpers the policy uses to pick a resume point and size the disk reserve.
Nothing here touches the filesystem or the clock.
"""

from __future__ import annotations

from collections.abc import Iterable

from supervisor.core.model import CheckpointEntry, CheckpointStatus, Integrity, Inventory

__all__ = [
    "auto_reserve",
    "estimated_checkpoint_bytes",
    "is_valid",
    "newest_valid",
    "status_of",
    "statuses_of",
    "valid_steps",
]


def is_valid(entry: CheckpointEntry) -> bool:
    """Return whether ``entry`` may be resumed from: a real folder whose files check out."""
    # The verifier never calls a symlink COMPLETE; checking both keeps a future
    # verifier bug from turning "never follow a symlink" into a resume from one.
    return entry.integrity is Integrity.COMPLETE and not entry.symlink


def status_of(
    entry: CheckpointEntry, newest_valid_step: int | None, child_alive: bool
) -> CheckpointStatus:
    """Judge one folder once liveness is known.

    An incomplete folder newer than the newest valid checkpoint may be the save
    the live child is doing right now, so it is IN_PROGRESS and must be left
    alone. Once the child is gone nobody will finish it: PARTIAL. An incomplete
    folder *older* than the newest valid one cannot be the save in flight (HF
    saves in step order), so it is PARTIAL even while the child runs.
    """
    if entry.symlink:
        return CheckpointStatus.SYMLINK
    if entry.integrity is Integrity.COMPLETE:
        return CheckpointStatus.VALID
    if entry.integrity is Integrity.CORRUPT:
        # A commit record exists and the bytes disagree: waiting cannot fix that.
        return CheckpointStatus.CORRUPT
    newer_than_newest_valid = newest_valid_step is None or entry.step > newest_valid_step
    if child_alive and newer_than_newest_valid:
        return CheckpointStatus.IN_PROGRESS
    return CheckpointStatus.PARTIAL


def statuses_of(
    inventory: Inventory, child_alive: bool, exclude: frozenset[int] = frozenset()
) -> dict[int, CheckpointStatus]:
    """Map every step in ``inventory`` to its status, as the policy judges them one by one."""
    newest = newest_valid(inventory, exclude=exclude)
    return {entry.step: status_of(entry, newest, child_alive) for entry in inventory.entries}


def valid_steps(inventory: Inventory, exclude: Iterable[int] = frozenset()) -> list[int]:
    """Return the steps that may be resumed from, oldest first, minus ``exclude`` (poisoned)."""
    excluded = frozenset(exclude)
    return sorted(
        entry.step for entry in inventory.entries if is_valid(entry) and entry.step not in excluded
    )


def newest_valid(inventory: Inventory, exclude: Iterable[int] = frozenset()) -> int | None:
    """Return the newest step that may be resumed from, or None when there is none."""
    steps = valid_steps(inventory, exclude)
    return steps[-1] if steps else None


def estimated_checkpoint_bytes(inventory: Inventory) -> int:
    """Estimate the bytes one more checkpoint needs: the largest valid one seen (0 if none).

    The largest, not the newest or the mean: optimizer state and extra files make
    sizes vary a little, and an estimate that is too small means ENOSPC mid-save,
    which is exactly the partial folder this project exists to avoid.
    """
    return max((entry.size_bytes for entry in inventory.entries if is_valid(entry)), default=0)


def auto_reserve(inventory: Inventory) -> int:
    """Return the automatic disk reserve: room for two checkpoints of the largest size seen.

    Two, because a save must fit while the previous checkpoint still exists (it
    is deleted only after the new one commits), plus slack for logs and temp files.
    """
    return 2 * estimated_checkpoint_bytes(inventory)
