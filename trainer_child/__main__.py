"""Run one attempt of the built-in SFT + LoRA job: ``python -m trainer_child --job FILE``.

The attempt writes a ``load`` heartbeat before importing torch (seconds of
imports must not look like a hang), trains (resuming from ``--resume-from`` or
``TRAINWARDEN_RESUME_FROM``; the flag wins), commits ``final/`` and exits 0.
Any failure ends with ``.warden/error.json`` and the exit status the contract
gives its kind: 78 for config/data, 75 after an emergency checkpoint, 1 otherwise.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from trainer_child.errors import (
    ConfigError,
    ErrorReserve,
    ResumeError,
    build_report,
    classify,
    exit_code_for,
    write_report,
)
from trainer_child.heartbeat import HeartbeatWriter, attempt_from_env, mark
from trainer_child.protocol import (
    ENV_OUTPUT_DIR,
    ENV_RESUME_FROM,
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_PREEMPTED,
    JobFile,
    Layout,
    Phase,
)
from trainer_child.ranks import launched_rank

if TYPE_CHECKING:
    from trainer_child.callback import WardenCallback
    from trainer_child.job import Preloaded

log = logging.getLogger("trainer_child")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer_child",
        description="Run the built-in SFT + LoRA job of trainwarden (one attempt).",
    )
    parser.add_argument("--job", required=True, type=Path, help="JSON file of protocol.JobFile")
    parser.add_argument(
        "--resume-from",
        default=None,
        help=f"checkpoint folder to resume from (default: ${ENV_RESUME_FROM})",
    )
    return parser.parse_args(argv)


def _read_job(path: Path) -> JobFile:
    try:
        return JobFile.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read job file {path}: {exc}") from exc
    except ValidationError as exc:
        raise ConfigError(f"invalid job file {path}: {exc}") from exc


class _Attempt:
    """What this attempt knows about itself, for the error report."""

    def __init__(self, layout: Layout, resume_from: str | None, attempt: int | None) -> None:
        self.layout = layout
        self.resume_from = resume_from
        self.attempt = attempt
        self.heartbeat = HeartbeatWriter(layout.output_dir, attempt=attempt)
        self.warden: WardenCallback | None = None
        self.rank, self.world_size = launched_rank()

    @property
    def leads(self) -> bool:
        """Whether this process speaks for the attempt (rank 0, or the only process)."""
        return self.rank == 0

    def loading_resume(self) -> bool:
        """Return whether a failure now would implicate the checkpoint being resumed.

        HF loads the adapter, optimizer, scheduler and RNG state inside
        ``train()`` before the first ``on_step_begin``; a failure after the loop
        started is the run's, not the checkpoint's.
        """
        warden = self.warden
        return self.resume_from is not None and warden is not None and warden.loading_resume()

    def fail(self, exc: BaseException) -> int:
        kind = classify(exc, loading_resume=self.loading_resume())
        warden = self.warden
        report = build_report(
            exc,
            kind,
            step=warden.step if warden is not None else None,
            phase=warden.phase if warden is not None else Phase.LOAD,
            resume_from=self.resume_from,
            attempt=self.attempt,
        )
        log.error("child_failed kind=%s type=%s", kind.value, report.type, exc_info=exc)
        if self.world_size > 1 and self.layout.error.exists():
            # The first rank to fail holds the cause; the others usually fail of
            # its consequences (a collective whose peer is gone).
            log.info("error_report_kept reason=another_rank_reported_first rank=%d", self.rank)
        else:
            write_report(self.layout, report)
        return exit_code_for(kind)


def _train(job: JobFile, attempt: _Attempt, preloaded: Preloaded | None) -> int:
    if attempt.resume_from is not None and not Path(attempt.resume_from).is_dir():
        raise ResumeError(f"checkpoint to resume from {attempt.resume_from!r} is not a folder")
    # The heavy imports (torch, transformers, trl, peft, datasets) start here.
    from trainer_child.callback import WardenCallback
    from trainer_child.job import build_trainer, save_final

    warden = attempt.warden = WardenCallback(final_save_follows=True)
    trainer = build_trainer(job, [warden], preloaded)
    log.info("training_start resume_from=%s attempt=%s", attempt.resume_from, attempt.attempt)
    # A resume at max_steps returns at once (the callback's train guard): the
    # loaded checkpoint's weights are final.
    trainer.train(resume_from_checkpoint=attempt.resume_from)
    step = trainer.state.global_step
    final = save_final(trainer, attempt.layout, warden)
    max_steps = trainer.state.max_steps or None
    if attempt.leads:
        attempt.heartbeat.beat(Phase.DONE, step=step, max_steps=max_steps, force=True)
    log.info("training_done step=%d final=%s", step, final)
    return EXIT_OK


def main(argv: list[str] | None = None, preloaded: Preloaded | None = None) -> int:
    """Run one attempt and return the exit status the contract assigns to its outcome.

    ``preloaded``: what a warm standby (``trainer_child/standby.py``) loaded for it.
    """
    options = _parse_args(argv)
    # First of all, so even a hang inside `import torch` can be shown on SIGUSR1.
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    attempt_number = attempt_from_env()
    resume_from = options.resume_from or os.environ.get(ENV_RESUME_FROM) or None
    try:
        job = _read_job(options.job)
    except ConfigError as exc:
        # No output_dir to report into unless the supervisor told us its own.
        fallback = os.environ.get(ENV_OUTPUT_DIR)
        if fallback:
            return _Attempt(Layout(fallback), resume_from, attempt_number).fail(exc)
        log.exception("child_failed kind=config")
        return EXIT_CONFIG

    attempt = _Attempt(Layout(job.output_dir), resume_from, attempt_number)
    reserve = ErrorReserve(attempt.layout, rank=attempt.rank)
    try:
        mark("started")
        if attempt.leads:
            # One voice per attempt: a late rank's `load` must not follow rank 0's `train`.
            attempt.heartbeat.beat(Phase.LOAD, force=True)
            # error.json describes this attempt only; one left by an earlier attempt
            # (the supervisor has read it by now) would pin its failure on this one.
            attempt.layout.error.unlink(missing_ok=True)
        reserve.hold()
        return _train(job, attempt, preloaded)
    except SystemExit as exc:
        if exc.code == EXIT_PREEMPTED:
            return EXIT_PREEMPTED
        raise
    except BaseException as exc:
        return attempt.fail(exc)
    finally:
        reserve.release()


if __name__ == "__main__":
    raise SystemExit(main())
