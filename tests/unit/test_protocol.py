"""The contract's single homes: the checkpoint name rule and the words that name a failure."""

from __future__ import annotations

import pytest

from trainer_child.errors import classify
from trainer_child.protocol import (
    CUDA_OOM_MARKERS,
    DISK_FULL_MARKERS,
    ErrorKind,
    checkpoint_name,
    checkpoint_step,
    mentions,
)


@pytest.mark.parametrize("step", [0, 7, 1200])
def test_name_and_step_map_one_to_one(step: int) -> None:
    """checkpoint_step reads back exactly what checkpoint_name writes."""
    assert checkpoint_step(checkpoint_name(step)) == step


@pytest.mark.parametrize(
    "name", ["checkpoint-05", "checkpoint-\u0665", "checkpoint-", "checkpoint-1x", "Checkpoint-1"]
)
def test_only_canonical_names_are_checkpoints(name: str) -> None:
    """Leading zeros and non-ASCII digits (which int() accepts) name no checkpoint."""
    assert checkpoint_step(name) is None


def test_a_negative_step_has_no_name() -> None:
    """checkpoint--1 is never a folder trainwarden made."""
    with pytest.raises(ValueError, match=">= 0"):
        checkpoint_name(-1)


def test_markers_match_whatever_the_case() -> None:
    """One matcher for both sides: case-insensitive, over the same tuples."""
    assert mentions("RuntimeError: CUDA Out Of Memory. Tried", CUDA_OOM_MARKERS)
    assert mentions("[Errno 28] NO SPACE LEFT ON DEVICE", DISK_FULL_MARKERS)
    assert not mentions("loss 0.25", CUDA_OOM_MARKERS + DISK_FULL_MARKERS)


def test_the_child_knows_every_word_the_supervisor_reads_in_logs() -> None:
    """cuBLAS failing to allocate is an OOM for the child too (it once was only the log's)."""
    message = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
    assert classify(RuntimeError(message)) is ErrorKind.CUDA_OOM
    for marker in CUDA_OOM_MARKERS:
        assert classify(RuntimeError(f"x {marker.upper()} y")) is ErrorKind.CUDA_OOM
    for marker in DISK_FULL_MARKERS:
        assert classify(RuntimeError(f"x {marker.upper()} y")) is ErrorKind.DISK_FULL
