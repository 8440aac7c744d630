"""Retention rules (supervisor/core/retention.py): pure, fed with inventories."""

from __future__ import annotations

import pytest

from supervisor.core.model import CheckpointEntry, Integrity, Inventory
from supervisor.core.retention import plan_retention, select_for_removal


def valid(step: int, best: int | None = None) -> CheckpointEntry:
    return CheckpointEntry(step, Integrity.COMPLETE, size_bytes=10, best_step=best)


def inventory_of(*entries: CheckpointEntry) -> Inventory:
    return Inventory(tuple(entries))


def test_keep_last_keeps_the_newest_n_valid_and_deletes_older_oldest_first() -> None:
    """keep_last=2 over steps 2..10 deletes 2, 4, 6 in that order."""
    inventory = inventory_of(*(valid(step) for step in (2, 4, 6, 8, 10)))
    assert select_for_removal(inventory, keep_last=2, keep_best=False) == (2, 4, 6)


def test_keep_last_counts_only_valid_checkpoints() -> None:
    """Partial and corrupt folders neither count towards keep_last nor get selected."""
    inventory = inventory_of(
        valid(2),
        valid(4),
        CheckpointEntry(6, Integrity.CORRUPT),
        CheckpointEntry(8, Integrity.INCOMPLETE),
    )
    assert select_for_removal(inventory, keep_last=2, keep_best=False) == ()


def test_keep_best_keeps_best_checkpoint_older_than_keep_last() -> None:
    """The best checkpoint named by the newest trainer_state survives keep_last."""
    inventory = inventory_of(valid(2, best=2), valid(4, best=2), valid(6, best=4), valid(8, best=4))
    plan = plan_retention(inventory, keep_last=1, keep_best=True)
    assert plan.delete == (2, 6)
    assert dict(plan.kept) == {4: "best", 8: "newest valid"}


def test_keep_best_false_lets_best_go() -> None:
    """With keep_best off the best checkpoint is pruned like any other."""
    inventory = inventory_of(valid(2, best=2), valid(4, best=2), valid(6, best=2))
    assert select_for_removal(inventory, keep_last=1, keep_best=False) == (2, 4)


def test_keep_every_keeps_multiples() -> None:
    """keep_every=4 archives steps 4 and 8 beyond keep_last."""
    inventory = inventory_of(*(valid(step) for step in (2, 4, 6, 8, 10, 12)))
    plan = plan_retention(inventory, keep_last=1, keep_best=False, keep_every=4)
    assert plan.delete == (2, 6, 10)
    assert dict(plan.kept) == {4: "keep_every", 8: "keep_every", 12: "newest valid"}


def test_protected_resume_source_is_kept() -> None:
    """The step the running child resumed from stays while the policy protects it."""
    inventory = inventory_of(valid(2), valid(4), valid(6), valid(8))
    plan = plan_retention(inventory, keep_last=1, keep_best=False, protected={4})
    assert plan.delete == (2, 6)
    assert dict(plan.kept)[4] == "protected"


def test_newest_valid_never_selected_even_with_keep_last_zero() -> None:
    """keep_last=0 still keeps the newest valid checkpoint: it is the resume point."""
    inventory = inventory_of(valid(2), valid(4))
    assert select_for_removal(inventory, keep_last=0, keep_best=False) == (2,)


def test_symlink_and_in_progress_never_selected() -> None:
    """Symlinks and incomplete folders are never retention candidates, in any mode."""
    inventory = inventory_of(
        CheckpointEntry(2, Integrity.COMPLETE, symlink=True),
        valid(4),
        valid(6),
        CheckpointEntry(8, Integrity.INCOMPLETE),
    )
    assert select_for_removal(inventory, keep_last=0, aggressive=True) == (4,)


def test_aggressive_keeps_only_newest_and_protected_dropping_best_and_archives() -> None:
    """Under disk pressure best and keep_every go; the newest and protected steps stay."""
    inventory = inventory_of(*(valid(step, best=2) for step in (2, 4, 6, 8, 10)))
    plan = plan_retention(
        inventory, keep_last=3, keep_best=True, keep_every=4, protected={6}, aggressive=True
    )
    assert plan.delete == (2, 4, 8)
    assert dict(plan.kept) == {6: "protected", 10: "newest valid"}


def test_excluded_newest_is_kept_and_newest_usable_too() -> None:
    """A poisoned newest survives, and so does the newest usable one behind it."""
    inventory = inventory_of(valid(2), valid(4), valid(6), valid(8))
    plan = plan_retention(inventory, keep_last=0, keep_best=False, exclude={8}, aggressive=True)
    assert plan.delete == (2, 4)
    assert dict(plan.kept) == {6: "newest valid not excluded", 8: "newest valid"}


def test_keep_last_counts_usable_checkpoints_only() -> None:
    """Poisoned steps take no keep_last place (4 is kept instead) and go unless kept otherwise."""
    inventory = inventory_of(valid(2), valid(4), valid(6), valid(8))
    plan = plan_retention(inventory, keep_last=2, keep_best=False, exclude={6})
    assert plan.delete == (2, 6)


def test_invalid_settings_are_rejected() -> None:
    """Negative keep_last or a non-positive keep_every is a bug, not a policy."""
    with pytest.raises(ValueError, match="keep_last"):
        plan_retention(Inventory(), keep_last=-1)
    with pytest.raises(ValueError, match="keep_every"):
        plan_retention(Inventory(), keep_last=1, keep_every=0)


def test_fewer_checkpoints_than_keep_last_are_all_kept() -> None:
    """With fewer valid checkpoints than keep_last, nothing is deleted."""
    inventory = Inventory(
        entries=(
            CheckpointEntry(4, Integrity.COMPLETE),
            CheckpointEntry(8, Integrity.COMPLETE),
        )
    )
    assert select_for_removal(inventory, keep_last=3, protected={8}) == ()
