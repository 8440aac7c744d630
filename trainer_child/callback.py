"""``WardenCallback``: commit records, heartbeats and the emergency save for any HF Trainer.

Add it to a Trainer (``callbacks=[WardenCallback()]``) and a plain HF script gets
what the built-in job has:

* ``checkpoint-N/warden.json`` after every save: the proof, written last, that the
  folder is complete (see ``commit_checkpoint`` for the durability order);
* ``.warden/heartbeat.json`` from the training loop itself, never from a thread,
  so a hung loop looks hung;
* SIGTERM once training runs -> save at the next step end -> commit -> exit 75
  (EXIT_PREEMPTED); before that SIGTERM keeps its default and kills at once,
  since a loading process has nothing to save;
* SIGUSR1 -> every thread's Python stack on stderr (faulthandler), so the
  supervisor can show where a hung child is stuck;
* no optimizer step past ``max_steps``: HF resumes a checkpoint taken at
  ``max_steps`` mid-epoch and trains one more step before it checks the limit;
  the callback stops that step before it begins and ``install_train_guard``
  turns it into a normal return of ``Trainer.train``;
* ``.warden/metrics.jsonl``, the loss log ``trainwarden report`` plots, and one
  experiment-tracker run across attempts (see ``observe.py``);
* the test-only failpoints of ``failpoints.py``.

Several ranks (torchrun, ``accelerate launch``): every rank runs its own
callback, and they act as one through two collectives (``ranks.py``), each a
single integer over the job's own process group:

* at every step end, an all-reduce (MAX) of "SIGTERM arrived here": SIGTERM
  reaches each rank at its own moment, and this makes every rank see the
  first one at the same step, so all of them save that step. Rank 0 writes the
  heartbeat only after it, so one stuck rank stalls the heartbeat too;
* in ``on_save``, the same all-reduce again: once it returns every rank has
  written its part (``rng_state_K.pth``), and the ranks also agree on a
  SIGTERM that arrived during the save. Rank 0 then writes the commit record,
  listing every rank's files; when stopping, a barrier holds the other ranks
  until the record is durable, and then every rank exits 75 together.

A rank that dies instead takes part in no collective; the launcher (torchrun's
agent) sees it and stops the others, so no rank is left waiting in one. With a
single process both collectives cost nothing.
"""

from __future__ import annotations

import faulthandler
import functools
import importlib.metadata
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from trainer_child.errors import ConfigError, write_report
from trainer_child.failpoints import Failpoints
from trainer_child.heartbeat import HeartbeatWriter, attempt_from_env, mark
from trainer_child.observe import LossLog, adopt_tracking_run_name, record_tracking_runs
from trainer_child.protocol import (
    COMMIT_RECORD,
    ENV_OUTPUT_DIR,
    EXIT_PREEMPTED,
    CommitRecord,
    ErrorKind,
    ErrorReport,
    FileEntry,
    Layout,
    Phase,
    atomic_write_model,
    file_digest,
    fsync_dir,
)
from trainer_child.ranks import Ranks, missing_rank_files

__all__ = [
    "TrainingAlreadyComplete",
    "WardenCallback",
    "active_callback",
    "commit_checkpoint",
    "install_preemption_handler",
    "install_stack_dumper",
    "install_train_guard",
    "library_versions",
    "preemption_requested",
]

log = logging.getLogger("trainer_child")

#: The libraries whose versions decide whether a checkpoint resumes bit-identically.
VERSIONED_LIBRARIES = ("torch", "transformers", "trl", "peft")


class TrainingAlreadyComplete(Exception):
    """Raised instead of a step past ``max_steps``; ``Trainer.train`` then returns normally.

    HF resumes a checkpoint taken at ``max_steps`` in mid-epoch by skipping the
    batches already seen and then running one more optimizer step before it
    checks the limit (measured: resuming the last checkpoint of a 16-step run
    commits checkpoint-17), so a final save that failed after the last
    checkpoint would otherwise end one step past the uninterrupted run.
    """


_GUARDED = "_trainwarden_train_guard"


