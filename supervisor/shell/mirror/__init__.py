"""The durable remote mirror: every committed checkpoint also lives under an fsspec URL.

On spot VMs the local disk often goes with the machine. With ``mirror:`` set,
each checkpoint is uploaded after it commits (in the background), ``final/`` and
``.warden/state.json`` too, and a machine that starts with an empty output_dir
pulls the newest valid remote checkpoint back before resuming.

Modules: ``remote`` (``RemoteStore``: the layout under the prefix, the validity
rule, upload/download/quarantine/remove/prune), ``worker`` (``MirrorWorker``:
background uploads, retries, lag, drain), ``restore`` (what runs at start),
``errors`` (the exception tree and redaction of credentials).

How the supervisor uses it (the loop owns all of this; handlers only enqueue)::

    remote = RemoteStore(cfg.mirror.url, cfg.mirror.storage_options)
    remote.probe()                        # ProbeFailed -> exit 78, message names the URL
    report = restore(layout, remote, shell.store)          # before the first inventory
    worker = MirrorWorker(
        remote, layout, queue.put,        # MirrorEvent arrives on the loop's queue
        concurrency=cfg.mirror.upload_concurrency,
        keep_last=cfg.mirror_keep_last,
        keep_best=cfg.retention.keep_best,
        keep_every=cfg.retention.keep_every,
        newest_uploaded=report.remote_newest,
    ).start()
    worker.submit_prune()                 # a killed predecessor may have left a partial
    ...
    worker.submit_checkpoint(step)        # on checkpoint_committed
    worker.submit_state()                 # after each Persist
    worker.submit_final()                 # when final/ verifies complete
    status += "; " + worker.lag().status_line()      # "remote: checkpoint-400, 2 behind"
    ...
    result = worker.drain(deadline=now + grace_left)  # on SIGTERM, after the emergency save
    worker.close(timeout=10)              # always, on the way out
"""

from __future__ import annotations

from supervisor.shell.mirror.errors import (
    LocalMismatch,
    MirrorError,
    Pinned,
    ProbeFailed,
    RemoteCorrupt,
    redact_url,
)
from supervisor.shell.mirror.remote import (
    PruneResult,
    RemoteCheckpoint,
    RemoteInventory,
    RemoteStatus,
    RemoteStore,
    UploadResult,
    plan_remote_retention,
)
from supervisor.shell.mirror.restore import RestoreReport, restore
from supervisor.shell.mirror.worker import (
    DrainResult,
    Job,
    JobKind,
    MirrorEvent,
    MirrorLag,
    MirrorWorker,
    Outcome,
)

__all__ = [
    "DrainResult",
    "Job",
    "JobKind",
    "LocalMismatch",
    "MirrorError",
    "MirrorEvent",
    "MirrorLag",
    "MirrorWorker",
    "Outcome",
    "Pinned",
    "ProbeFailed",
    "PruneResult",
    "RemoteCheckpoint",
    "RemoteCorrupt",
    "RemoteInventory",
    "RemoteStatus",
    "RemoteStore",
    "RestoreReport",
    "UploadResult",
    "plan_remote_retention",
    "redact_url",
    "restore",
]
