"""Figures of the paper regenerated from runs' ``metrics.jsonl`` records."""

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bn_repro.run_records import AFTER_TRAINING  # noqa: E402

PERCENTILE_KEYS = ("sigmoid_input_p15", "sigmoid_input_p50", "sigmoid_input_p85")


def _series(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r and not r.get(AFTER_TRAINING)]
    return [s for s, _ in points], [v for _, v in points]


def plot_figure1(baseline: Sequence[dict], bn: Sequence[dict], path: str) -> None:
    """Figure 1 (Sec. 4.1): (a) test accuracy of both nets vs steps; (b) without
    BN and (c) with BN, the 15th/50th/85th percentiles of the input to one
    sigmoid of the last hidden layer over training."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    for records, label, style in ((baseline, "Without BN", "--"), (bn, "With BN", "-")):
        steps, accuracy = _series(records, "test_accuracy")
        ax.plot(steps, accuracy, style, label=label)
    ax.set_ylim(0.7, 1.0)
    ax.set_xlabel("training steps")
    ax.set_ylabel("test accuracy")
    ax.set_title("(a)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(3, 3))

    lows, highs = [], []
    for ax, records, title in ((axes[1], baseline, "(b) without BN"), (axes[2], bn, "(c) with BN")):
        for key in PERCENTILE_KEYS:
            steps, values = _series(records, key)
            ax.plot(steps, values, color="tab:blue")
            lows.append(min(values, default=0.0))
            highs.append(max(values, default=0.0))
        ax.set_xlabel("training steps")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(3, 3))
    axes[1].set_ylabel("sigmoid input: 15th/50th/85th percentile")
    # Shared y range so that (b) and (c) compare directly, as in the paper.
    span = (min(lows + [-2.0]) - 0.1, max(highs + [2.0]) + 0.1)
    axes[1].set_ylim(*span)
    axes[2].set_ylim(*span)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
