"""WardenCallback's stop-and-commit protocol on one rank, its peers scripted.

HF's own ``TrainingArguments``, ``TrainerState`` and ``TrainerControl`` drive the
callback as the training loop would; ``ScriptedRanks`` answers the collectives
as the other ranks would have (one of them got SIGTERM, or none did), and logs
every call so the order (agree, save, agree, commit, barrier, exit) is checked.
Two real ranks are proven in ``tests/e2e/test_multirank.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from trainer_child.protocol import (
    COMMIT_RECORD,
    EXIT_PREEMPTED,
    CommitRecord,
    ErrorKind,
    ErrorReport,
    Layout,
    read_model,
)
from trainer_child.ranks import missing_rank_files

MAX_STEPS = 16


@dataclass
class ScriptedRanks:
    """Two ranks, this one ``rank``; ``peer_stops`` says whether another rank got SIGTERM."""

    rank: int
    peer_stops: bool
    world_size: int = 2
    device: str = "cpu"
    calls: list[str] = field(default_factory=list)

    @property
    def distributed(self) -> bool:
        return True

    def any(self, flag: bool) -> bool:
        self.calls.append(f"any({flag})")
        return flag or self.peer_stops

    def barrier(self) -> None:
        self.calls.append("barrier")


@dataclass
class Loop:
    """One rank's callback, the HF objects it is driven with, and its scripted peers."""

    callback: Any
    args: Any
    state: Any
    control: Any
    ranks: ScriptedRanks
    output_dir: Path

    def step_end(self, step: int) -> None:
        self.state.global_step = step
        self.callback.on_step_end(self.args, self.state, self.control)

    def save(self, *files: str) -> None:
        """HF's save of this step has written ``files`` (all ranks'), then calls on_save."""
        folder = self.output_dir / f"checkpoint-{self.state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("adapter_model.safetensors", *files):
            (folder / name).write_bytes(b"x")
        self.callback.on_save(self.args, self.state, self.control)

    def record(self) -> CommitRecord | None:
        folder = self.output_dir / f"checkpoint-{self.state.global_step}"
        return read_model(folder / COMMIT_RECORD, CommitRecord)


@pytest.fixture
def loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make a callback on rank ``rank`` whose peers answer as scripted."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from trainer_child import callback as callback_module

    monkeypatch.setattr(callback_module._Preemption, "requested", False)

    def make(rank: int, *, peer_stops: bool) -> Loop:
        output_dir = tmp_path / "out"
        args = TrainingArguments(output_dir=str(output_dir), report_to="none", use_cpu=True)
        state = TrainerState()
        state.max_steps = MAX_STEPS
        state.is_world_process_zero = rank == 0
        warden = callback_module.WardenCallback(handle_sigterm=False)
        ranks = ScriptedRanks(rank=rank, peer_stops=peer_stops)
        warden.ranks = cast(Any, ranks)  # duck-typed stand-in for trainer_child.ranks.Ranks
        return Loop(warden, args, state, TrainerControl(), ranks, output_dir)

    return make


def test_a_sigterm_elsewhere_makes_this_rank_save_the_same_step_and_exit_75(loop: Any) -> None:
    """Rank 1 never got SIGTERM; rank 0 did: rank 1 saves this step, waits, exits 75."""
    rank1 = loop(1, peer_stops=True)
    rank1.step_end(5)
    assert rank1.control.should_save
    with pytest.raises(SystemExit) as stopped:
        rank1.save("rng_state_1.pth")
    assert stopped.value.code == EXIT_PREEMPTED
    # Agree at the step end, agree again once saved, then wait for rank 0's record.
    assert rank1.ranks.calls == ["any(False)", "any(True)", "barrier"]
    assert rank1.record() is None, "only rank 0 writes the record"
    assert not Layout(rank1.output_dir).error.exists(), "only rank 0 reports"


def test_rank_0_commits_every_ranks_files_before_the_barrier_and_reports(loop: Any) -> None:
    """Rank 0 seals the emergency checkpoint listing both rng states, then all leave."""
    rank0 = loop(0, peer_stops=True)
    rank0.step_end(5)
    with pytest.raises(SystemExit):
        rank0.save("rng_state_0.pth", "rng_state_1.pth")
    record = rank0.record()
    assert record is not None
    assert (record.step, record.reason, record.world_size) == (5, "emergency", 2)
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {entry.path for entry in record.files}
    assert rank0.ranks.calls[-1] == "barrier"
    report = read_model(Layout(rank0.output_dir).error, ErrorReport)
    assert report is not None
    assert (report.kind, report.step) == (ErrorKind.PREEMPTED, 5)


def test_no_record_vouches_for_a_checkpoint_missing_a_ranks_part(loop: Any) -> None:
    """A periodic save whose rng_state_1.pth is absent is left without a record."""
    rank0 = loop(0, peer_stops=False)
    rank0.step_end(8)
    rank0.save("rng_state_0.pth")
    assert rank0.record() is None
    rank0.step_end(16)
    rank0.save("rng_state_0.pth", "rng_state_1.pth")
    record = rank0.record()
    assert record is not None
    assert record.reason == "periodic"


def test_every_step_end_is_one_collective_even_when_nobody_stops(loop: Any) -> None:
    """One all-reduce per step and per save, on every rank alike: the collectives pair up."""
    rank1 = loop(1, peer_stops=False)
    for step in range(1, 4):
        rank1.step_end(step)
    assert not rank1.control.should_save
    assert rank1.ranks.calls == ["any(False)"] * 3


def test_at_the_last_step_a_stop_finishes_the_run_instead(loop: Any) -> None:
    """A SIGTERM agreed at max_steps saves, commits and carries on to final/: no exit 75."""
    rank0 = loop(0, peer_stops=True)
    rank0.step_end(MAX_STEPS)
    rank0.save("rng_state_0.pth", "rng_state_1.pth")
    record = rank0.record()
    assert record is not None
    assert record.reason == "emergency"
    assert "barrier" not in rank0.ranks.calls


def test_missing_rank_files_names_the_rank_that_has_not_saved(tmp_path: Path) -> None:
    """Every rank's rng_state_K.pth must be there before rank 0 may vouch for the folder."""
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x")
    assert missing_rank_files(tmp_path, 2) == []  # save_only_model: no rank writes one
    (tmp_path / "rng_state_0.pth").write_bytes(b"x")
    assert missing_rank_files(tmp_path, 2) == ["rng_state_1.pth"]
    (tmp_path / "rng_state_1.pth").write_bytes(b"x")
    assert missing_rank_files(tmp_path, 2) == []
    assert missing_rank_files(tmp_path, 1) == []
