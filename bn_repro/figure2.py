"""Sec. 4.2.2's single-network comparison read from runs' workdirs: Figure 2
(validation accuracy vs training steps) and Figure 3 (steps to match
Inception, maximum accuracy), and the same readings for any group of runs (a
learning-rate sweep, an ablation).

A group is a list of runs that differ only in their seed. "Inception's
accuracy" (the paper's 72.2%) is the mean over the ``inception`` group's seeds
of each run's best accuracy during training; a run's steps to it is its first
evaluated step at or above it. Works on any workdirs of ``python -m
bn_repro.main`` (ImageNet runs of ``configs/imagenet.py`` as well as the
Fashion-MNIST proxy): ``scripts/reproduce_figure2.py --report_only``.
"""

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bn_repro.compare import NONE, RunRecord, markdown_table  # noqa: E402

# [paper] Figure 3: initial learning rate, steps to match Inception's 72.2%, max top-1;
# Sec. 4.2.2 for the two nets without BN that failed.
PAPER_FIGURE3 = {
    "inception": {"learning_rate": 0.0015, "steps_to_target": 31.0e6, "max_accuracy": 0.722},
    "bn_baseline": {"learning_rate": 0.0015, "steps_to_target": 13.3e6, "max_accuracy": 0.727},
    "bn_x5": {"learning_rate": 0.0075, "steps_to_target": 2.1e6, "max_accuracy": 0.730},
    "bn_x30": {"learning_rate": 0.045, "steps_to_target": 2.7e6, "max_accuracy": 0.748},
    "bn_x5_sigmoid": {"learning_rate": 0.0075, "steps_to_target": None, "max_accuracy": 0.698},
    "inception_x5": {"learning_rate": 0.0075, "result": "diverges (\"machine infinity\")"},
    "inception_sigmoid": {"learning_rate": 0.0015, "result": "never above 0.1% (chance)"},
}
FIGURE2_ROWS = ("inception", "bn_baseline", "bn_x5", "bn_x30", "bn_x5_sigmoid")
REFERENCE = "inception"


def variant_of(run: RunRecord) -> str:
    """The config variant a run was made from, without its size (``bn_x5:fashion`` -> ``bn_x5``)."""
    return str(run.config.get("variant", run.name)).split(":")[0]


def group_by_variant(runs: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(variant_of(run), []).append(run)
    return groups


def evaluation_curve(run: RunRecord) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, accuracies and wall times (s) of the run's evaluations during training."""
    evals = sorted(run.evaluations().items())
    key = run.accuracy_key
    return (np.array([s for s, _ in evals]), np.array([r[key] for _, r in evals]),
            np.array([r.get("wall_time_s", math.nan) for _, r in evals]))


def best_accuracy(run: RunRecord) -> float | None:
    _, accuracy, _ = evaluation_curve(run)
    return float(accuracy.max()) if accuracy.size else None


def steps_to(run: RunRecord, target: float) -> int | None:
    """The first evaluated step with accuracy >= ``target`` (None: never)."""
    steps, accuracy, _ = evaluation_curve(run)
    reached = np.nonzero(accuracy >= target)[0]
    return int(steps[reached[0]]) if reached.size else None


def reference_accuracy(groups: Mapping[str, Sequence[RunRecord]], reference: str = REFERENCE) -> float:
    """The target: the mean over the reference group's runs of their best accuracy."""
    if not groups.get(reference):
        raise ValueError(f"no {reference!r} runs among {sorted(groups)}: the target is their best accuracy")
    return statistics.fmean(best_accuracy(run) or 0.0 for run in groups[reference])


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value; None, None for none)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def group_row(label: str, runs: Sequence[RunRecord], target: float) -> dict[str, Any]:
    """One row of a comparison: over the group's seeds, steps to ``target``
    (over the runs that reached it), best accuracy, Algorithm 2's final
    accuracy, and which runs diverged and where."""
    key = runs[0].accuracy_key
    steps_each = [steps_to(run, target) for run in runs]
    best_each = [best_accuracy(run) for run in runs]
    reached = [s for s in steps_each if s is not None]
    best = [b for b in best_each if b is not None]
    population = [run.summary[f"final_{key}_population_stats"] for run in runs
                  if run.summary and f"final_{key}_population_stats" in run.summary]
    diverged = sorted(run.summary["diverged_at_step"] for run in runs if run.summary and run.summary.get("diverged"))
    config = runs[0].config
    chance = 1.0 / config.get("model", {}).get("num_classes", 1000)
    learning_rate = config["learning_rate"] * config.get("lr_multiplier", 1.0)
    return {
        "label": label,
        "runs": len(runs),
        "finished": sum(run.summary is not None for run in runs),
        "learning_rate": learning_rate,
        "seeds": sorted(run.config.get("seed") for run in runs),
        "reached_target": len(reached),
        "steps_to_target": dict(zip(("mean", "std"), mean_std(reached))),
        "steps_to_target_each": steps_each,
        "max_accuracy": dict(zip(("mean", "std"), mean_std(best))),
        "max_accuracy_each": best_each,
        "final_accuracy_population_stats": dict(zip(("mean", "std"), mean_std(population))),
        "chance": chance,
        # Finished without diverging, but never above twice the chance accuracy.
        "did_not_learn": sum(b < 2 * chance for b, run in zip(best, runs)
                             if run.summary and not run.summary.get("diverged")),
        "diverged": len(diverged),
        "diverged_at_steps": diverged,
        "paths": [run.path for run in runs],
    }


