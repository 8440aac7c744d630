"""Benchmark 6: what proving a checkpoint complete costs.

Full validation: ``verify_checkpoint(path, require_record=True, deep=True)`` on a
synthetic checkpoint of ``validation_mib`` MiB in the real formats (a
safetensors adapter, a torch.save optimizer with Adam-shaped state, the small
torch.save files, trainer_state.json and a warden.json written by the child's
own ``commit_checkpoint``), per GB. Three variants run interleaved in a
rotating order each round: deep with the files in the page cache (the
supervisor verifies right after the child wrote them), deep after evicting
them (``posix_fadvise(DONTNEED)`` on these files only, not the whole machine's
cache: a verify before resuming days later), and structure only (deep=False).

Commit record: ``commit_checkpoint`` (hash every file, fsync files and folders,
write warden.json atomically) timed on fresh copies of a real checkpoint of the
tiny job (copied just before, so its pages are dirty as after HF's save), set
against the ``save_seconds`` the child measured for its saves (HF's save plus
this record). It is also timed once on the synthetic checkpoint as written.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from bench.common import (
    MB,
    MIB,
    Sizes,
    Workspace,
    fmt_seconds,
    median,
)
from bench.overhead import Calibration
from bench.report import Section
from supervisor.core.model import Integrity
from supervisor.shell.verify import verify_checkpoint
from trainer_child.protocol import COMMIT_RECORD, TRAINER_STATE

TENSOR_MIB = 16


def build_synthetic(folder: Path, mib: int) -> None:
    """Write checkpoint-1 in ``folder``'s layout: one third adapter, two thirds optimizer."""
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    per_tensor = TENSOR_MIB * MIB // 4
    adapter_tensors = max(1, mib // 3 // TENSOR_MIB)
    weights = {
        f"base_model.model.layers.{i}.lora_A.weight": torch.randn(per_tensor, generator=generator)
        for i in range(adapter_tensors)
    }
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    optimizer = {
        "state": {
            i: {
                "step": torch.tensor(1.0),
                "exp_avg": torch.randn(per_tensor, generator=generator),
                "exp_avg_sq": torch.rand(per_tensor, generator=generator),
            }
            for i in range(adapter_tensors)
        },
        "param_groups": [{"lr": 5e-4, "params": list(range(adapter_tensors))}],
    }
    torch.save(optimizer, folder / "optimizer.pt")
    torch.save({"last_epoch": 1}, folder / "scheduler.pt")
    torch.save({"cpu": torch.get_rng_state()}, folder / "rng_state.pth")
    torch.save({"per_device_train_batch_size": 2}, folder / "training_args.bin")
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (folder / TRAINER_STATE).write_text('{"global_step": 1, "max_steps": 1, "log_history": []}')


def evict(folder: Path) -> None:
    """Drop this folder's files from the page cache (clean pages only; they were fsynced)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _commit(folder: Path, step: int) -> float:
    from trainer_child.callback import commit_checkpoint

    started = time.perf_counter()
    commit_checkpoint(folder, step=step, reason="periodic")
    return time.perf_counter() - started


def run(ws: Workspace, sizes: Sizes, calibration: Calibration) -> Section:
    section = Section("validation", "6 validation cost")
    root = ws.fresh("validation")
    synthetic = root / "checkpoint-1"
    build_synthetic(synthetic, sizes.validation_mib)
    commit_big = _commit(synthetic, 1)
    size = sum(p.stat().st_size for p in synthetic.rglob("*") if p.is_file())
    gb = size / 1e9

    # name -> (evict first, deep)
    variants = {
        "deep, in page cache": (False, True),
        "deep, evicted": (True, True),
        "structure": (False, False),
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    verify_checkpoint(synthetic, require_record=True)  # pull it all into the page cache
    names = list(variants)
    for round_index in range(sizes.validation_rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            cold, deep = variants[name]
            if cold:
                evict(synthetic)
            started = time.perf_counter()
            entry = verify_checkpoint(synthetic, require_record=True, deep=deep)
            seconds[name].append(time.perf_counter() - started)
            if entry.integrity is not Integrity.COMPLETE:
                section.error = f"synthetic checkpoint judged {entry.integrity.value}"
    for name in names:
        value = median(seconds[name])
        section.add(
            f"verify_checkpoint {name}, {size / MB:.0f} MB",
            f"{fmt_seconds(value)} = {value / gb:.2f} s/GB ({size / MB / value:.0f} MB/s)",
        )
    section.add(
        "commit record on the fresh synthetic checkpoint",
        f"{fmt_seconds(commit_big)} = {commit_big / gb:.2f} s/GB (hash + fsync of dirty pages)",
    )

    record_seconds: list[float] = []
    sources = [p for p in calibration.checkpoints if (p / COMMIT_RECORD).exists()]
    if sources:
        source = sources[0]
        for index in range(sizes.commit_rounds):
            copy = root / f"copy-{index}" / source.name
            shutil.copytree(source, copy)
            (copy / COMMIT_RECORD).unlink()
            record_seconds.append(_commit(copy, int(source.name.split("-")[1])))
            shutil.rmtree(copy.parent)
        record = median(record_seconds)
        save = calibration.save
        bytes_ = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
        section.add(
            f"commit record per save, tiny job ({bytes_ / 1000:.0f} kB)",
            f"{fmt_seconds(record)} of a {fmt_seconds(save)} save = {record / save * 100:.0f}%",
        )
    shutil.rmtree(synthetic)
    section.notes.append(
        "synthetic checkpoint: 1/3 safetensors adapter, 2/3 torch.save optimizer (stored zip "
        "members, CRC-32 checked), warden.json from commit_checkpoint; xxh3-128 hashes. "
        "'evicted' = posix_fadvise(DONTNEED) on its files first (reads from disk). The tiny "
        "job's save_seconds (HF save + record) come from the overhead runs' commit records."
    )
    section.data.update(
        bytes=size,
        verify_seconds=seconds,
        commit_big_s=commit_big,
        commit_tiny_s=record_seconds,
        tiny_save_s=calibration.save,
    )
    return section


__all__ = ["build_synthetic", "evict", "run"]
