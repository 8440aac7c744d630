"""What the tests and the benchmarks (``bench/``) share: processes, jobs, outputs, checkpoints.

- ``processes``: start a real process in its own session, wait on it, always kill
  and reap it (and everything it started); ``wait_for`` a condition.
- ``jobs``: the offline environment, job files for the child and for the supervisor.
- ``outputs``: read what a run wrote (journal, heartbeat, error.json, commit
  records) and compare adapters bit for bit.
- ``checkpoints``: realistic checkpoint folders without training, and ways to damage them.
- ``capabilities``: skip only when a capability is truly absent (see ``require``).
"""
