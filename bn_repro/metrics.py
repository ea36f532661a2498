"""Accuracy summaries of a run's evaluation records (``metrics.jsonl``):
final and best accuracy, accuracy at milestone steps, steps to target
accuracies (the paper's Figure 1 and Figure 3 readings), and divergence."""

import math
from collections.abc import Sequence

from bn_repro.run_records import AFTER_TRAINING


def accuracy_curve(records: Sequence[dict], key: str = "test_accuracy") -> list[tuple[int, float]]:
    """(step, accuracy) of every evaluation during training (not the final model's)."""
    return [(r["step"], r[key]) for r in records if key in r and not r.get(AFTER_TRAINING)]


def summarize_accuracy(
    records: Sequence[dict],
    key: str,
    milestones: Sequence[int],
    targets: Sequence[float],
) -> dict:
    """Final and best ``key`` accuracy, its value at milestone steps, steps to targets.

    The value at a milestone is the evaluation at exactly that step (None if
    there was none); steps to a target is the first evaluated step whose
    accuracy reaches it (None if never).
    """
    curve = accuracy_curve(records, key)
    if not curve:
        return {}
    by_step = dict(curve)
    best_step, best = max(curve, key=lambda sa: (sa[1], -sa[0]))
    return {
        "final_step": curve[-1][0],
        f"final_{key}": curve[-1][1],
        f"best_{key}": best,
        "best_step": best_step,
        f"{key}_at": {str(s): by_step.get(s) for s in milestones},
        "steps_to": {
            f"{t:g}": next((s for s, a in curve if a >= t), None) for t in targets
        },
    }


def final_and_best(records: Sequence[dict], key: str) -> dict:
    """``final_<key>`` and ``best_<key>`` (for a secondary accuracy, e.g. top-5)."""
    values = [v for _, v in accuracy_curve(records, key)]
    return {f"final_{key}": values[-1], f"best_{key}": max(values)} if values else {}


def first_non_finite(values: Sequence[float]) -> int | None:
    """Index of the first NaN or infinite value, or None."""
    return next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
