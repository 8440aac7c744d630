"""Fixtures for supervised runs of programs nobody here wrote: TRL's CLI, a Trainer script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import cache_home, env  # noqa: F401 - shared session fixtures


@pytest.fixture(scope="session")
def tiny_model(cache_home: Path, env: dict[str, str]) -> Path:  # noqa: F811 - fixture argument
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
