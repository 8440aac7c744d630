"""Real ``python -m trainer_child`` processes on the built-in tiny job, offline.

One uninterrupted run is the reference every recovery path must reproduce bit
for bit: resumed, preempted by SIGTERM, or killed mid-save. The runs that need
no interaction (the reference and the one-shot failures) go through one pool of
two processes at a time, one per core of the target machine, so the module stays
within its time budget; the interactive ones run in their own tests.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.capabilities import absent, require
from tests.support.jobs import TINY_SFT, child_env, run_to_end, trainer_child_argv, write_tiny_job
from tests.support.outputs import (
    assert_bit_identical,
    checkpoint_steps,
    error_report,
    heartbeat,
    verify_commit,
)
from tests.support.processes import Launch, run_all, run_process, wait_for
from trainer_child.protocol import (
    COMMIT_RECORD,
    ENV_FAILPOINTS,
    EXIT_CONFIG,
    EXIT_PREEMPTED,
    ErrorKind,
    ErrorReport,
    Layout,
    Phase,
    read_model,
)

pytestmark = pytest.mark.slow

MAX_STEPS = TINY_SFT["max_steps"]
SAVE_STEPS = TINY_SFT["save_steps"]
#: A checkpoint is ~110 KiB; .warden needs ~76 KiB (heartbeat + the 64 KiB error reserve).
TMPFS_SIZE = "128k"


@dataclass(frozen=True)
class Run:
    """A finished child: where it wrote, how it ended, and the tail of its log."""

    output_dir: Path
    exit_code: int
    log: str


@dataclass(frozen=True)
class Batch:
    """The pooled one-shot runs, by name, plus the cache they built the model in."""

    cache_home: Path
    runs: dict[str, Run]
    #: Where the ENOSPC run copied its error.json (None when that run was skipped).
    enospc_report: Path | None
    enospc_skip: str | None


def _enospc_launch(root: Path, env: dict[str, str]) -> tuple[Launch, Path, Path]:
    """Run the child with output_dir on a tiny tmpfs in a private mount namespace.

    The model loads from the cache (not on the tmpfs), so loading works and the
    first checkpoint hits ENOSPC. error.json lives on that tmpfs, which vanishes
    with the namespace, so the shell copies it out once the child has exited.
    """
    out = root / "out"
    out.mkdir(parents=True)
    job = write_tiny_job(root / "job.json", out, save_steps=2, max_steps=4)
    copy = root / "error.json"
    inner = " ".join(trainer_child_argv(job))
    script = (
        f"mount -t tmpfs -o size={TMPFS_SIZE} tmpfs {out} && {{ {inner}; code=$?; "
        f"cp {out}/.warden/error.json {copy}; ls -lR {out} >&2; exit $code; }}"
    )
    argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
    return Launch("enospc", argv, env, root / "child.log"), out, copy


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Batch:
    cache_home = tmp_path_factory.mktemp("xdg-cache")
    env = child_env(cache_home)
    launches: list[Launch] = []
    outputs: dict[str, Path] = {}

    def add(name: str, extra_env: dict[str, str] | None = None, **sft: object) -> None:
        root = tmp_path_factory.mktemp(name)
        outputs[name] = root / "out"
        job = write_tiny_job(root / "job.json", root / "out", **sft)
        launches.append(
            Launch(name, trainer_child_argv(job), {**env, **(extra_env or {})}, root / "child.log")
        )

    add("reference")
    add("unknown_field", learning_rat=1e-4)
    add("cuda_oom", {ENV_FAILPOINTS: "cuda_oom@step=2,times=1"})
    skip = absent("root", "unshare")
    report_copy = None
    if skip is None:
        launch, outputs["enospc"], report_copy = _enospc_launch(
            tmp_path_factory.mktemp("enospc"), env
        )
        launches.append(launch)
    results = run_all(launches, parallel=2)
    runs = {name: Run(outputs[name], *results[name]) for name in results}
    return Batch(cache_home, runs, report_copy, skip)


@pytest.fixture(scope="module")
def reference(batch: Batch) -> Run:
    return batch.runs["reference"]


@pytest.fixture
def env(batch: Batch) -> dict[str, str]:
    # The batch has built the model into this cache already.
    return child_env(batch.cache_home)


def test_runs_end_to_end_offline_with_commit_records(reference: Run) -> None:
    """An uninterrupted run exits 0 and seals every checkpoint and final/ with a verified record."""
    assert reference.exit_code == 0, reference.log
    out = reference.output_dir
    expected = sorted({*range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS), MAX_STEPS})
    assert checkpoint_steps(out) == expected
    for step in expected:
        record = verify_commit(out / f"checkpoint-{step}", expect_step=step)
        assert record.reason == "periodic"
        assert record.per_device_train_batch_size == TINY_SFT["per_device_train_batch_size"]
        assert record.gradient_accumulation_steps == 1
    final = verify_commit(out / "final", expect_step=MAX_STEPS)
    assert final.reason == "final"
    assert {"adapter_model.safetensors", "tokenizer.json"} <= {f.path for f in final.files}
    beat = heartbeat(out)
    assert beat is not None
    assert beat.phase is Phase.DONE
    assert beat.step == MAX_STEPS
    assert beat.max_steps == MAX_STEPS
    assert error_report(out) is None


def test_unknown_sft_field_is_config_error(batch: Batch) -> None:
    """An unknown train.sft field exits 78 with error.json kind config naming it and close names."""
    run = batch.runs["unknown_field"]
    assert run.exit_code == EXIT_CONFIG, run.log
    report = error_report(run.output_dir)
    assert report is not None
    assert report.kind is ErrorKind.CONFIG
    assert "'learning_rat'" in report.message
    assert "learning_rate" in report.message  # the difflib suggestion
    assert not checkpoint_steps(run.output_dir)


def test_cuda_oom_failpoint_reports_cuda_oom(batch: Batch) -> None:
    """The cuda_oom failpoint raises a real torch.OutOfMemoryError, reported as kind cuda_oom."""
    run = batch.runs["cuda_oom"]
    assert run.exit_code == 1, run.log
    report = error_report(run.output_dir)
    assert report is not None, run.log
    assert report.kind is ErrorKind.CUDA_OOM
    assert report.type == "torch.OutOfMemoryError"
    assert report.step == 1
    assert report.phase is Phase.TRAIN
    assert "CUDA out of memory" in report.message


@pytest.mark.system
def test_real_enospc_is_reported_as_disk_full(batch: Batch) -> None:
    """A real ENOSPC (output_dir on a 128 KiB tmpfs) is reported as kind disk_full."""
    require("root", "unshare")
    run = batch.runs["enospc"]
    assert run.exit_code == 1, run.log
    assert batch.enospc_report is not None
    report = read_model(batch.enospc_report, ErrorReport)
    assert report is not None, run.log
    assert report.kind is ErrorKind.DISK_FULL, report.message
    assert report.phase is Phase.SAVE
    assert report.step == 2


def test_resume_from_checkpoint_is_bit_identical(
    reference: Run, env: dict[str, str], tmp_path: Path
) -> None:
    """Resuming from checkpoint-6 ends with adapter tensors torch.equal to the uninterrupted run."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(reference.output_dir / "checkpoint-6", out / "checkpoint-6")
    job = write_tiny_job(tmp_path / "job.json", out)
    code, log = run_to_end(job, env, tmp_path / "child.log", resume_from=out / "checkpoint-6")
    assert code == 0, log
    assert checkpoint_steps(out) == [6, 9, 10]
    assert assert_bit_identical(out / "final", reference.output_dir / "final") > 0
    # Equality means something: the last four steps did move the adapter.
    with pytest.raises(AssertionError, match="tensors differ"):
        assert_bit_identical(out / "checkpoint-6", out / "final")