def _pm(stats: Mapping[str, float | None], spec: str) -> str:
    if stats["mean"] is None:
        return NONE
    return f"{format(stats['mean'], spec)} ± {format(stats['std'], spec)}"


def _steps_cell(row: Mapping[str, Any]) -> str:
    if not row["reached_target"]:
        return "never"
    cell = _pm(row["steps_to_target"], ",.0f")
    return cell if row["reached_target"] == row["runs"] else f"{cell} ({row['reached_target']} of {row['runs']} runs)"


def _outcome(row: Mapping[str, Any]) -> str:
    parts = []
    if row["diverged"]:
        steps = ", ".join(f"{s:,}" for s in row["diverged_at_steps"])
        parts.append(f"{row['diverged']} of {row['runs']} diverged (steps {steps})")
    if row["did_not_learn"]:
        parts.append(f"{row['did_not_learn']} of {row['runs']} did not learn (max < {2 * row['chance']:.0%}, "
                     "2x chance)")
    if row["finished"] < row["runs"]:
        parts.append(f"{row['runs'] - row['finished']} of {row['runs']} unfinished")
    return "; ".join(parts) or "trained"


def _relative(row: Mapping[str, Any], reference: Mapping[str, Any]) -> list[str]:
    """Steps to target as a multiple of the reference's, and max accuracy minus the reference's."""
    steps, ref_steps = row["steps_to_target"]["mean"], reference["steps_to_target"]["mean"]
    best, ref_best = row["max_accuracy"]["mean"], reference["max_accuracy"]["mean"]
    return [NONE if steps is None or not ref_steps else f"x{steps / ref_steps:.2f}",
            NONE if best is None or ref_best is None else f"{100 * (best - ref_best):+.2f} pts"]


def rows_markdown(rows: Sequence[Mapping[str, Any]], target: float, label: str = "run",
                  reference: Mapping[str, Any] | None = None) -> str:
    """The rows as a Markdown table: steps to ``target`` and accuracies, mean ± std over seeds;
    with a ``reference`` row, also each row's steps to target and max accuracy relative to it."""
    headers = [label, "initial lr", "seeds", f"steps to {target:.2%}", "max accuracy", "final, Algorithm 2",
               "outcome"]
    if reference is not None:
        headers[5:5] = [f"steps vs {reference['label']}", f"max vs {reference['label']}"]
    lines = []
    for r in rows:
        line = [r["label"], f"{r['learning_rate']:g}", str(r["runs"]), _steps_cell(r), _pm(r["max_accuracy"], ".2%"),
                _pm(r["final_accuracy_population_stats"], ".2%"), _outcome(r)]
        if reference is not None:
            line[5:5] = _relative(r, reference)
        lines.append(line)
    return markdown_table((headers, lines))


def figure3(groups: Mapping[str, Sequence[RunRecord]], reference: str = REFERENCE) -> dict[str, Any]:
    """Figure 3 from the runs: one row per variant (the paper's order first),
    with the paper's numbers beside ours."""
    target = reference_accuracy(groups, reference)
    order = [v for v in PAPER_FIGURE3 if v in groups] + sorted(v for v in groups if v not in PAPER_FIGURE3)
    rows = [{**group_row(v, groups[v], target), "paper": PAPER_FIGURE3.get(v)} for v in order]
    return {"reference": reference, "target_accuracy": target, "accuracy_key": groups[reference][0].accuracy_key,
            "rows": rows}


