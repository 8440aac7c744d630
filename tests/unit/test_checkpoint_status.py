"""Pure rules that turn verifier verdicts into statuses (supervisor/core/checkpoints.py)."""

from __future__ import annotations

import pytest

from supervisor.core.checkpoints import (
    auto_reserve,
    estimated_checkpoint_bytes,
    newest_valid,
    status_of,
    statuses_of,
    valid_steps,
)
from supervisor.core.model import CheckpointEntry, CheckpointStatus, Integrity, Inventory

COMPLETE, INCOMPLETE, CORRUPT = Integrity.COMPLETE, Integrity.INCOMPLETE, Integrity.CORRUPT


def entry(step: int, integrity: Integrity = COMPLETE, **kwargs: object) -> CheckpointEntry:
    return CheckpointEntry(step, integrity, **kwargs)  # type: ignore[arg-type]


def test_complete_folder_is_valid_whatever_the_child_does() -> None:
    """A complete checkpoint is VALID with the child alive or gone."""
    assert status_of(entry(4), 4, child_alive=True) is CheckpointStatus.VALID
    assert status_of(entry(4), 4, child_alive=False) is CheckpointStatus.VALID


def test_incomplete_newer_than_newest_valid_is_in_progress_while_child_alive() -> None:
    """An incomplete folder past the newest valid one is the save in flight while the child runs."""
    assert status_of(entry(6, INCOMPLETE), 4, child_alive=True) is CheckpointStatus.IN_PROGRESS


def test_incomplete_with_no_valid_checkpoint_yet_is_in_progress_while_child_alive() -> None:
    """The very first save is in progress, not partial, while the child is alive."""
    assert status_of(entry(2, INCOMPLETE), None, child_alive=True) is CheckpointStatus.IN_PROGRESS


def test_incomplete_becomes_partial_once_child_is_gone() -> None:
    """Nobody will finish a save whose writer is dead: it is PARTIAL."""
    assert status_of(entry(6, INCOMPLETE), 4, child_alive=False) is CheckpointStatus.PARTIAL
    assert status_of(entry(2, INCOMPLETE), None, child_alive=False) is CheckpointStatus.PARTIAL


def test_incomplete_older_than_newest_valid_is_partial_even_while_alive() -> None:
    """HF saves in step order, so an incomplete folder behind a valid one is abandoned."""
    assert status_of(entry(2, INCOMPLETE), 4, child_alive=True) is CheckpointStatus.PARTIAL


@pytest.mark.parametrize("alive", [True, False])
def test_corrupt_stays_corrupt(alive: bool) -> None:
    """A record that the bytes contradict is CORRUPT, even when newest and the child alive."""
    assert status_of(entry(8, CORRUPT), 4, child_alive=alive) is CheckpointStatus.CORRUPT


@pytest.mark.parametrize("integrity", [COMPLETE, INCOMPLETE, CORRUPT])
def test_symlink_is_symlink_whatever_its_integrity(integrity: Integrity) -> None:
    """A symlinked checkpoint-N is SYMLINK, never VALID, even if it claims COMPLETE."""
    assert status_of(entry(9, integrity, symlink=True), 4, True) is CheckpointStatus.SYMLINK


def test_newest_valid_skips_incomplete_corrupt_symlink_and_excluded() -> None:
    """The resume point is the newest COMPLETE real folder not in ``exclude``."""
    inventory = Inventory(
        (
            entry(2),
            entry(4),
            entry(6, CORRUPT),
            entry(8, symlink=True),
            entry(10, INCOMPLETE),
        )
    )
    assert newest_valid(inventory) == 4
    assert newest_valid(inventory, exclude=frozenset({4})) == 2
    assert newest_valid(inventory, exclude={2, 4}) is None
    assert valid_steps(inventory) == [2, 4]


def test_newest_valid_of_empty_inventory_is_none() -> None:
    """No checkpoint yet means a fresh start."""
    assert newest_valid(Inventory()) is None
    assert valid_steps(Inventory()) == []


def test_statuses_of_judges_every_entry_against_newest_valid() -> None:
    """statuses_of applies status_of to each entry with the inventory's newest valid step."""
    inventory = Inventory((entry(2, INCOMPLETE), entry(4), entry(6, INCOMPLETE)))
    assert statuses_of(inventory, child_alive=True) == {
        2: CheckpointStatus.PARTIAL,
        4: CheckpointStatus.VALID,
        6: CheckpointStatus.IN_PROGRESS,
    }


def test_size_estimate_is_largest_valid_checkpoint_and_reserve_twice_that() -> None:
    """Disk needs are sized by the largest valid checkpoint; partial ones do not count."""
    inventory = Inventory(
        (
            entry(2, size_bytes=100),
            entry(4, size_bytes=300),
            entry(6, INCOMPLETE, size_bytes=900),
            entry(8, size_bytes=200),
        )
    )
    assert estimated_checkpoint_bytes(inventory) == 300
    assert auto_reserve(inventory) == 600
    assert auto_reserve(Inventory()) == 0
