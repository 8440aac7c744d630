"""Benchmarks of trainwarden: ``python -m bench [--quick]`` (see bench/README.md).

Every comparison is measured A/B interleaved within one invocation and reported as
medians and ratios, because absolute times drift on a shared machine.
"""

from __future__ import annotations
