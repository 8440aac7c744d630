"""A warm standby: a child whose start-up is done before the failure it will replace.

The supervisor keeps one beside the training child (``restart.standby: auto``,
``supervisor/shell/standby.py``). Its life, ``python -m trainer_child.standby``:

1. It is started like any child (its own session, output to
   ``.warden/logs/standby.log``) with one end of a Unix socket and *no* run
   lock: if everything else died, it must not keep a new supervisor out. It asks
   the kernel to SIGKILL it when the supervisor dies (``PR_SET_PDEATHSIG``) and
   checks that the supervisor is still its parent (it may have died before the
   request). While idle it is the OOM killer's first choice
   (``oom_score_adj`` 1000) and, where it can get its priority back later,
   runs at nice 19.
2. It reads its recipe (``protocol.StandbyRecipe``) and prepares: imports
   torch, transformers, trl and peft; for the built-in job it also loads the
   dataset, the frozen base model and the tokenizer into host memory
   (``job.preload``). Nothing initialises CUDA before go.
3. It blocks in ``recvmsg`` (no polling: an idle standby costs no CPU) until
   the attempt arrives (``protocol.StandbyGo``) with two kinds of descriptors:
   the attempt log's and the ones a cold child inherits (the run lock's). From
   then on it *is* the attempt: stdout and stderr go to the attempt log, it
   holds the lock as a cold child does, it no longer dies with the supervisor
   (an orphaned child keeps training and saves on request), its priority is
   restored, and it runs the built-in job (``trainer_child.__main__.main``) or
   the user's module or script in-process (``runpy``) with the attempt's argv,
   environment and cwd; its exit status is the attempt's.

A socket closed before go (the supervisor discarding a stale standby, or
exiting) ends it with status 0.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import ctypes
import faulthandler
import importlib
import importlib.util
import logging
import os
import re
import resource
import runpy
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainer_child.heartbeat import forget_marks, mark
from trainer_child.protocol import (
    Layout,
    StandbyFile,
    StandbyGo,
    StandbyRecipe,
    atomic_write_model,
)

if TYPE_CHECKING:
    from trainer_child.job import Preloaded

__all__ = ["Priority", "main", "script_imports"]

#: The standby's own lines; never the root logger, whose set-up belongs to the job.
log = logging.getLogger("trainer_child.standby")

PR_SET_PDEATHSIG = 1
#: The largest message either side sends (an attempt's environment is a few kB).
MAX_MESSAGE = 1 << 20
MAX_FDS = 16
IDLE_NICE = 19
IDLE_OOM_SCORE_ADJ = "1000"
CAP_SYS_NICE = 23
#: What every Python job of ours imports; in this order, so transformers.trainer
#: (which the inject hook patches) is loaded before trl subclasses it.
HEAVY_MODULES = (
    "torch",
    "transformers",
    "transformers.trainer",
    "peft",
    "datasets",
    "accelerate",
    "trl",
    "trl.trainer.sft_trainer",
)
#: Packages a script's own top-level imports are taken from ahead of time:
#: known to import without initialising CUDA. Anything else (a user's module,
#: bitsandbytes, deepspeed) is imported on go, as in a cold start.
SAFE_PACKAGES = frozenset(
    {
        "accelerate",
        "datasets",
        "evaluate",
        "huggingface_hub",
        "numpy",
        "pandas",
        "peft",
        "safetensors",
        "tokenizers",
        "torch",
        "transformers",
        "trl",
    }
)


# --- dying with the supervisor, idling politely ---------------------------------------------


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def die_with(parent: int) -> None:
    """Be SIGKILLed when ``parent`` dies; exit now if it already has.

    The death signal fires when the *thread* that forked us ends, which is why
    the supervisor starts standbys from its one long-lived loop thread.
    """
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(0)  # re-parented already: nobody will ever send go


def _may_raise_priority(nice: int) -> bool:
    """Say whether this process could set its nice value back to ``nice`` after lowering it."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    if soft == resource.RLIM_INFINITY or 20 - nice <= soft:
        return True
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    match = re.search(r"^CapEff:\s*([0-9a-fA-F]+)$", status, re.MULTILINE)
    return match is not None and bool(int(match.group(1), 16) >> CAP_SYS_NICE & 1)


