"""Run the built-in job on several ranks: ``python -m trainer_child.launch --nproc-per-node N``.

This process is torch.distributed.run's agent (torchrun, in-process): it starts
N ranks of ``python -m trainer_child --job FILE`` with a standalone c10d
rendezvous (gloo on CPU, nccl on GPU, as the HF Trainer chooses) and waits for
them. It adds what the supervisor needs and torchrun leaves out:

* the agent's own restarts are off (``--max-restarts 0``): a rank's death ends
  the attempt, and trainwarden restarts the whole group from the newest
  *valid* checkpoint (torchrun would restart from whatever the script finds);
* the ranks' exit status comes through. torchrun exits 1 whatever its workers
  said; here every rank exiting 75 (emergency checkpoint) makes this process
  exit 75, and any rank exiting 78 (bad configuration) makes it exit 78;
* SIGUSR1 prints this process's stacks (faulthandler) instead of killing it,
  so the supervisor's hang diagnosis reaches the ranks through a live agent.

The agent's shutdown timeout (how long it lets the ranks finish their emergency
save after SIGTERM before it SIGKILLs them) comes from the environment,
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, which the supervisor sets to its own grace.
torch is imported here, transformers is not: the agent stays small.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
from collections.abc import Mapping

from trainer_child.errors import EXIT_CRASH
from trainer_child.protocol import EXIT_CONFIG, EXIT_OK, EXIT_PREEMPTED

__all__ = ["group_exit_code", "main", "torchrun_args"]

log = logging.getLogger("trainer_child")


def torchrun_args(nproc_per_node: int, child_args: list[str]) -> list[str]:
    """Return torch.distributed.run's command line for ``python -m trainer_child CHILD_ARGS``."""
    return [
        "--standalone",
        f"--nproc-per-node={nproc_per_node}",
        "--max-restarts=0",
        "--module",
        "trainer_child",
        *child_args,
    ]


def group_exit_code(exit_codes: Mapping[int, int]) -> int:
    """Return the attempt's exit status from its failed ranks' (rank -> exit code; <0 = signal).

    75 only when every failed rank stopped after the emergency checkpoint (a
    rank torn down by the agent before it had saved makes it a crash); 78 when
    any rank found the configuration unusable, since a restart cannot help.
    """
    codes = set(exit_codes.values())
    if codes == {EXIT_PREEMPTED}:
        return EXIT_PREEMPTED
    if EXIT_CONFIG in codes:
        return EXIT_CONFIG
    return EXIT_CRASH if codes else EXIT_OK


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer_child.launch",
        description="Run the built-in SFT + LoRA job on several ranks (one attempt).",
    )
    parser.add_argument("--nproc-per-node", type=int, required=True, help="ranks to start")
    parser.add_argument("--job", required=True, help="JSON file of protocol.JobFile")
    parser.add_argument("--resume-from", default=None, help="checkpoint folder to resume from")
    options = parser.parse_args(argv)
    if options.nproc_per_node < 1:
        parser.error("--nproc-per-node must be at least 1")
    return options


def main(argv: list[str] | None = None) -> int:
    """Run the ranks to their end and return the exit status the contract gives the attempt."""
    options = _parse_args(argv)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    child_args = ["--job", options.job]
    if options.resume_from:
        child_args += ["--resume-from", options.resume_from]

    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(torchrun_args(options.nproc_per_node, child_args))
    try:
        run(args)  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    except ChildFailedError as failed:
        # torchrun's own summary (root cause first observed, "exitcode : -9"):
        # the supervisor reads a rank's fatal signal from it.
        sys.stderr.write(f"{failed}\n")
        codes = {rank: failure.exitcode for rank, failure in failed.failures.items()}
        code = group_exit_code(codes)
        log.warning("ranks_failed exit_codes=%s exit=%d", codes, code)
        return code
    except SignalException as stopped:
        # The agent already sent the signal on to the ranks and waited for them.
        log.warning("agent_stopped signal=%s", stopped.sigval.name)
        return 128 + int(stopped.sigval)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
