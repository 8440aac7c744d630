"""A process that uploads one checkpoint and stops dead after its first file, for SIGKILL tests.

``python -m tests.support.mirror_upload_child SPEC.json`` where the spec names
``url``, ``storage_options``, ``checkpoint`` (a local folder) and ``step``. The
transfers run for real, one at a time; after the first one it prints
``first-file-uploaded`` and sleeps, so the test can SIGKILL a supervisor that is
provably mid-upload.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from supervisor.shell.mirror.remote import RemoteStore

T = TypeVar("T")


class StallAfterFirst:
    """Transfers that run the first task, announce it, then hang until killed."""

    def run(self, tasks: Sequence[Callable[[], T]]) -> list[T]:
        results = [tasks[0]()]
        print("first-file-uploaded", flush=True)
        time.sleep(600)
        results += [task() for task in tasks[1:]]
        return results


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    store = RemoteStore(spec["url"], spec["storage_options"])
    store.upload_checkpoint(Path(spec["checkpoint"]), spec["step"], transfers=StallAfterFirst())
    print("upload-finished", flush=True)


if __name__ == "__main__":
    main()