def install_train_guard(trainer_cls: Any = None) -> None:
    """Make ``Trainer.train`` return normally when the callback refuses a step past the end.

    The loaded checkpoint already holds the final weights, so the script goes on
    to whatever it does after training (``save_model``, an evaluation) exactly
    as after an uninterrupted run. Idempotent; patches the class once.
    """
    if trainer_cls is None:
        from transformers import Trainer as trainer_cls
    original = trainer_cls.train
    if getattr(original, _GUARDED, False):
        return

    @functools.wraps(original)
    def train(self: Any, *args: Any, **kwargs: Any) -> Any:
        wardens = [cb for cb in self.callback_handler.callbacks if isinstance(cb, WardenCallback)]
        for warden in wardens:
            warden.in_train_call = True
        try:
            result = original(self, *args, **kwargs)
        except TrainingAlreadyComplete as done:
            log.info("training_already_complete %s", done)
            result = _finish_without_training(self)
        # Not in a `finally`: an exception leaving train() must still find the
        # flag set, so the error report can tell a checkpoint that will not load
        # (kind `resume`) from any other failure.
        for warden in wardens:
            warden.in_train_call = False
        return result

    setattr(train, _GUARDED, True)
    trainer_cls.train = train


def _finish_without_training(trainer: Any) -> Any:
    """End a ``train()`` call that took no step as HF ends any other (on_train_end, metrics)."""
    import time as time_mod

    try:
        # Private, but it is exactly the end of a training run: metrics, best
        # model at end, on_train_end. Its signature has been stable through 5.x.
        return trainer._finalize_training(None, 0, time_mod.time())
    except (AttributeError, TypeError):
        log.warning("finalize_training_unavailable; ending train() by hand")
    from transformers.trainer_utils import TrainOutput

    trainer.control = trainer.callback_handler.on_train_end(
        trainer.args, trainer.state, trainer.control
    )
    trainer.is_in_train = False
    return TrainOutput(trainer.state.global_step, 0.0, {})


class _Active:
    """The WardenCallback of this process, for the uncaught-exception report."""

    callback: WardenCallback | None = None


def active_callback() -> WardenCallback | None:
    """Return the most recently created WardenCallback of this process, if any."""
    return _Active.callback


def _output_dir(args: TrainingArguments) -> str:
    # TrainingArguments.__post_init__ replaces None with "trainer_output".
    return args.output_dir or "trainer_output"


class _Preemption:
    """Set by the SIGTERM handler and read at step boundaries; nothing else.

    A handler that saved or raised would run at an arbitrary bytecode, possibly
    in the middle of an optimizer step or of HF's own save.
    """

    requested = False
    installed = False


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _Preemption.requested = True


def preemption_requested() -> bool:
    """Return whether SIGTERM has arrived in this process."""
    return _Preemption.requested


def install_preemption_handler() -> bool:
    """Route SIGTERM to the preemption flag (idempotent); False off the main thread."""
    if _Preemption.installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        log.warning("preemption_handler_skipped reason=not_main_thread")
        return False
    signal.signal(signal.SIGTERM, _on_sigterm)
    _Preemption.installed = True
    return True


def install_stack_dumper() -> None:
    """Dump every thread's Python stack to stderr on SIGUSR1 (the hang diagnosis)."""
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)


def library_versions() -> dict[str, str]:
    """Return the installed versions of the libraries a checkpoint depends on."""
    versions: dict[str, str] = {}
    for name in VERSIONED_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _is_record_file(name: str) -> bool:
    # warden.json and the temporary file atomic_write_model may leave behind a crash.
    return name == COMMIT_RECORD or (
        name.startswith(f".{COMMIT_RECORD}.") and name.endswith(".tmp")
    )


