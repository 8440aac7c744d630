"""Which attempts a warm standby may run, its key, and when memory allows one (core/standby.py)."""

from __future__ import annotations

import pytest

from supervisor.core.standby import Cold, Recipe, memory_shortfall, recipe_for
from trainer_child.protocol import ENV_ATTEMPT, ENV_MICRO_BATCH, ENV_RESUME_FROM
from trainer_child.standby import script_imports

PY = "/venv/bin/python"
ENV = {"PATH": "/usr/bin", ENV_ATTEMPT: "1", ENV_RESUME_FROM: ""}
MIB = 1 << 20


def recipe(argv: list[str], env: dict[str, str] | None = None, **kw: str) -> Recipe | Cold:
    return recipe_for(argv, ENV if env is None else env, "/work", python=PY, **kw)


def test_builtin_job_is_recognised_with_its_arguments() -> None:
    """``python -m trainer_child --job J`` with our own interpreter is the built-in job."""
    found = recipe([PY, "-m", "trainer_child", "--job", "j.json", "--resume-from", "/c"])
    assert isinstance(found, Recipe)
    assert (found.kind, found.target) == ("builtin", "")
    assert found.interpreter == (PY,)
    assert found.args == ("--job", "j.json", "--resume-from", "/c")


def test_python_module_and_script_with_interpreter_options() -> None:
    """``python -u -m mod ...`` and ``python3 -W ignore script.py ...`` qualify, options kept."""
    module = recipe(["python3", "-u", "-m", "trl.scripts.sft", "--max_steps", "5"])
    assert isinstance(module, Recipe)
    assert (module.kind, module.target, module.interpreter) == (
        "module",
        "trl.scripts.sft",
        ("python3", "-u"),
    )
    assert module.args == ("--max_steps", "5")
    script = recipe(["/usr/bin/python3.11", "-W", "ignore", "-X", "dev", "train.py", "--a"])
    assert isinstance(script, Recipe)
    assert (script.kind, script.target, script.args) == ("script", "train.py", ("--a",))
    assert script.interpreter == ("/usr/bin/python3.11", "-W", "ignore", "-X", "dev")


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (
            ["torchrun", "--nproc-per-node=2", "train.py"],
            "not a python module or script (torchrun)",
        ),
        (["bash", "run.sh"], "not a python module or script (bash)"),
        (["python", "-m", "torch.distributed.run", "train.py"], "fresh interpreters"),
        (["python", "-m", "accelerate.commands.launch", "train.py"], "fresh interpreters"),
        (["python", "-m", "trainer_child.launch", "--nproc-per-node", "2"], "fresh interpreters"),
        (["python", "-c", "print(1)"], "python -c"),
        (["python", "--check-hash-based-pycs", "always", "t.py"], "not supported"),
        (["python", "-m"], "without a module"),
    ],
)
def test_anything_else_starts_cold_and_says_why(argv: list[str], why: str) -> None:
    """A shell script, torchrun, a launcher module or python -c falls back to a cold start."""
    found = recipe(argv)
    assert isinstance(found, Cold)
    assert why in found.reason


def test_the_key_ignores_what_changes_every_attempt() -> None:
    """Attempt number and resume path come with go: the standby stays valid across attempts."""
    argv = ["python", "-m", "trl.scripts.sft", "--x"]
    first = recipe(argv, {**ENV, ENV_ATTEMPT: "1", ENV_RESUME_FROM: ""})
    later = recipe(
        [*argv, "--resume_from_checkpoint", "/o/checkpoint-8"],
        {**ENV, ENV_ATTEMPT: "7", ENV_RESUME_FROM: "/o/checkpoint-8"},
    )
    assert isinstance(first, Recipe)
    assert isinstance(later, Recipe)
    assert first.key == later.key


def test_the_key_changes_with_overrides_environment_target_and_job() -> None:
    """A halved micro-batch, another variable, another module or job file: another key."""
    argv = ["python", "-m", "mod"]
    base = recipe(argv)
    changed = [
        recipe(argv, {**ENV, ENV_MICRO_BATCH: "1"}),
        recipe(argv, {**ENV, "CUDA_VISIBLE_DEVICES": "1"}),
        recipe(["python", "-m", "other"]),
        recipe(["python", "-O", "-m", "mod"]),
        recipe(argv, job_text='{"overrides": {}}'),
    ]
    assert isinstance(base, Recipe)
    keys = [c.key for c in changed if isinstance(c, Recipe)]
    assert len(keys) == len(changed)
    assert base.key not in keys
    assert len(set(keys)) == len(keys)


def test_memory_must_hold_twice_the_standby() -> None:
    """auto keeps a standby only while twice its size is available, and says why not."""
    assert memory_shortfall(4096 * MIB, 1024 * MIB) is None
    why = memory_shortfall(1500 * MIB, 1024 * MIB)
    assert why is not None
    assert "1500 MiB" in why
    assert "2048 MiB" in why
    assert memory_shortfall(None, 1) == "host memory unknown"


def test_script_imports_take_safe_packages_at_load_time_only() -> None:
    """Top-level imports from known packages, resolved; functions and __main__ blocks skipped."""
    source = """
import os
import torch, mylib
from trl import SFTTrainer, TrlParser
from . import helpers
from .sub import thing
try:
    import transformers.trainer
except ImportError:
    pass

def main():
    import peft

if __name__ == "__main__":
    import datasets
"""
    found = script_imports(source, "trl.scripts")
    assert found == [
        ("torch", ()),
        ("trl", ("SFTTrainer", "TrlParser")),
        ("trl.scripts", ("helpers",)),
        ("trl.scripts.sub", ("thing",)),
        ("transformers.trainer", ()),
    ]
    assert script_imports("from . import x", None) == []
