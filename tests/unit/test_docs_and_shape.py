"""The repository keeps its own promises: the architecture doc matches the tables, code stays small.

- docs/architecture.md answers "what happens when..." for every failure kind by
  naming one row of TRANSITIONS, OUTCOMES or REMEDIES, and each named row exists
  and is handled by the function the doc names;
- nothing in the repository points outside it (the repo stands alone);
- no function in supervisor/ or trainer_child/ is longer than 60 lines;
- every seam's Protocol has a fake in supervisor/shell/testing.py with its methods.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import pkgutil
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from supervisor.core import model
from supervisor.core.classify import Outcome
from supervisor.core.model import FailureKind, Mode
from supervisor.core.policy import OUTCOMES, REMEDIES, TRANSITIONS
from supervisor.shell import testing

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
MAX_FUNCTION_LINES = 60
_ROW = re.compile(
    r"`(?P<table>REMEDIES|OUTCOMES|TRANSITIONS)\[(?P<key>[^\]]+)\]`\s*\(`(?P<handler>\w+)`\)"
)


def _policy_rows() -> list[tuple[str, str, str]]:
    """(kind, row reference, handler name) for each line of the doc's policy table."""
    section = DOC.read_text().split("## The policy table", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and (match := _ROW.search(cells[2])):
            rows.append((cells[1].strip("`"), match.group(0), match.group("handler")))
    return rows


def _lookup(reference: str) -> Any:
    match = _ROW.search(reference)
    assert match is not None
    namespace = {"FailureKind": FailureKind, "Mode": Mode, "Outcome": Outcome, **vars(model)}
    key = eval(match.group("key"), namespace)
    tables: dict[str, Mapping[Any, Any]] = {
        "REMEDIES": REMEDIES,
        "OUTCOMES": OUTCOMES,
        "TRANSITIONS": TRANSITIONS,
    }
    table = tables[match.group("table")]
    assert key in table, f"{reference}: no such row"
    return table[key]


def test_the_architecture_doc_names_one_existing_row_for_every_failure_kind() -> None:
    """Each failure kind has a row in the doc's table naming a table entry that exists."""
    rows = _policy_rows()
    assert {kind for kind, _, _ in rows} == {kind.value for kind in FailureKind}
    for kind, reference, handler in rows:
        assert _lookup(reference).__name__ == handler, f"{kind}: {reference} is not {handler}"


def test_the_doc_names_every_remedy() -> None:
    """Every REMEDIES row is cited in the doc, so adding a kind means documenting it."""
    text = DOC.read_text()
    for kind in REMEDIES:
        assert f"REMEDIES[FailureKind.{kind.name}]" in text


def _text_files() -> list[Path]:
    skip = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", "runs", "build"}
    suffixes = {".py", ".md", ".toml", ".cfg", ".sh", ".service", ".yaml", ".yml", ".txt"}
    found = []
    for folder, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.endswith(".egg-info")]
        for name in filenames:
            path = Path(folder) / name
            if path.suffix in suffixes or name in ("Makefile", "run"):
                found.append(path)
    return found


def test_nothing_in_the_repository_points_outside_it() -> None:
    """The repo stands alone: its contract is docs/architecture.md, not a file elsewhere."""
    outside = ("DESIGN" + ".md", "STYLE" + ".md", "../" + "shared")
    offenders = [
        f"{path.relative_to(ROOT)}: {needle}"
        for path in _text_files()
        for needle in outside
        if needle in path.read_text(errors="replace")
    ]
    assert offenders == []


def test_no_function_is_longer_than_sixty_lines() -> None:
    """Functions in supervisor/ and trainer_child/ stay readable in one screen."""
    long = []
    for package in ("supervisor", "trainer_child"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {lines}")
    assert long == []


def _protocols() -> list[type]:
    """Every Protocol defined in a module of supervisor/shell (found, not listed by hand)."""
    import supervisor.shell

    modules = [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(supervisor.shell.__path__, "supervisor.shell.")
        if info.name != testing.__name__
    ]
    return [
        cls
        for module in modules
        for _, cls in inspect.getmembers(module, inspect.isclass)
        # A Protocol itself, not a class that implements one (prometheus' Collector is one).
        if cls.__module__ == module.__name__ and getattr(cls, "_is_protocol", False)
    ]


def _members(protocol: type) -> set[str]:
    return {name for name in vars(protocol) if not name.startswith("_")}


#: Protocols whose stand-in is not in testing.py, and why.
NO_FAKE_NEEDED = {
    # How the mirror runs a batch of transfers; its in-thread runner, remote.Sequential,
    # is the default and the stand-in alike.
    "Transfers",
}


def test_every_seam_has_a_fake_with_its_methods() -> None:
    """Each Protocol of supervisor/shell has a fake in testing.py offering all its members."""
    fakes = [cls for _, cls in inspect.getmembers(testing, inspect.isclass)]
    protocols = [p for p in _protocols() if p.__name__ not in NO_FAKE_NEEDED]
    assert len(protocols) >= 12
    for protocol in protocols:
        matching = [fake for fake in fakes if _members(protocol) <= set(dir(fake))]
        assert matching, f"no fake in supervisor/shell/testing.py implements {protocol.__name__}"
