"""Read what a run wrote (journal, heartbeat, error.json, checkpoints) and compare adapters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer_child.protocol import (
    COMMIT_RECORD,
    TRAINER_STATE,
    CommitRecord,
    ErrorReport,
    Heartbeat,
    Layout,
    checkpoint_step,
    file_digest,
    read_model,
)

__all__ = [
    "adapter_tensors",
    "assert_bit_identical",
    "checkpoint_steps",
    "error_report",
    "events",
    "heartbeat",
    "max_abs_diff",
    "verify_commit",
]


def _layout(where: Path | Layout) -> Layout:
    return where if isinstance(where, Layout) else Layout(where)


def events(where: Path | Layout) -> list[dict[str, Any]]:
    """Every journal line, parsed, oldest first.

    A last line without its newline is a write in progress (a reader racing the
    supervisor) and is left for the next read; any complete line must parse.
    """
    try:
        text = _layout(where).events.read_text()
    except FileNotFoundError:
        return []
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def heartbeat(where: Path | Layout) -> Heartbeat | None:
    return read_model(_layout(where).heartbeat, Heartbeat)


def error_report(where: Path | Layout) -> ErrorReport | None:
    return read_model(_layout(where).error, ErrorReport)


def checkpoint_steps(output_dir: Path) -> list[int]:
    """Return the N of every ``checkpoint-N`` folder, ascending."""
    return sorted(
        step for path in output_dir.iterdir() if (step := checkpoint_step(path.name)) is not None
    )


def verify_commit(folder: Path, *, expect_step: int | None = None) -> CommitRecord:
    """Check ``warden.json`` against the folder: every file, size and hash, and nothing unlisted."""
    record = read_model(folder / COMMIT_RECORD, CommitRecord)
    assert record is not None, f"{folder} has no readable {COMMIT_RECORD}"
    if expect_step is not None:
        assert record.step == expect_step
    on_disk = {
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and path.name != COMMIT_RECORD
    }
    assert on_disk == {entry.path for entry in record.files}, f"{folder}: listed != present"
    for entry in record.files:
        path = folder / entry.path
        assert path.stat().st_size == entry.size, f"{path}: size differs from the record"
        assert file_digest(path, record.hash_algorithm) == entry.hash, f"{path}: hash differs"
    if (folder / TRAINER_STATE).exists():
        state = json.loads((folder / TRAINER_STATE).read_text())
        assert state["global_step"] == record.step
    assert {"torch", "transformers", "peft"} <= set(record.versions)
    return record


def adapter_tensors(folder: Path) -> dict[str, Any]:
    """Load ``adapter_model.safetensors`` of a final/ or checkpoint folder."""
    from safetensors.torch import load_file

    return dict(load_file(str(folder / "adapter_model.safetensors")))


def assert_bit_identical(got_dir: Path, want_dir: Path) -> int:
    """Assert every adapter tensor is torch.equal to the reference's; return how many there are."""
    import torch

    got, want = adapter_tensors(got_dir), adapter_tensors(want_dir)
    assert sorted(got) == sorted(want), "adapters hold different tensor names"
    different = [name for name in want if not torch.equal(got[name], want[name])]
    assert not different, f"tensors differ from the uninterrupted run: {different}"
    return len(want)


def max_abs_diff(got_dir: Path, want_dir: Path) -> float:
    """The largest absolute difference over all adapter tensors."""
    got, want = adapter_tensors(got_dir), adapter_tensors(want_dir)
    assert sorted(got) == sorted(want)
    return max(float((got[n].float() - want[n].float()).abs().max()) for n in want)
