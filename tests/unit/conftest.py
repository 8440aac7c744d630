"""Unit tests touch no disk and no ``/proc``: every test here is watched, and fails if it does.

An audit hook (PEP 578) sees every ``open`` and every call that changes the
filesystem while a unit test sets up, runs and tears down; opening anything for
writing, creating, renaming or deleting anything, or reading under ``/proc``
fails the test (bytecode caching by the import system excepted). The leak check
is redone here without ``/proc``: the root one reads it through psutil.
``tests/system/test_unit_sealed.py`` proves the same from outside, running this
directory in a mount namespace where every filesystem is read-only and ``/proc``
is empty.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

#: Audit events that change the filesystem whatever their arguments.
_CHANGES = frozenset(
    {
        "os.chmod",
        "os.chown",
        "os.link",
        "os.mkdir",
        "os.remove",
        "os.rename",
        "os.rmdir",
        "os.symlink",
        "os.truncate",
        "os.utime",
        "shutil.copyfile",
        "shutil.copytree",
        "shutil.move",
        "shutil.rmtree",
    }
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class _Watch:
    active = False
    seen: list[str] = []


def _path(value: Any) -> str | None:
    if isinstance(value, (str, bytes, os.PathLike)):
        return os.fsdecode(value)
    return None  # a file descriptor


def _bytecode(path: str) -> bool:
    return "__pycache__" in path


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _Watch.active:
        return
    if event == "open":
        path = _path(args[0])
        if path is None:
            return
        mode, flags = args[1], args[2]
        writes = bool(mode and set(str(mode)) & set("wax+")) or bool(flags and flags & _WRITE_FLAGS)
        if path.startswith("/proc"):
            _Watch.seen.append(f"read {path}")
        elif writes and not _bytecode(path):
            _Watch.seen.append(f"opened {path} for writing")
    elif event in ("os.listdir", "os.scandir"):
        path = _path(args[0])
        if path is not None and path.startswith("/proc"):
            _Watch.seen.append(f"listed {path}")
    elif event in _CHANGES:
        paths = [p for p in map(_path, args) if p is not None]
        if not any(_bytecode(p) for p in paths):
            _Watch.seen.append(f"{event} {paths}")
    elif event == "socket.bind" and isinstance(args[1], str):
        _Watch.seen.append(f"bound a socket at {args[1]}")


sys.addaudithook(_audit)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    _Watch.seen.clear()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    _Watch.active = True
    try:
        yield
    finally:
        _Watch.active = False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    _Watch.active = True
    try:
        yield
    finally:
        _Watch.active = False
    if _Watch.seen:
        pytest.fail("a unit test touched the disk or /proc: " + "; ".join(_Watch.seen[:5]))


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves a thread or a child process behind (checked without /proc)."""
    threads_before = set(threading.enumerate())
    had_children = _has_children()
    yield
    threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    problems = [f"threads left running: {[t.name for t in threads]}"] if threads else []
    if not had_children and _has_children():
        problems.append("a unit test started a process")
    if problems:
        pytest.fail("; ".join(problems))


def _has_children() -> bool:
    """Whether this process has any child, alive or not, without reaping it (no /proc)."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True
