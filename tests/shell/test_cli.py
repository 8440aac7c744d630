"""The ``trainwarden`` command line against real files: schema, config errors, status, prune.

``status``, ``checkpoints`` and ``prune`` read only files, so their output
directories are built here from the real writers (``FileJournal``,
``atomic_write_model``, ``tests/support/checkpoints.py``) instead of by training.
They run in-process through typer's runner (a wide terminal, so rich does not
wrap rows); ``run`` and the import check run as real processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from supervisor.cli import app
from supervisor.shell.journal import FileJournal
from supervisor.shell.store import FileCheckpointStore
from tests.support.checkpoints import (
    ADAPTER,
    flip_byte,
    make_checkpoint,
    make_final,
    safetensors_data_start,
)
from tests.support.processes import REPO_ROOT
from trainer_child.protocol import (
    EXIT_CONFIG,
    FailureRecord,
    JobFile,
    Layout,
    Overrides,
    RunStateFile,
    atomic_write_model,
)

HEAVY = ("torch", "transformers", "trl", "peft", "datasets")
WIDE = {"COLUMNS": "240"}


def cli(*args: str) -> Any:
    """Invoke the CLI in-process; return click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, list(args), env=WIDE, catch_exceptions=False)


def row(output: str, name: str) -> str:
    """Return the table line whose first cell is exactly ``name``."""
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip("│┃ ").split("│")]
        if cells and cells[0] == name:
            return line
    raise AssertionError(f"no row {name!r} in:\n{output}")


def write_built_in_job(layout: Layout) -> None:
    """Leave ``.warden/job.json`` as the supervisor does: records are then required."""
    layout.ensure()
    job = JobFile.model_validate({"output_dir": str(layout.output_dir), "train": {}})
    atomic_write_model(layout.job, job)


@pytest.fixture
def finished_run(tmp_path: Path) -> Path:
    """An output_dir as a completed supervised run leaves it: 2 crashes and 1 OOM survived."""
    output_dir = tmp_path / "out"
    layout = Layout(output_dir)
    write_built_in_job(layout)
    for step in (4, 8):
        make_checkpoint(output_dir, step)
    make_final(output_dir)
    journal = FileJournal(layout)
    failures = [(1, "crash", 3), (2, "cuda_oom", 5), (3, "crash", 6)]
    journal.append("launch", 1, resume_from=None, resume_step=None)
    for attempt, kind, step in failures:
        journal.append("failure", attempt, kind=kind, step=step, evidence=f"test {kind}")
        journal.append("launch", attempt + 1, resume_from="checkpoint-4", resume_step=4)
    journal.append("completed", 4, restarts=3)
    atomic_write_model(
        layout.state,
        RunStateFile(
            attempts=4,
            restarts=3,
            completed=True,
            status="complete: 8 steps, final/ written",
            mode="completed",
            overrides=Overrides(per_device_train_batch_size=1, gradient_accumulation_steps=2),
            failures=tuple(
                FailureRecord(attempt=a, kind=k, step=s, evidence=f"test {k}")
                for a, k, s in failures
            ),
            newest_valid_step=8,
            step=8,
            max_steps=8,
        ),
    )
    return output_dir