def commit_checkpoint(
    folder: str | os.PathLike[str],
    *,
    step: int,
    reason: Literal["periodic", "emergency", "final"],
    max_steps: int | None = None,
    per_device_train_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
    attempt: int | None = None,
    save_seconds: float | None = None,
    save_started: float | None = None,
    world_size: int = 1,
) -> CommitRecord:
    """Hash, fsync and seal a finished checkpoint folder with ``warden.json``.

    Order matters: every file is hashed (while still in the page cache) and
    fsynced, then every folder (so the names are durable), then the record goes
    in by tmp + fsync + rename + dir fsync. A crash at any point leaves either
    no record or a record whose every file was durable first. Only regular files
    are listed; a symlink inside a checkpoint is not trusted.
    """
    root = Path(folder)
    entries = _hash_and_sync(root)
    if save_seconds is None and save_started is not None:
        save_seconds = time.monotonic() - save_started
    record = CommitRecord(
        step=step,
        max_steps=max_steps,
        reason=reason,
        files=tuple(entries),
        versions=library_versions(),
        per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        attempt=attempt,
        wall_time=time.time(),
        save_seconds=save_seconds,
        world_size=world_size,
    )
    atomic_write_model(root / COMMIT_RECORD, record)
    log.info(
        "checkpoint_committed step=%d reason=%s files=%d bytes=%d save_seconds=%.3f",
        step,
        reason,
        len(entries),
        sum(entry.size for entry in entries),
        record.save_seconds or 0.0,
    )
    return record


def _report_preempted(args: TrainingArguments, step: int, attempt: int | None) -> None:
    """Leave error.json kind ``preempted``: exit 75 may not survive a launcher."""
    report = ErrorReport(
        type="SystemExit",
        message=f"stopped by SIGTERM after the emergency checkpoint checkpoint-{step}",
        kind=ErrorKind.PREEMPTED,
        step=step,
        phase=Phase.SAVE,
        pid=os.getpid(),
        attempt=attempt,
        wall_time=time.time(),
    )
    write_report(Layout(_output_dir(args)), report)


def _check_output_dir(args: TrainingArguments) -> None:
    """Fail at once when the script saves checkpoints where the supervisor does not look.

    Otherwise every checkpoint would be invisible: never validated, never
    resumed from, and each restart would start from scratch.
    """
    watched = os.environ.get(ENV_OUTPUT_DIR)
    if not watched:
        return
    saving = Path(_output_dir(args)).resolve()
    if saving != Path(watched).resolve():
        raise ConfigError(
            f"the script saves checkpoints to {saving} but trainwarden watches {watched}: "
            "make the job file's output_dir and the script's --output_dir the same folder"
        )


def _hash_and_sync(root: Path) -> list[FileEntry]:
    """List, hash and fsync every regular file below ``root``, then every folder, deepest first.

    Hashing right after the save reads the bytes while they are still in the
    page cache; a symlink inside a checkpoint is not trusted, so not listed.
    """
    entries: list[FileEntry] = []
    folders: list[Path] = []
    for current, dirnames, filenames in os.walk(root):
        dirnames.sort()
        folders.append(Path(current))
        for name in sorted(filenames):
            path = Path(current) / name
            if (Path(current) == root and _is_record_file(name)) or path.is_symlink():
                continue
            digest = file_digest(path)
            size = path.stat().st_size
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            entries.append(
                FileEntry(path=path.relative_to(root).as_posix(), size=size, hash=digest)
            )
    # Deepest first, then the output dir so the checkpoint's own name is durable.
    for path in [*reversed(folders), root.parent]:
        fsync_dir(path)
    return entries


