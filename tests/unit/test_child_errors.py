"""The training child's exception -> kind rules and failpoint parsing, without processes."""

from __future__ import annotations

import errno

import pytest

from trainer_child.errors import (
    ConfigError,
    DataError,
    ResumeError,
    classify,
    exit_code_for,
    find_errno,
)
from trainer_child.failpoints import Failpoint, FailpointError, Kind, parse
from trainer_child.protocol import EXIT_CONFIG, ErrorKind


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as exc:
        return exc


def test_enospc_behind_a_wrapper_is_disk_full() -> None:
    """An ENOSPC anywhere in the __cause__ chain makes the failure disk_full."""
    exc = _chained(ValueError("saving failed"), OSError(errno.ENOSPC, "No space left on device"))
    assert classify(exc) is ErrorKind.DISK_FULL
    assert find_errno(exc) == errno.ENOSPC


@pytest.mark.parametrize(
    "message",
    [
        "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0",
        "PytorchStreamWriter failed writing file data/0: file write failed",
        "Error while serializing: IoError(Os { code: 28, kind: StorageFull })",
    ],
)
def test_torch_and_rust_disk_full_messages_are_disk_full(message: str) -> None:
    """torch.save and safetensors lose the errno on a full disk; their words still say it."""
    assert classify(RuntimeError(message)) is ErrorKind.DISK_FULL


def test_cuda_oom_message_wins_over_config() -> None:
    """A CUDA OOM is remediable even when a config error wraps it."""
    exc = _chained(ConfigError("trainer rejected"), RuntimeError("CUDA out of memory. Tried"))
    assert classify(exc) is ErrorKind.CUDA_OOM


def test_memory_error_is_host_oom() -> None:
    """MemoryError (and torch's CPU allocator failure) is host_oom."""
    assert classify(MemoryError()) is ErrorKind.HOST_OOM
    alloc = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1")
    assert classify(alloc) is ErrorKind.HOST_OOM


def test_config_and_data_errors_exit_78() -> None:
    """Config and data errors are never retried: exit 78."""
    assert classify(ConfigError("x")) is ErrorKind.CONFIG
    assert classify(DataError("x")) is ErrorKind.DATA
    assert exit_code_for(ErrorKind.CONFIG) == EXIT_CONFIG
    assert exit_code_for(ErrorKind.DATA) == EXIT_CONFIG
    assert exit_code_for(ErrorKind.CRASH) == 1


def test_failure_while_loading_resume_checkpoint_is_resume() -> None:
    """A plain error is a crash, but a resume error while the checkpoint is loading."""
    assert classify(RuntimeError("boom")) is ErrorKind.CRASH
    assert classify(RuntimeError("boom"), loading_resume=True) is ErrorKind.RESUME
    assert classify(ResumeError("gone")) is ErrorKind.RESUME
    assert classify(ConfigError("typo"), loading_resume=True) is ErrorKind.CONFIG


def test_failpoints_parse_every_kind() -> None:
    """The documented syntax parses into one Failpoint per ';'-separated item."""
    points = parse("cuda_oom@step=3,times=1; hang@step=5;exit@step=7,code=9;slow_save@seconds=1.5")
    assert points == (
        Failpoint(Kind.CUDA_OOM, step=3, times=1),
        Failpoint(Kind.HANG, step=5),
        Failpoint(Kind.EXIT, step=7, code=9),
        Failpoint(Kind.SLOW_SAVE, seconds=1.5),
    )
    assert parse("") == ()


@pytest.mark.parametrize(
    "text", ["boom@step=1", "crash", "crash@step=0", "crash@stp=2", "slow_save", "hang@step=x"]
)
def test_malformed_failpoints_are_config_errors(text: str) -> None:
    """A malformed spec raises FailpointError, a ConfigError (exit 78)."""
    with pytest.raises(FailpointError) as info:
        parse(text)
    assert classify(info.value) is ErrorKind.CONFIG