@dataclass
class Priority:
    """What the standby lowered while idle, so that go can restore it exactly."""

    nice: int | None = None
    oom_score_adj: str | None = None
    note: str = ""

    @classmethod
    def lower(cls) -> Priority:
        """Idle at nice 19 (only where it can be undone) and as the OOM killer's first pick.

        Raising a nice value back needs CAP_SYS_NICE or RLIMIT_NICE; without
        them a lowered standby would train at nice 19 for ever, so it stays put.
        """
        lowered = cls()
        original = os.getpriority(os.PRIO_PROCESS, 0)
        if _may_raise_priority(original):
            os.setpriority(os.PRIO_PROCESS, 0, IDLE_NICE)
            lowered.nice = original
            lowered.note = f"nice {IDLE_NICE}"
        else:
            lowered.note = "normal priority (cannot raise a nice value back here)"
        with contextlib.suppress(OSError):
            path = Path("/proc/self/oom_score_adj")
            previous = path.read_text().strip()
            path.write_text(IDLE_OOM_SCORE_ADJ)
            lowered.oom_score_adj = previous
        return lowered

    def restore(self) -> None:
        """Give every thread its nice value back (it is per thread on Linux), and the OOM score."""
        if self.nice is not None:
            for tid in os.listdir("/proc/self/task"):
                with contextlib.suppress(ProcessLookupError):
                    os.setpriority(os.PRIO_PROCESS, int(tid), self.nice)
        if self.oom_score_adj is not None:
            try:
                Path("/proc/self/oom_score_adj").write_text(self.oom_score_adj)
            except OSError as exc:
                log.warning("standby_oom_score_kept error=%s", exc)


# --- the socket ----------------------------------------------------------------------


def _receive(sock: socket.socket) -> tuple[bytes, list[int]] | None:
    """Block for the next message; None once the supervisor closed its end."""
    message, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise OSError("standby message truncated")
    if not message:
        for fd in fds:
            os.close(fd)
        return None
    return message, fds


# --- preparing ---------------------------------------------------------------------


def _import_quietly(name: str, attributes: tuple[str, ...] = ()) -> bool:
    """Import ``name`` (and touch ``attributes``, which loads lazy submodules); False if absent."""
    try:
        module = importlib.import_module(name)
        for attribute in attributes:
            getattr(module, attribute, None)
    except Exception as exc:
        log.info("standby_import_skipped module=%s error=%r", name, exc)
        return False
    return True


def _top_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements a module runs when it is loaded: its body, into try/if, not ``__main__``'s."""
    for node in body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            continue
        yield node
        if isinstance(node, ast.Try | ast.If):
            yield from _top_level([*node.body, *getattr(node, "orelse", [])])


def script_imports(source: str, package: str | None) -> list[tuple[str, tuple[str, ...]]]:
    """Return the ``(module, names)`` a script imports at load time from SAFE_PACKAGES.

    ``package`` resolves relative imports of a ``-m`` module. Imports inside
    functions and under ``if __name__ == "__main__"`` are left to the attempt.
    """
    found: list[tuple[str, tuple[str, ...]]] = []
    for node in _top_level(ast.parse(source).body):
        if isinstance(node, ast.Import):
            found += [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            try:
                base = (
                    importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                    if node.level
                    else (node.module or "")
                )
            except (ImportError, ValueError):
                continue
            found.append((base, tuple(alias.name for alias in node.names)))
    return [(name, names) for name, names in found if name.split(".")[0] in SAFE_PACKAGES]


def _source(recipe: StandbyRecipe) -> tuple[str, str | None] | None:
    """The target's source text and package (for relative imports), if it can be read."""
    if recipe.kind == "script":
        path: str | None = recipe.target
        package = None
    else:
        if "." in recipe.target and recipe.target.split(".")[0] not in SAFE_PACKAGES:
            # find_spec("pkg.mod") imports pkg: the user's own code, which runs on go only.
            return None
        spec = importlib.util.find_spec(recipe.target)
        path = spec.origin if spec is not None else None
        package = recipe.target.rpartition(".")[0] or None
    if path is None or not path.endswith(".py"):
        return None
    try:
        return Path(path).read_text(encoding="utf-8"), package
    except (OSError, UnicodeDecodeError):
        return None


def _prepare_python(recipe: StandbyRecipe) -> str:
    """Import what a ``command:`` job's Python module or script would import first."""
    wanted = HEAVY_MODULES if recipe.imports is None else recipe.imports
    done = [name for name in wanted if _import_quietly(name)]
    with contextlib.suppress(ImportError, SyntaxError, ValueError):
        found = _source(recipe)
        if found is not None:
            for name, attributes in script_imports(*found):
                _import_quietly(name, attributes)
    return "imports " + ", ".join(n for n in done if "." not in n)


def _prepare_builtin(recipe: StandbyRecipe) -> tuple[str, Preloaded]:
    """Import the built-in job's libraries and load what its attempts share."""
    assert recipe.job is not None
    import trainer_child.__main__
    import trainer_child.callback  # noqa: F401 - transformers, torch
    from trainer_child.job import preload

    _import_quietly("trl.trainer.sft_trainer")
    preloaded, held = preload(recipe.job)
    return f"imports, {held}", preloaded


def _refuse_cuda() -> None:
    """Fail the standby if preparing it initialised CUDA: it would hold GPU memory idle."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised while preparing; a standby must not hold it")


def _announce(layout: Layout, recipe: StandbyRecipe, state: str, **fields: object) -> None:
    """Replace ``.warden/standby.json`` with the standby's current account of itself."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    record = StandbyFile.model_validate(
        {
            "pid": os.getpid(),
            "state": state,
            "kind": recipe.kind,
            "target": recipe.target,
            "key": recipe.key,
            "rss_bytes": pages * os.sysconf("SC_PAGE_SIZE"),
            "wall_time": time.time(),
            **fields,
        }
    )
    with contextlib.suppress(OSError):
        atomic_write_model(layout.standby, record, durable=False)