def test_cli_and_loop_import_no_training_libraries() -> None:
    """Importing supervisor.cli and supervisor.loop loads none of torch/transformers/trl/peft."""
    code = (
        "import json, sys\n"
        "import supervisor.cli, supervisor.loop\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_schema_is_a_json_schema_of_the_config() -> None:
    """`trainwarden schema` prints a JSON Schema whose refs resolve and keys are strict."""
    result = cli("schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["type"] == "object"
    assert schema["required"] == ["output_dir"]
    assert schema["additionalProperties"] is False
    assert {"output_dir", "train", "command", "restart", "retention", "disk", "hang"} <= set(
        schema["properties"]
    )
    definitions = schema.get("$defs", {})

    def refs(node: object) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
            return found + [r for value in node.values() for r in refs(value)]
        if isinstance(node, list):
            return [r for value in node for r in refs(value)]
        return []

    for ref in refs(schema):
        assert ref.startswith("#/$defs/"), ref
        assert ref.removeprefix("#/$defs/") in definitions, ref
    assert definitions["RestartConfig"]["additionalProperties"] is False


def test_bad_config_exits_78_naming_every_bad_field(tmp_path: Path) -> None:
    """Unknown keys at two paths and a wrong type: exit 78, each path named, no child started."""
    output_dir = tmp_path / "out"
    config = tmp_path / "bad.yaml"
    document = {
        "output_dir": str(output_dir),
        "train": {"sft": {"max_steps": 4}, "lora": {"rank": 8}},
        "restart": {"max_restart": 5},
        "retention": {"keep_last": "several"},
    }
    config.write_text(yaml.safe_dump(document))
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "run", str(config)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == EXIT_CONFIG, done.stderr
    for path in ("train.lora.rank", "restart.max_restart", "retention.keep_last"):
        assert path in done.stderr, done.stderr
    assert not Layout(output_dir).attempt_log(1).exists()
    assert not output_dir.exists(), "an invalid config must touch nothing"


@pytest.mark.parametrize("target", ["output_dir", "config"])
def test_status_json_of_a_finished_run(finished_run: Path, tmp_path: Path, target: str) -> None:
    """`status --json` on a finished run (by dir or by job file): completed, restarts by kind."""
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(finished_run), "train": {}}))
    result = cli("status", str(finished_run if target == "output_dir" else config), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["state"] == "completed"
    assert report["restarts"] == 3
    assert report["restarts_by_kind"] == {"crash": 2, "cuda_oom": 1}
    assert report["newest_valid_checkpoint"] == 8
    assert report["attempts"] == 4
    assert report["overrides"] == {
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 2,
    }
    assert report["last_failure"]["kind"] == "crash"
    assert report["supervisor_pid"] is None


def test_status_shows_the_mirror_lag(tmp_path: Path) -> None:
    """With a mirror, `status` has a mirror row and `--json` the lag as a number."""
    layout = Layout(tmp_path / "out")
    write_built_in_job(layout)
    line = "remote: checkpoint-4, 2 behind, retrying in 8s (EndpointConnectionError: ...)"
    atomic_write_model(
        layout.state,
        RunStateFile(
            attempts=1, status="step 9/16", mode="running", mirror_status=line, mirror_lag=2
        ),
    )
    report = json.loads(cli("status", str(layout.output_dir), "--json").stdout)
    assert (report["mirror"], report["mirror_lag"]) == (line, 2)
    shown = cli("status", str(layout.output_dir))
    assert shown.exit_code == 0, shown.output
    # The row may wrap on a narrow console: its head is enough.
    heads = [text.split(None, 1) for text in shown.stdout.splitlines() if text.strip()]
    assert ["mirror", "remote: checkpoint-4, 2 behind,"] in [
        [cells[0], cells[1].strip()[: len("remote: checkpoint-4, 2 behind,")]]
        for cells in heads
        if len(cells) == 2
    ], shown.stdout


def test_checkpoints_lists_every_verdict(tmp_path: Path) -> None:
    """`checkpoints` shows valid, partial, corrupt and quarantined folders, each by name."""
    output_dir = tmp_path / "out"
    layout = Layout(output_dir)
    write_built_in_job(layout)
    make_checkpoint(output_dir, 2)
    make_checkpoint(output_dir, 3)
    FileCheckpointStore(output_dir, require_record=True).quarantine(3, "failed to resume: test")
    truncated = make_checkpoint(output_dir, 4) / "optimizer.pt"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    make_checkpoint(output_dir, 6)
    make_checkpoint(output_dir, 8, record=False)

    result = cli("checkpoints", str(output_dir))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert " valid " in row(out, "checkpoint-2")
    assert " quarantined " in row(out, ".warden/quarantine/checkpoint-3")
    # The problems cell may wrap at 80 columns; its first words stay on the row.
    assert "failed to resume" in row(out, ".warden/quarantine/checkpoint-3")
    assert " corrupt " in row(out, "checkpoint-4")
    assert " valid " in row(out, "checkpoint-6")
    assert " partial " in row(out, "checkpoint-8")
    assert "no commit record" in row(out, "checkpoint-8")


def test_checkpoints_deep_finds_a_flipped_byte(tmp_path: Path) -> None:
    """A byte flipped in place (same size, same mtime) is corrupt under --deep only."""
    output_dir = tmp_path / "out"
    write_built_in_job(Layout(output_dir))
    adapter = make_checkpoint(output_dir, 2) / ADAPTER
    flip_byte(adapter, safetensors_data_start(adapter) + 7, keep_mtime=True)
    assert " valid " in row(cli("checkpoints", str(output_dir)).stdout, "checkpoint-2")
    deep = cli("checkpoints", str(output_dir), "--deep")
    assert " corrupt " in row(deep.stdout, "checkpoint-2")


def test_prune_keeps_newest_and_never_touches_a_symlink(tmp_path: Path) -> None:
    """`prune --keep-last 1`: a dry run deletes nothing; a real one spares newest and symlinks."""
    output_dir = tmp_path / "out"
    for step in (2, 4, 6):
        make_checkpoint(output_dir, step)
    # Planted links, one older and one newer than every real checkpoint: their
    # targets hold real, valid checkpoints that must survive.
    planted = {}
    for step in (1, 8):
        target = make_checkpoint(tmp_path / f"elsewhere-{step}", step)
        planted[step] = output_dir / f"checkpoint-{step}"
        planted[step].symlink_to(target, target_is_directory=True)

    dry = cli("prune", str(output_dir), "--keep-last", "1", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "would remove checkpoint-2" in dry.stdout
    assert "would remove checkpoint-4" in dry.stdout
    for kept in ("checkpoint-1", "checkpoint-6", "checkpoint-8"):
        assert kept not in dry.stdout
    for step in (2, 4, 6):
        assert (output_dir / f"checkpoint-{step}" / "warden.json").is_file()

    real = cli("prune", str(output_dir), "--keep-last", "1")
    assert real.exit_code == 0, real.output
    assert not (output_dir / "checkpoint-2").exists()
    assert not (output_dir / "checkpoint-4").exists()
    assert (output_dir / "checkpoint-6" / "warden.json").is_file()
    for step, link in planted.items():
        assert link.is_symlink()
        assert (tmp_path / f"elsewhere-{step}" / f"checkpoint-{step}" / "warden.json").is_file()
