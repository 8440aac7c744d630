"""The ``inject_callback`` hook against a real transformers Trainer, in fresh interpreters.

Each case runs a short Python program as a ``command:`` child would run: with
the hook's folder first on ``PYTHONPATH`` and ``TRAINWARDEN_INJECT=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import REPO_ROOT
from trainer_child.protocol import ENV_INJECT, ENV_OUTPUT_DIR, SITE_DIR

#: Builds a Trainer on a two-layer GPT-2 made on the spot (no download) and
#: prints which WardenCallbacks it carries.
TRAINER_PROGRAM = """
import json, sys
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from trainer_child.callback import WardenCallback

model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=1, n_embd=8, vocab_size=16, n_positions=8))
args = TrainingArguments(output_dir=sys.argv[1], report_to="none", use_cpu=True)
mode = sys.argv[2]
trainer = Trainer(model=model, args=args,
                  callbacks=[WardenCallback()] if mode == "own" else None)
if mode == "added-later":
    trainer.add_callback(WardenCallback())
wardens = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, WardenCallback)]
print(json.dumps([cb.injected for cb in wardens]))
"""


def run(
    argv: list[str], tmp_path: Path, *, pythonpath: list[str], inject: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINWARDEN_")}
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(pythonpath),
            ENV_OUTPUT_DIR: str(tmp_path / "out"),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    if inject:
        env[ENV_INJECT] = "1"
    return subprocess.run(
        argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("none", [True]), ("own", [False]), ("added-later", [False])],
)
def test_every_trainer_gets_exactly_one_warden_callback(
    tmp_path: Path, mode: str, expected: list[bool]
) -> None:
    """Injected when the script has none; the script's own replaces ours, never two."""
    program = tmp_path / "build.py"
    program.write_text(TRAINER_PROGRAM)
    done = run(
        [sys.executable, str(program), str(tmp_path / "out"), mode],
        tmp_path,
        pythonpath=[str(SITE_DIR), str(REPO_ROOT)],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected


def test_without_the_switch_the_hook_does_nothing(tmp_path: Path) -> None:
    """On PYTHONPATH but without TRAINWARDEN_INJECT=1 no callback is added."""
    program = tmp_path / "build.py"
    program.write_text(TRAINER_PROGRAM)
    done = run(
        [sys.executable, str(program), str(tmp_path / "out"), "none"],
        tmp_path,
        pythonpath=[str(SITE_DIR), str(REPO_ROOT)],
        inject=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_an_uncaught_error_becomes_error_json_with_its_kind(tmp_path: Path) -> None:
    """A wrong model path raised in the user's process is reported as kind config."""
    program = tmp_path / "load.py"
    program.write_text(
        "import transformers\ntransformers.AutoConfig.from_pretrained('/no/such/model')\n"
    )
    done = run([sys.executable, str(program)], tmp_path, pythonpath=[str(SITE_DIR), str(REPO_ROOT)])
    assert done.returncode == 1
    assert "Traceback" in done.stderr  # the user still sees their traceback
    report = json.loads((tmp_path / "out" / ".warden" / "error.json").read_text())
    assert report["kind"] == "config"
    assert "/no/such/model" in report["message"]


def test_the_shadowed_sitecustomize_still_runs(tmp_path: Path) -> None:
    """Python runs only the first sitecustomize on sys.path; ours runs the one it hides."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "sitecustomize.py").write_text("import builtins\nbuiltins.THEIRS_RAN = True\n")
    done = run(
        [sys.executable, "-c", "import builtins; print(getattr(builtins, 'THEIRS_RAN', False))"],
        tmp_path,
        pythonpath=[str(SITE_DIR), str(theirs)],
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_an_interpreter_without_trainwarden_keeps_working(tmp_path: Path) -> None:
    """Another Python (no trainwarden installed) gets one warning and runs unchanged."""
    fake = tmp_path / "fake" / "transformers"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "trainer.py").write_text("class Trainer:\n    pass\n")
    # The base interpreter of this venv: same Python, none of the venv's packages.
    base_python = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}"
    program = "import transformers.trainer as t; print('trained', t.Trainer.__name__)"
    done = run(
        [str(base_python), "-c", program],
        tmp_path,
        pythonpath=[str(SITE_DIR), str(tmp_path / "fake")],
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "trained Trainer"
    assert "trainwarden: cannot add WardenCallback here" in done.stderr