def test_sigterm_writes_emergency_checkpoint_and_resume_is_identical(
    reference: Run, env: dict[str, str], tmp_path: Path
) -> None:
    """SIGTERM mid-run commits an off-schedule checkpoint, exits 75, and resumes bit-identically."""
    out = tmp_path / "out"
    job = write_tiny_job(tmp_path / "job.json", out)
    # Step 4 starts with a 3 s pause; the failpoint records its fire in
    # .warden/failpoints.json before pausing, so that file appearing means the
    # child is inside step 4, past checkpoint-3: the moment to send SIGTERM.
    slow = {ENV_FAILPOINTS: "slow_step@step=4,seconds=3,times=1"}
    with run_process(trainer_child_argv(job), {**env, **slow}, tmp_path / "child.log") as child:
        wait_for(
            lambda: Layout(out).failpoints.exists() or child.poll() is not None,
            90,
            what="step 4 to begin",
        )
        child.signal(signal.SIGTERM)
        assert child.wait() == EXIT_PREEMPTED, child.log()
    emergency_step = checkpoint_steps(out)[-1]
    assert 4 <= emergency_step < MAX_STEPS
    record = verify_commit(out / f"checkpoint-{emergency_step}", expect_step=emergency_step)
    assert record.reason == "emergency"
    assert not (out / "final").exists()

    code, log = run_to_end(
        job, env, tmp_path / "resume.log", resume_from=out / f"checkpoint-{emergency_step}"
    )
    assert code == 0, log
    assert_bit_identical(out / "final", reference.output_dir / "final")


