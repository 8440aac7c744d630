"""What the rank-aware WardenCallback costs on 2 ranks: ``python -m bench.multirank``.

Two figures, both on torchrun with 2 ranks of gloo on CPU, one thread each:

* **the collective**: the step-end agreement is one all-reduce (MAX) of one
  int32 (``trainer_child.ranks.Ranks.any``); each rank times ``--calls`` of
  them back to back, after a warm-up, and reports microseconds per call;
* **steps/s with and without the callback**: ``examples/plain_trainer.py``
  (the README's plain Trainer + LoRA script, tiny model) runs ``--steps``
  optimizer steps with no checkpoint, bare (A) and with ``WardenCallback``
  (B: heartbeat + the step-end all-reduce), interleaved A B A B ...; the
  figure is HF's own ``train_steps_per_second`` (the training loop only),
  reported as medians and their ratio. Checkpoints are left out on purpose:
  the commit record's cost is benchmarked in ``bench/overhead.py``.

Printed as a small table; ``--json FILE`` keeps the raw samples.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.support.processes import REPO_ROOT

__all__ = ["main"]

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
_STEPS_PER_SECOND_RE = re.compile(r"'train_steps_per_second': '?([\d.]+)")
_CALL_RE = re.compile(r"allreduce_us rank=(\d+) us=([\d.]+)")


def _env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINWARDEN_")}
    env.update(
        {
            "XDG_CACHE_HOME": str(workdir / "cache"),
            "HF_HOME": str(workdir / "cache" / "hf"),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(REPO_ROOT),
        }
    )
    return env


def _run(argv: list[str], env: dict[str, str], log: Path) -> str:
    with log.open("wb") as handle:
        done = subprocess.run(
            argv, env=env, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT, check=False
        )
    text = log.read_text(errors="replace")
    if done.returncode != 0:
        raise RuntimeError(f"{argv[5:]} exited {done.returncode}:\n{text[-3000:]}")
    return text


def _inputs(workdir: Path, env: dict[str, str]) -> tuple[Path, Path]:
    """The tiny model folder and a train.jsonl of the built-in corpus."""
    code = (
        "import json, sys\n"
        "from trainer_child.builtin import corpus_lines, ensure_tiny_gpt2\n"
        "with open(sys.argv[1], 'w') as f:\n"
        "    for line in corpus_lines(): f.write(json.dumps({'text': line}) + '\\n')\n"
        "print(ensure_tiny_gpt2())\n"
    )
    data = workdir / "train.jsonl"
    done = subprocess.run(
        [sys.executable, "-c", code, str(data)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(done.stdout.strip().splitlines()[-1]), data


def allreduce_worker(calls: int) -> None:
    """One rank of the collective benchmark (run by torchrun, see ``--worker``)."""
    import torch.distributed as dist

    from trainer_child.ranks import Ranks

    dist.init_process_group("gloo")
    ranks = Ranks.current()
    for _ in range(100):
        ranks.any(False)
    ranks.barrier()
    started = time.perf_counter()
    for _ in range(calls):
        ranks.any(False)
    micros = (time.perf_counter() - started) / calls * 1e6
    print(f"allreduce_us rank={ranks.rank} us={micros:.1f}", flush=True)
    dist.destroy_process_group()


def _trainer_argv(model: Path, data: Path, out: Path, steps: int, warden: bool) -> list[str]:
    argv = [
        *TORCHRUN,
        str(REPO_ROOT / "examples" / "plain_trainer.py"),
        "--model",
        str(model),
        "--data",
        str(data),
        "--output_dir",
        str(out),
        "--max_steps",
        str(steps),
        "--save_steps",
        str(steps * 10),  # no checkpoint inside the measured loop
    ]
    return [*argv, "--warden-callback"] if warden else argv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.multirank", description=__doc__)
    parser.add_argument("--pairs", type=int, default=3, help="bare/warden pairs (default 3)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps a run")
    parser.add_argument("--calls", type=int, default=2000, help="all-reduces timed per rank")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "runs" / "bench-multirank")
    parser.add_argument("--json", type=Path, default=None, help="write the raw samples here")
    parser.add_argument("--worker", choices=["allreduce"], help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.worker == "allreduce":
        allreduce_worker(options.calls)
        return 0

    workdir: Path = options.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    env = _env(workdir)
    model, data = _inputs(workdir, env)

    text = _run(
        [
            *TORCHRUN,
            "-m",
            "bench.multirank",
            "--worker",
            "allreduce",
            "--calls",
            str(options.calls),
        ],
        env,
        workdir / "allreduce.log",
    )
    micros = [float(us) for _, us in _CALL_RE.findall(text)]

    samples: dict[str, list[float]] = {"bare": [], "warden": []}
    for pair in range(options.pairs):
        for mode in ("bare", "warden"):
            out = workdir / f"{mode}-{pair}"
            shutil.rmtree(out, ignore_errors=True)
            argv_ = _trainer_argv(model, data, out, options.steps, mode == "warden")
            log = _run(argv_, env, workdir / f"{mode}-{pair}.log")
            rates = [float(value) for value in _STEPS_PER_SECOND_RE.findall(log)]
            samples[mode].append(max(rates))  # one line per rank; they agree to the 3rd digit

    bare, warden = statistics.median(samples["bare"]), statistics.median(samples["warden"])
    result: dict[str, Any] = {
        "allreduce_us": micros,
        "steps_per_second": samples,
        "median_bare": bare,
        "median_warden": warden,
        "ratio": warden / bare,
        "step_ms_bare": 1000.0 / bare,
        "steps": options.steps,
        "pairs": options.pairs,
    }
    print("2 ranks, gloo on CPU, one thread each")
    print(f"  step-end all-reduce (1 int32)     {statistics.median(micros):8.1f} us per call")
    print(f"  steps/s bare (no callback)         {bare:8.2f}  samples {samples['bare']}")
    print(f"  steps/s with WardenCallback        {warden:8.2f}  samples {samples['warden']}")
    print(f"  ratio with / bare                  {warden / bare:8.4f}")
    if options.json is not None:
        options.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
