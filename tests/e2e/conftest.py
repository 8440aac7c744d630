"""Session fixtures for real-process tests: one model cache, one reference run per job,
one S3 server for the mirror runs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.jobs import STANDARD_SFT, child_env, run_to_end, write_tiny_job
from tests.support.seaweed import SeaweedS3, running_seaweed


@pytest.fixture(scope="session")
def cache_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One XDG cache for the session, so the built-in model is built once."""
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture(scope="session")
def env(cache_home: Path) -> dict[str, str]:
    """An offline, single-threaded environment for children and supervisors."""
    return child_env(cache_home)


@pytest.fixture(scope="session")
def reference_final(
    tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]
) -> Callable[..., Path]:
    """Return final/ of an uninterrupted run of the standard job (with sft overrides).

    Runs ``python -m trainer_child`` with no supervisor and no fault, once per
    distinct set of overrides, so every recovery test compares against the same
    ground truth.
    """
    cache: dict[str, Path] = {}

    def get(**sft: Any) -> Path:
        settings = {**STANDARD_SFT, **sft}
        key = json.dumps(settings, sort_keys=True)
        if key not in cache:
            root = tmp_path_factory.mktemp("reference")
            job = write_tiny_job(root / "job.json", root / "out", **settings)
            code, log = run_to_end(job, env, root / "child.log", timeout=300)
            assert code == 0, log
            cache[key] = root / "out" / "final"
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_model(cache_home: Path, env: dict[str, str]) -> Path:
    """The built-in tiny GPT-2 as a plain local model folder, as a user would pass it."""
    code = "from trainer_child.builtin import ensure_tiny_gpt2; print(ensure_tiny_gpt2())"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def jsonl_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local dataset folder holding train.jsonl with a ``text`` column (the built-in corpus)."""
    from trainer_child.builtin import corpus_lines

    folder = tmp_path_factory.mktemp("data")
    with (folder / "train.jsonl").open("w") as handle:
        for line in corpus_lines():
            handle.write(json.dumps({"text": line}) + "\n")
    return folder


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One real S3 server (SeaweedFS on loopback) for the session; stopped by PID at the end."""
    with running_seaweed(tmp_path_factory.mktemp("seaweed")) as server:
        yield server
