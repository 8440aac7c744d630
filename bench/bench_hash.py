"""Measure what verifying a checkpoint costs per byte: xxh3-128 vs blake2b, and zip CRC-32.

Run: ``python bench/bench_hash.py [--mib 256] [--rounds 5]`` (about 10-20 s).

The figures decide two things in docs/architecture.md: which hash the commit record uses,
and whether checking torch.save's zip CRC-32s on every verify is affordable.
Everything is measured in the page cache (the files are read once before
timing), which is the case that matters: the supervisor verifies a checkpoint
right after the child wrote it. Candidates run interleaved, in a rotating order
each round, so drift (thermal, a noisy neighbour) hits all of them alike; the
median of the rounds is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

# Runnable as a plain script from a checkout: make the repository importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supervisor.shell.verify import read_and_check, zip_layout

MB = 1_000_000


def write_inputs(folder: Path, mib: int) -> tuple[Path, Path]:
    """Write a random blob and a torch.save-shaped zip (stored members) of the same size."""
    blob = folder / "blob.bin"
    archive = folder / "optimizer.pt"
    member = os.urandom(4 << 20)
    with open(blob, "wb") as handle:
        for _ in range(mib // 4):
            handle.write(member)
    # torch.save stores tensors uncompressed, one member per storage.
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zipped:
        for index in range(mib // 4):
            zipped.writestr(f"optimizer/data/{index}", member)
    return blob, archive


def warm(path: Path) -> None:
    """Pull the file into the page cache so every candidate reads from memory."""
    read_and_check(path, None)


def testzip(path: Path) -> None:
    """The stdlib way to check CRCs: decompress-and-check every member via ZipExtFile."""
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise SystemExit(f"{path}: bad member {bad}")


def main(argv: list[str] | None = None) -> int:
    """Time each candidate in interleaved rounds and print MB/s medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="file size in MiB (multiple of 4)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-hash-") as tmp:
        blob, archive = write_inputs(Path(tmp), args.mib)
        members, compressed, problems = zip_layout(archive, archive.stat().st_size)
        if compressed or problems:
            raise SystemExit(f"unexpected zip layout: {compressed or problems}")
        for path in (blob, archive):
            warm(path)

        candidates: dict[str, tuple[Path, Callable[[], object]]] = {
            "xxh3_128": (blob, lambda: read_and_check(blob, "xxh3_128")),
            "blake2b-128": (blob, lambda: read_and_check(blob, "blake2b")),
            "crc32 (zip members, 1 pass)": (
                archive,
                lambda: read_and_check(archive, None, members),
            ),
            "xxh3_128 + crc32 (1 pass)": (
                archive,
                lambda: read_and_check(archive, "xxh3_128", members),
            ),
            "zipfile.testzip (stdlib)": (archive, lambda: testzip(archive)),
        }
        names = list(candidates)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                _, run = candidates[name]
                started = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - started)

        rates = {
            name: candidates[name][0].stat().st_size / MB / statistics.median(seconds[name])
            for name in names
        }
    print(f"{args.mib} MiB in page cache, median of {args.rounds} interleaved rounds")
    for name in names:
        print(f"  {name:<30} {rates[name]:>9.0f} MB/s")
    print(f"  xxh3_128 / blake2b-128         {rates['xxh3_128'] / rates['blake2b-128']:>9.1f} x")
    one_pass = rates["xxh3_128 + crc32 (1 pass)"]
    two_pass = 1 / (1 / rates["xxh3_128"] + 1 / rates["crc32 (zip members, 1 pass)"])
    print(f"  hash+crc one pass / two passes {one_pass / two_pass:>9.2f} x")
    print(
        "  1 pass crc / zipfile.testzip   "
        f"{rates['crc32 (zip members, 1 pass)'] / rates['zipfile.testzip (stdlib)']:>9.2f} x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