# --- becoming the attempt ------------------------------------------------------------


def _become_attempt(go: StandbyGo, fds: list[int], priority: Priority) -> None:
    """Take the attempt's log, lock, environment and cwd; stop dying with the supervisor."""
    log_fd, *inherited = fds
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    for fd in inherited:
        # The run lock: what we start (dataloader workers, a script's own
        # subprocesses) keeps it, as a cold child's descendants do.
        os.set_inheritable(fd, True)
    # An orphaned attempt must keep training, and save when the next supervisor asks.
    _prctl(PR_SET_PDEATHSIG, 0)
    priority.restore()
    os.environ.clear()
    os.environ.update(go.env)
    os.chdir(go.cwd)
    forget_marks()
    mark("started")


def _exit_status(code: object) -> int:
    """Turn ``SystemExit.code`` into an exit status as the interpreter does."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _run_python(recipe: StandbyRecipe, go: StandbyGo) -> int:
    """Run the module or script as ``__main__``, as ``python -m`` / ``python FILE`` would."""
    try:
        if recipe.kind == "module":
            # run_module puts the module's file name in argv[0], as -m does.
            sys.argv = [recipe.target, *go.args]
            runpy.run_module(recipe.target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [recipe.target, *go.args]
            sys.path[0] = os.path.dirname(os.path.abspath(recipe.target))
            runpy.run_path(recipe.target, run_name="__main__")
    except SystemExit as exc:
        return _exit_status(exc.code)
    except BaseException:
        # The inject hook's excepthook writes error.json, then prints the traceback.
        sys.excepthook(*sys.exc_info())
        return 1
    return 0


# --- main ----------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer_child.standby",
        description="A warm standby child of trainwarden (started by the supervisor only).",
    )
    parser.add_argument("--fd", type=int, required=True, help="this end of the socket")
    parser.add_argument("--parent", type=int, required=True, help="the supervisor's pid")
    return parser.parse_args(argv)


def _serve(sock: socket.socket, recipe: StandbyRecipe, priority: Priority) -> int:
    """Prepare, wait for go, become the attempt; return its exit status."""
    layout = Layout(recipe.output_dir)
    started = time.monotonic()
    _announce(layout, recipe, "preparing", priority=priority.note)
    preloaded: Preloaded | None = None
    # torch asks NVML, not the CUDA driver, whether a GPU exists (go replaces the env).
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        if recipe.kind == "builtin":
            held, preloaded = _prepare_builtin(recipe)
        else:
            held = _prepare_python(recipe)
        _refuse_cuda()
    except Exception as exc:
        log.exception("standby_prepare_failed")
        _announce(layout, recipe, "failed", reason=repr(exc), priority=priority.note)
        return 1
    seconds = round(time.monotonic() - started, 3)
    _announce(
        layout, recipe, "ready", preloaded=held, prepare_seconds=seconds, priority=priority.note
    )
    received = _receive(sock)
    if received is None:
        return 0
    go = StandbyGo.model_validate_json(received[0])
    sock.close()
    _become_attempt(go, received[1], priority)
    if recipe.kind == "builtin":
        from trainer_child.__main__ import main as run_attempt

        return run_attempt(list(go.args), preloaded=preloaded)
    return _run_python(recipe, go)


def main(argv: list[str] | None = None) -> int:
    """Be a standby until go, then the attempt; return the attempt's exit status."""
    options = _parse(argv)
    die_with(options.parent)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    priority = Priority.lower()
    sock = socket.socket(fileno=options.fd)
    received = _receive(sock)
    if received is None:
        return 0
    recipe = StandbyRecipe.model_validate_json(received[0])
    return _serve(sock, recipe, priority)


if __name__ == "__main__":
    raise SystemExit(main())
