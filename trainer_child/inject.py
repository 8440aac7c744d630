"""Give an unmodified training script what the built-in job has: ``inject_callback``.

``trainer_child/_site/sitecustomize.py`` calls in here, lazily, from inside the
user's own process:

* ``patch_trainer_module`` adds one ``WardenCallback`` to every
  ``transformers.Trainer`` (TRL's trainers included: they subclass it), unless the
  script adds its own, and guards ``Trainer.train`` so a resume at ``max_steps``
  takes no further step;
* ``report_uncaught`` turns an exception nobody caught into
  ``.warden/error.json``, so the supervisor's remedy (halve the micro-batch,
  prune the disk, give up on a bad model path) does not depend on log text.

Both must never make the user's program fail where it would not have failed
without trainwarden: every error here is reported and swallowed.
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType
from typing import Any

from trainer_child.protocol import ENV_OUTPUT_DIR, ENV_RESUME_FROM, Layout

__all__ = ["patch_trainer_module", "report_uncaught"]

log = logging.getLogger("trainer_child")

_PATCHED = "_trainwarden_patched"


def patch_trainer_module(module: ModuleType) -> None:
    """Patch ``module.Trainer`` (``transformers.trainer``) once; idempotent."""
    trainer_cls = getattr(module, "Trainer", None)
    if trainer_cls is None or getattr(trainer_cls, _PATCHED, False):
        return
    from trainer_child.callback import WardenCallback, install_train_guard

    original_init = trainer_cls.__init__
    original_add = trainer_cls.add_callback

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        if any(isinstance(cb, WardenCallback) for cb in self.callback_handler.callbacks):
            return  # the script added its own: one is enough
        callback = WardenCallback(injected=True)
        self.callback_handler.add_callback(callback)
        # Added after Trainer.__init__ announced on_init_end to the others.
        callback.on_init_end(self.args, self.state, self.control)

    @functools.wraps(original_add)
    def add_callback(self: Any, callback: Any) -> None:
        if callback is WardenCallback or isinstance(callback, WardenCallback):
            # The script brings its own after construction: it replaces ours.
            for existing in list(self.callback_handler.callbacks):
                if isinstance(existing, WardenCallback) and existing.injected:
                    self.callback_handler.remove_callback(existing)
        original_add(self, callback)

    trainer_cls.__init__ = __init__
    trainer_cls.add_callback = add_callback
    setattr(trainer_cls, _PATCHED, True)
    install_train_guard(trainer_cls)
    log.info("warden_callback_injected trainer=%s.%s", module.__name__, trainer_cls.__name__)


def report_uncaught(exc: BaseException) -> None:
    """Write ``.warden/error.json`` for ``exc`` unless an earlier failure already did.

    The first report wins: under a launcher, the rank that failed first holds
    the cause and the others fail of its consequences (a broken collective).
    """
    output_dir = os.environ.get(ENV_OUTPUT_DIR)
    if not output_dir:
        return
    layout = Layout(output_dir)
    if layout.error.exists():
        return
    from trainer_child.callback import active_callback
    from trainer_child.errors import build_report, classify, write_report
    from trainer_child.heartbeat import attempt_from_env

    warden = active_callback()
    resume_from = os.environ.get(ENV_RESUME_FROM) or None
    loading_resume = resume_from is not None and warden is not None and warden.loading_resume()
    kind = classify(exc, loading_resume=loading_resume)
    report = build_report(
        exc,
        kind,
        step=warden.step if warden is not None else None,
        phase=warden.phase if warden is not None else None,
        resume_from=resume_from,
        attempt=attempt_from_env(),
    )
    write_report(layout, report)