def test_sigkill_during_checkpoint_write_leaves_no_commit_record(
    env: dict[str, str], tmp_path: Path
) -> None:
    """SIGKILL while HF writes checkpoint-3 (slowed by slow_save) leaves it without warden.json."""
    out = tmp_path / "out"
    job = write_tiny_job(tmp_path / "job.json", out, max_steps=3)
    slow = {ENV_FAILPOINTS: "slow_save@seconds=1.5"}
    folder = out / "checkpoint-3"
    with run_process(trainer_child_argv(job), {**env, **slow}, tmp_path / "child.log") as child:

        def save_in_progress() -> bool:
            beat = heartbeat(out)
            return folder.is_dir() and beat is not None and beat.phase is Phase.SAVE

        wait_for(save_in_progress, timeout=90, what="checkpoint-3 being written")
        child.signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
    assert folder.is_dir()
    assert not (folder / COMMIT_RECORD).exists()
    assert not (folder / "trainer_state.json").exists()  # HF writes it last: truly partial


BYO_SCRIPT = textwrap.dedent(
    """
    import sys

    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    from trainer_child.builtin import corpus_lines, ensure_tiny_gpt2
    from trainer_child.callback import WardenCallback

    path = ensure_tiny_gpt2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path)
    data = Dataset.from_dict({"text": corpus_lines()[:64]}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=32),
        batched=True,
        remove_columns=["text"],
    )
    args = TrainingArguments(
        output_dir=sys.argv[1],
        max_steps=8,
        save_steps=2,
        per_device_train_batch_size=4,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[WardenCallback()],
    )
    trainer.train()
    """
)


def test_plain_hf_trainer_script_gets_commit_records(env: dict[str, str], tmp_path: Path) -> None:
    """A plain HF Trainer script with WardenCallback commits records and honours SIGTERM."""
    script = tmp_path / "byo_train.py"
    script.write_text(BYO_SCRIPT)
    out = tmp_path / "out"
    # Step 3's pause is recorded in .warden/failpoints.json as it begins: the
    # child is then inside step 3, past checkpoint-2.
    slow = {ENV_FAILPOINTS: "slow_step@step=3,seconds=3,times=1"}
    argv = [sys.executable, str(script), str(out)]
    with run_process(argv, {**env, **slow}, tmp_path / "child.log") as child:
        wait_for(
            lambda: Layout(out).failpoints.exists() or child.poll() is not None,
            90,
            what="step 3 to begin",
        )
        child.signal(signal.SIGTERM)
        assert child.wait() == EXIT_PREEMPTED, child.log()
    steps = checkpoint_steps(out)
    assert steps[0] == 2
    assert 3 <= steps[-1] < 8
    assert verify_commit(out / "checkpoint-2", expect_step=2).reason == "periodic"
    emergency = verify_commit(out / f"checkpoint-{steps[-1]}", expect_step=steps[-1])
    assert emergency.reason == "emergency"
    assert "model.safetensors" in {entry.path for entry in emergency.files}


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_builtin_model_is_byte_identical_across_builds(batch: Batch, tmp_path: Path) -> None:
    """Two racing builds share one cache folder, byte-identical to the reference's own build."""
    build = [
        sys.executable,
        "-c",
        "from trainer_child.builtin import ensure_tiny_gpt2; print(ensure_tiny_gpt2())",
    ]
    # The batch built its copy in another cache, in another process.
    (built_before,) = (batch.cache_home / "trainwarden").glob("tiny-gpt2-*")
    env = child_env(tmp_path / "cache")
    with (
        run_process(build, env, tmp_path / "a.log") as a,
        run_process(build, env, tmp_path / "b.log") as b,
    ):
        codes = [a.wait(), b.wait()]
        outputs = [child.log().strip().splitlines()[-1] for child in (a, b)]
    assert codes == [0, 0], outputs
    assert outputs[0] == outputs[1]
    built = Path(outputs[0])
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no staging folder left
    assert built.name == built_before.name
    digests = _tree_digest(built)
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(digests)
    assert digests == _tree_digest(built_before)
    assert 100_000 < (built / "model.safetensors").stat().st_size < 1_000_000
