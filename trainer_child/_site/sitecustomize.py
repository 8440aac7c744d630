"""trainwarden's start-up hook for ``command:`` jobs (``inject_callback: true``).

The supervisor puts this folder first on the child's ``PYTHONPATH`` and sets
``TRAINWARDEN_INJECT=1``; Python imports ``sitecustomize`` at start-up in every
process of the job (the script, ``accelerate``/``torchrun`` launchers and their
ranks, spawned dataloader workers). The hook then:

* waits for ``transformers.trainer`` to be imported, and patches ``Trainer`` so
  every trainer the script builds carries a ``WardenCallback``
  (``trainer_child.inject``): commit records, heartbeats, the emergency save on
  SIGTERM, and no step past ``max_steps`` after a resume;
* writes ``.warden/error.json`` for an exception that nobody caught, so the
  supervisor can tell a CUDA OOM or a bad model path from any other crash;
* makes SIGUSR1 print the process's Python stacks (faulthandler) where nothing
  else handles it: the supervisor's hang diagnosis sends it to every process
  of the job, and its default action would kill a launcher (torchrun's agent)
  and leave its ranks to be found without it.

Hazards this file is written around:

* It runs in *every* Python process under the child, possibly in an interpreter
  where trainwarden is not installed (a user's conda env). So it imports only
  the standard library up front, imports ``trainer_child`` lazily, and when that
  fails says so once on stderr and leaves the program alone.
* Python imports only the first ``sitecustomize`` on ``sys.path``; the one this
  file shadows (Debian's, conda's, a user's) is found and run afterwards.
* ``transformers`` may never be imported at all (a shell wrapper, a data-prep
  step): nothing but a cheap meta-path finder is left in place then.
"""

from __future__ import annotations

import faulthandler
import importlib.abc
import importlib.util
import os
import signal
import sys
from types import ModuleType, TracebackType
from typing import Any

_TARGET = "transformers.trainer"
_HERE = os.path.dirname(os.path.abspath(__file__))


def _warn(message: str) -> None:
    sys.stderr.write(f"trainwarden: {message}\n")


class _TrainerHook(importlib.abc.MetaPathFinder):
    """Patch ``transformers.trainer`` right after its module body has run."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _TARGET:
            return None
        # One shot: step aside so the real finders locate the module.
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        loader = getattr(spec, "loader", None)
        if spec is None or loader is None or not hasattr(loader, "exec_module"):
            return spec
        run_body = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_body(module)
            _patch(module)

        # The loader object belongs to this one module spec, so overriding its
        # method on the instance affects nothing else.
        loader.exec_module = exec_module
        return spec


def _patch(module: ModuleType) -> None:
    try:
        from trainer_child.inject import patch_trainer_module
    except Exception as exc:
        _warn(f"cannot add WardenCallback here ({exc!r}); training runs unprotected")
        return
    patch_trainer_module(module)


_previous_excepthook = sys.excepthook


def _excepthook(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    try:
        from trainer_child.inject import report_uncaught

        report_uncaught(exc)
    except Exception:  # noqa: S110 - the original traceback matters more
        pass
    _previous_excepthook(exc_type, exc, tb)


def _run_shadowed_sitecustomize() -> None:
    """Run the ``sitecustomize`` that this one hides, as Python would have."""
    for entry in sys.path:
        folder = os.path.abspath(entry or os.curdir)
        if folder == _HERE:
            continue
        candidate = os.path.join(folder, "sitecustomize.py")
        if not os.path.isfile(candidate):
            continue
        name = "_trainwarden_shadowed_sitecustomize"
        spec = importlib.util.spec_from_file_location(name, candidate)
        if spec is None or spec.loader is None:
            return
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            _warn(f"error in {candidate}: {exc!r}")
        return


def _install() -> None:
    if os.environ.get("TRAINWARDEN_INJECT") == "1":
        if _TARGET in sys.modules:
            _patch(sys.modules[_TARGET])
        else:
            sys.meta_path.insert(0, _TrainerHook())
        sys.excepthook = _excepthook
        if signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:
            faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    _run_shadowed_sitecustomize()


_install()