def figure3_markdown(table: Mapping[str, Any]) -> str:
    """Figure 3 as Markdown: our columns (mean ± std over seeds), then the paper's."""
    target = table["target_accuracy"]
    headers = ["variant", "initial lr", "seeds", f"steps to {target:.2%} (Inception's best)", "max accuracy",
               "final, Algorithm 2", "outcome", "paper: initial lr", "paper: steps to 72.2%", "paper: max top-1"]
    lines = []
    for r in table["rows"]:
        paper = r["paper"] or {}
        if "result" in paper:
            paper_steps, paper_max = paper["result"], NONE
        else:
            steps = paper.get("steps_to_target")
            paper_steps = NONE if not paper else ("never" if steps is None else f"{steps / 1e6:.1f}e6")
            paper_max = f"{paper['max_accuracy']:.1%}" if paper else NONE
        lines.append([r["label"], f"{r['learning_rate']:g}", str(r["runs"]), _steps_cell(r),
                      _pm(r["max_accuracy"], ".2%"), _pm(r["final_accuracy_population_stats"], ".2%"), _outcome(r),
                      f"{paper['learning_rate']:g}" if paper else NONE, paper_steps, paper_max])
    return markdown_table((headers, lines))


def _mean_curve(runs: Sequence[RunRecord], x: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x (steps or mean wall time), mean, min and max accuracy over the runs, at
    every step all the runs that got that far evaluated."""
    curves = [evaluation_curve(run) for run in runs]
    steps = sorted(set().union(*(set(c[0].tolist()) for c in curves)))
    xs, means, lows, highs = [], [], [], []
    for step in steps:
        values = [(c[1][c[0] == step][0], c[2][c[0] == step][0]) for c in curves if step in c[0]]
        accuracy = [a for a, _ in values]
        xs.append(step if x == "steps" else statistics.fmean(w for _, w in values))
        means.append(statistics.fmean(accuracy))
        lows.append(min(accuracy))
        highs.append(max(accuracy))
    return tuple(np.array(v) for v in (xs, means, lows, highs))


def plot_accuracy_curves(groups: Mapping[str, Sequence[RunRecord]], labels: Sequence[str], target: float,
                         path: str, x: str = "steps", title: str = "") -> None:
    """Figure 2's look: accuracy vs training steps (or wall time, ``x='wall_time'``)
    for each label, the mean over seeds with a min-max band, and a marker where
    the mean first reaches ``target`` (Inception's best), the dashed line."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in labels:
        if not groups.get(label):
            continue
        xs, mean, low, high = _mean_curve(groups[label], x)
        (line,) = ax.plot(xs, mean, label=f"{label} ({len(groups[label])} seeds)")
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        reached = np.nonzero(mean >= target)[0]
        if reached.size:
            ax.plot(xs[reached[0]], mean[reached[0]], "o", color=line.get_color(), markersize=7)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"Inception's best ({target:.2%})")
    ax.set_xlabel("training steps" if x == "steps" else "wall time (s)")
    ax.set_ylabel("test accuracy" if groups[labels[0]][0].config.get("data", {}).get("eval_split") == "test"
                  else "validation accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if x == "steps":
        ax.ticklabel_format(axis="x", style="sci", scilimits=(3, 3))
    fig.tight_layout()
    for extension in (".png", ".pdf"):
        fig.savefig(os.path.splitext(path)[0] + extension, dpi=120)
    plt.close(fig)


def plot_lr_sweep(series: Mapping[str, Sequence[tuple[float, Mapping[str, Any]]]], target: float, path: str) -> None:
    """Max accuracy (mean with min-max bars over seeds) against the learning-rate
    multiplier, one line per net; a cross where every seed diverged."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, points in series.items():
        ms = [m for m, _ in points]
        best = [[b for b in row["max_accuracy_each"] if b is not None] for _, row in points]
        mean = [statistics.fmean(b) if b else math.nan for b in best]
        # max(0, .): the mean of equal values can round above them.
        err = [[max(0.0, m - min(b)) if b else 0 for m, b in zip(mean, best)],
               [max(0.0, max(b) - m) if b else 0 for m, b in zip(mean, best)]]
        container = ax.errorbar(ms, mean, yerr=err, marker="o", capsize=3, label=name)
        color = container[0].get_color()
        for m, (_, row) in zip(ms, points):
            if row["diverged"] == row["runs"]:
                ax.plot(m, 0.1, "x", color=color, markersize=9)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"Inception's best ({target:.2%})")
    ax.set_xscale("log")
    ax.set_xlabel("learning-rate multiplier (× the base rate)")
    ax.set_ylabel("max test accuracy (x: all seeds diverged)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

