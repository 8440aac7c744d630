"""Build realistic checkpoint folders on disk without training anything.

The files are the real formats a PEFT + HF Trainer checkpoint holds: a
safetensors adapter, torch.save zip archives for the optimizer, scheduler, RNG
state and training args, ``trainer_state.json``, and (optionally) a
``warden.json`` commit record made with the real ``protocol.CommitRecord`` and
``file_digest``. Damage helpers change bytes in place, keeping the size, the way
bit rot or a bad disk would.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from trainer_child.protocol import (
    COMMIT_RECORD,
    TRAINER_STATE,
    CommitRecord,
    FileEntry,
    atomic_write_model,
    file_digest,
)

ADAPTER = "adapter_model.safetensors"
OPTIMIZER = "optimizer.pt"


def make_checkpoint(
    output_dir: Path,
    step: int,
    *,
    record: bool = True,
    best_step: int | None = None,
    hash_algorithm: str = "xxh3_128",
    width: int = 64,
) -> Path:
    """Write ``output_dir/checkpoint-<step>`` as a PEFT LoRA run would, and return it."""
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(step)
    lora_a = torch.randn(8, width, generator=generator)
    lora_b = torch.randn(width, 8, generator=generator)
    save_file(
        {
            "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": lora_a,
            "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": lora_b,
        },
        str(folder / ADAPTER),
        metadata={"format": "pt"},
    )
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["c_attn"]})
    )
    optimizer_state = {
        "state": {
            index: {
                "step": torch.tensor(float(step)),
                "exp_avg": torch.randn_like(tensor) * 1e-3,
                "exp_avg_sq": torch.rand_like(tensor) * 1e-6,
            }
            for index, tensor in enumerate((lora_a, lora_b))
        },
        "param_groups": [{"lr": 5e-4, "betas": (0.9, 0.999), "params": [0, 1]}],
    }
    torch.save(optimizer_state, folder / OPTIMIZER)
    torch.save({"last_epoch": step, "_step_count": step + 1}, folder / "scheduler.pt")
    torch.save({"cpu": torch.get_rng_state()}, folder / "rng_state.pth")
    torch.save({"per_device_train_batch_size": 2, "save_steps": 2}, folder / "training_args.bin")
    state: dict[str, object] = {"global_step": step, "max_steps": 100, "log_history": []}
    if best_step is not None:
        state["best_model_checkpoint"] = str(output_dir / f"checkpoint-{best_step}")
    (folder / TRAINER_STATE).write_text(json.dumps(state, indent=2))
    if record:
        write_commit_record(folder, step, hash_algorithm=hash_algorithm)
    return folder


def write_commit_record(
    folder: Path, step: int, *, reason: str = "periodic", hash_algorithm: str = "xxh3_128"
) -> CommitRecord:
    """Write ``warden.json`` listing every file in ``folder`` as the child does."""
    files = tuple(
        FileEntry(
            path=path.relative_to(folder).as_posix(),
            size=path.stat().st_size,
            hash=file_digest(path, hash_algorithm),
        )
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != COMMIT_RECORD
    )
    record = CommitRecord.model_validate(
        {"step": step, "reason": reason, "hash_algorithm": hash_algorithm, "files": files}
    )
    atomic_write_model(folder / COMMIT_RECORD, record, durable=False)
    return record


def make_final(output_dir: Path) -> Path:
    """Write ``output_dir/final`` (adapter, config, tokenizer, its own record)."""
    folder = output_dir / "final"
    folder.mkdir(parents=True)
    save_file({"lora_A": torch.ones(4, 4)}, str(folder / ADAPTER))
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    write_commit_record(folder, 10, reason="final")
    return folder


def zip_member_payload(path: Path, member_suffix: str) -> tuple[int, int]:
    """Return ``(offset, length)`` of a stored zip member's bytes inside the file."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
    with open(path, "rb") as handle:
        handle.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
    return info.header_offset + 30 + name_length + extra_length, info.compress_size


def largest_tensor_payload(path: Path) -> tuple[int, int]:
    """Return ``(offset, length)`` of the largest tensor storage in a torch.save archive."""
    with zipfile.ZipFile(path) as archive:
        largest = max(
            (i for i in archive.infolist() if "/data/" in i.filename),
            key=lambda i: i.compress_size,
        )
    return zip_member_payload(path, largest.filename)


def safetensors_data_start(path: Path) -> int:
    """Return the file offset where a safetensors file's tensor bytes begin."""
    with open(path, "rb") as handle:
        (header_length,) = struct.unpack("<Q", handle.read(8))
    return 8 + header_length


def flip_byte(path: Path, offset: int, *, keep_mtime: bool = False) -> None:
    """Invert one byte in place (same size), optionally putting the mtime back."""
    before = os.stat(path)
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
