"""Which valid checkpoints to delete: the retention rules, as a pure function.

The child always trains with ``save_total_limit=None``; the supervisor owns
retention because only it knows which checkpoints are *proven* complete. HF's own
rotation counts folders, so a run of partial saves can rotate the last good
checkpoint away.

Only VALID checkpoints are ever candidates. Partial and corrupt folders are the
quarantine's business, in-progress ones are being written, symlinks are never
touched. Among valid ones these are never selected, whatever the settings:

- the newest valid checkpoint (the resume point if the child dies now), both
  counting and not counting ``exclude`` (poisoned steps), so a poisoned newest
  one and the newest usable one both survive;
- everything in ``protected`` (the policy passes the step the running child
  resumed from, until a newer one commits).

Nothing here touches the filesystem or the clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from supervisor.core.checkpoints import is_valid
from supervisor.core.model import Inventory

__all__ = ["RetentionPlan", "plan_retention", "select_for_removal"]

# Why a valid checkpoint is kept; the first matching reason is the one reported.
KEPT_NEWEST = "newest valid"
KEPT_NEWEST_USABLE = "newest valid not excluded"
KEPT_PROTECTED = "protected"
KEPT_LAST = "keep_last"
KEPT_BEST = "best"
KEPT_EVERY = "keep_every"


@dataclass(frozen=True)
class RetentionPlan:
    """What retention decided for every valid checkpoint (for `prune --dry-run` and logs)."""

    #: Steps to remove, oldest first: an interrupted prune then loses the least useful.
    delete: tuple[int, ...]
    #: ``(step, why)`` for each valid checkpoint kept, oldest first.
    kept: tuple[tuple[int, str], ...]


def plan_retention(
    inventory: Inventory,
    *,
    keep_last: int,
    keep_best: bool = True,
    keep_every: int | None = None,
    protected: Iterable[int] = frozenset(),
    exclude: Iterable[int] = frozenset(),
    aggressive: bool = False,
) -> RetentionPlan:
    """Decide which valid checkpoints to keep and which to delete, with the reason for each.

    ``keep_last`` counts the newest valid checkpoints not in ``exclude``: poisoned
    steps cannot be resumed from, so keeping them would not buy a fallback point.
    ``aggressive`` (disk pressure) keeps only the never-delete set above: the best
    checkpoint and ``keep_every`` archives are given up before the run stops for
    lack of disk.
    """
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0, got {keep_last}")
    if keep_every is not None and keep_every < 1:
        raise ValueError(f"keep_every must be >= 1 or None, got {keep_every}")
    excluded = frozenset(exclude)
    valid = sorted(entry.step for entry in inventory.entries if is_valid(entry))
    usable = [step for step in valid if step not in excluded]

    reasons: dict[int, str] = {}

    def keep(step: int | None, why: str) -> None:
        if step is not None and step in valid:
            reasons.setdefault(step, why)

    keep(valid[-1] if valid else None, KEPT_NEWEST)
    keep(usable[-1] if usable else None, KEPT_NEWEST_USABLE)
    for step in protected:
        keep(step, KEPT_PROTECTED)
    if not aggressive:
        # max(0, ...): a negative start would silently keep only the tail end.
        for step in usable[max(0, len(usable) - keep_last) :] if keep_last else []:
            keep(step, KEPT_LAST)
        if keep_best:
            keep(_best_step(inventory), KEPT_BEST)
        if keep_every is not None:
            for step in valid:
                if step % keep_every == 0:
                    keep(step, KEPT_EVERY)

    return RetentionPlan(
        delete=tuple(step for step in valid if step not in reasons),
        kept=tuple((step, reasons[step]) for step in valid if step in reasons),
    )


def select_for_removal(
    inventory: Inventory,
    *,
    keep_last: int,
    keep_best: bool = True,
    keep_every: int | None = None,
    protected: Iterable[int] = frozenset(),
    exclude: Iterable[int] = frozenset(),
    aggressive: bool = False,
) -> tuple[int, ...]:
    """Return the valid steps to delete, oldest first (see ``plan_retention``)."""
    return plan_retention(
        inventory,
        keep_last=keep_last,
        keep_best=keep_best,
        keep_every=keep_every,
        protected=protected,
        exclude=exclude,
        aggressive=aggressive,
    ).delete


def _best_step(inventory: Inventory) -> int | None:
    """Return the best step as the newest valid trainer_state names it.

    The newest state has seen every evaluation, so its ``best_model_checkpoint``
    supersedes what older checkpoints recorded.
    """
    for entry in sorted(inventory.entries, key=lambda e: e.step, reverse=True):
        if is_valid(entry) and entry.best_step is not None:
            return entry.best_step
    return None