class WardenCallback(TrainerCallback):
    """Make any HF Trainer run supervisable by trainwarden (see the module docstring).

    ``output_dir`` comes from the TrainingArguments and the attempt number from
    ``TRAINWARDEN_ATTEMPT``, so a bring-your-own script needs no arguments.
    ``handle_sigterm=False`` leaves SIGTERM to the script; ``final_save_follows``
    says the caller saves a final model after ``train()`` returns, so the end of
    training is announced as phase ``save`` rather than ``done``.
    """

    def __init__(
        self,
        *,
        handle_sigterm: bool = True,
        final_save_follows: bool = False,
        injected: bool = False,
    ) -> None:
        self.attempt = attempt_from_env()
        #: Added by ``inject_callback`` rather than by the script itself.
        self.injected = injected
        #: Inside ``Trainer.train`` (set by ``install_train_guard``'s wrapper).
        self.in_train_call = False
        # Parse now: a malformed spec is a config error before any work is done.
        self.failpoints = Failpoints.from_env()
        self.heartbeat: HeartbeatWriter | None = None
        #: Whether the loop reached its first step; until then a resume is still loading.
        self.loop_started = False
        self.phase = Phase.LOAD
        self.step = 0
        #: The job's ranks, known once training begins (a job of one until then).
        self.ranks = Ranks()
        self._step_started: float | None = None
        self._save_started: float | None = None
        self._emergency = False
        self._handle_sigterm = handle_sigterm
        self._final_save_follows = final_save_follows
        self._loss_log: LossLog | None = None
        install_stack_dumper()
        install_train_guard()
        _Active.callback = self

    def loading_resume(self) -> bool:
        """Return whether ``train()`` runs but its loop has not: the resume is loading.

        HF loads the adapter, optimizer, scheduler and RNG state inside
        ``train()`` before the first ``on_step_begin``; a failure after the loop
        started is the run's, not the checkpoint's.
        """
        return self.in_train_call and not self.loop_started

    # --- heartbeat ----------------------------------------------------------------

    def _beat(
        self,
        args: TrainingArguments,
        state: TrainerState,
        phase: Phase,
        *,
        last_step_seconds: float | None = None,
    ) -> None:
        self.phase = phase
        self.step = state.global_step
        if not state.is_world_process_zero:
            return
        if self.heartbeat is None or self.heartbeat.layout.output_dir != Path(_output_dir(args)):
            self.heartbeat = HeartbeatWriter(_output_dir(args), attempt=self.attempt)
        self.heartbeat.beat(
            phase,
            step=state.global_step,
            max_steps=state.max_steps or None,
            last_step_seconds=last_step_seconds,
        )

    def _save_requested(
        self,
        args: TrainingArguments,
        state: TrainerState,
        *,
        last_step_seconds: float | None = None,
    ) -> None:
        self._save_started = time.monotonic()
        self._beat(args, state, Phase.SAVE, last_step_seconds=last_step_seconds)
        self.failpoints.save_started()

    # --- trainer events ---------------------------------------------------------------

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.failpoints.bind(_output_dir(args))
        _check_output_dir(args)
        adopt_tracking_run_name(args)
        self._beat(args, state, Phase.LOAD)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.failpoints.bind(_output_dir(args))
        self.ranks = Ranks.current()
        if self.ranks.distributed:
            # Every rank says what it runs with: an OOM remedy must reach them all.
            log.info(
                "rank_training rank=%d world_size=%d device=%s "
                "per_device_train_batch_size=%d gradient_accumulation_steps=%d",
                self.ranks.rank,
                self.ranks.world_size,
                self.ranks.device,
                args.per_device_train_batch_size,
                args.gradient_accumulation_steps,
            )
        if self._handle_sigterm:
            # Only now: until the loop runs there is no progress to save, so a
            # SIGTERM during a (possibly minutes-long) load should kill at once
            # rather than wait for the load to finish and outlast the grace.
            install_preemption_handler()
        mark("train_begin")
        if state.is_world_process_zero:
            record_tracking_runs(_output_dir(args), attempt=self.attempt)
        self._beat(args, state, Phase.TRAIN)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.loop_started = True
        if state.max_steps and state.global_step >= state.max_steps:
            raise TrainingAlreadyComplete(
                f"resumed at step {state.global_step} of {state.max_steps}"
            )
        self._step_started = time.monotonic()
        if self.failpoints:
            self.failpoints.at_step_begin(state.global_step + 1)

    def on_substep_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Long gradient-accumulation steps still show life, from the loop itself.
        self._beat(args, state, Phase.TRAIN)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        mark("first_step")  # noted once: the end of this attempt's first optimizer step
        seconds = None if self._step_started is None else time.monotonic() - self._step_started
        # Every rank, every step: the ranks agree on the first SIGTERM any of them
        # got, so all save this very step. Also the rendezvous that keeps rank 0's
        # heartbeat below from outrunning a rank that has stopped progressing.
        if self.ranks.any(preemption_requested() or self._emergency):
            # Ask HF for a save; keep asking until one happens (save_strategy="best"
            # may veto a single request). Exiting happens in on_save, after the
            # commit. should_training_stop is deliberately left alone: HF stores
            # the control flags in trainer_state.json, and a resume with
            # restore_callback_states_from_checkpoint would stop one step later.
            if not self._emergency:
                log.warning(
                    "preemption_save_requested step=%d rank=%d sigterm_here=%s",
                    state.global_step,
                    self.ranks.rank,
                    preemption_requested(),
                )
            self._emergency = True
            control.should_save = True
        if control.should_evaluate:
            self._beat(args, state, Phase.EVAL, last_step_seconds=seconds)
        elif control.should_save:
            self._save_requested(args, state, last_step_seconds=seconds)
        else:
            self._beat(args, state, Phase.TRAIN, last_step_seconds=seconds)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if control.should_save and self.phase is not Phase.SAVE:
            self._save_requested(args, state)

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._beat(args, state, Phase.EVAL)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if control.should_save:
            self._save_requested(args, state)
        else:
            self._beat(args, state, Phase.TRAIN)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.failpoints.save_finished()
        folder = Path(_output_dir(args)) / f"checkpoint-{state.global_step}"
        # Once this returns on rank 0 every rank has returned from its part of
        # HF's save; and a SIGTERM that reached any rank during the save stops
        # all of them here, after the commit.
        stopping = self.ranks.any(preemption_requested() or self._emergency)
        if state.is_world_process_zero:
            self._commit(args, state, folder)
        self._save_started = None
        if stopping and state.global_step < state.max_steps:
            # Also when SIGTERM arrived during a periodic save: it is committed, so
            # every bit of progress is safe and the grace period is not spent. At
            # the last step the run is done: finishing (final/, exit 0) is quicker
            # than a restart that would only write final/.
            # No rank leaves before the record is durable: torchrun's agent, once
            # one rank exits, SIGTERMs the others and SIGKILLs them 30 s later
            # (fixed on that path; TORCH_ELASTIC_SHUTDOWN_TIMEOUT only covers
            # the agent's own SIGTERM).
            self.ranks.barrier()
            rank = self.ranks.rank
            log.warning("preempted step=%d checkpoint=%s rank=%d", state.global_step, folder, rank)
            if state.is_world_process_zero:
                _report_preempted(args, state.global_step, self.attempt)
            raise SystemExit(EXIT_PREEMPTED)
        self._beat(args, state, Phase.TRAIN)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or not state.is_world_process_zero:
            return
        if self._loss_log is None or self._loss_log.path.parent.parent != Path(_output_dir(args)):
            self._loss_log = LossLog(_output_dir(args), attempt=self.attempt)
        self._loss_log.append(state.global_step, logs, epoch=state.epoch)

    def _commit(self, args: TrainingArguments, state: TrainerState, folder: Path) -> None:
        """Seal ``folder`` on rank 0, once it holds every rank's part."""
        if not folder.is_dir():
            # Hyperparameter search saves under run-N/; nothing trainwarden watches.
            log.warning("commit_skipped reason=no_checkpoint_folder path=%s", folder)
            return
        missing = missing_rank_files(folder, self.ranks.world_size)
        if missing:
            # Unreachable after the all-reduce unless a rank's save failed quietly;
            # a record would vouch for a checkpoint that reseeds that rank.
            log.error("commit_skipped reason=rank_files_missing path=%s lacks=%s", folder, missing)
            return
        commit_checkpoint(
            folder,
            step=state.global_step,
            reason="emergency" if self._emergency else "periodic",
            max_steps=state.max_steps or None,
            per_device_train_batch_size=args.per_device_train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            attempt=self.attempt,
            save_started=self._save_started,
            world_size=self.ranks.world_size,
        )

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        mark("train_end")
        self._beat(args, state, Phase.SAVE if self._final_save_follows else Phase.DONE)
