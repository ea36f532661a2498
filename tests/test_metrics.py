"""The numbers the README's tables and summary.json are made of: accuracy
summaries of a run's records (bn_repro/metrics.py) and the Figure 1 checks of
scripts/reproduce_figure1.py, on hand-built records whose answers are known."""

import math
import os
import runpy

import pytest

from bn_repro import metrics
from bn_repro.run_records import AFTER_TRAINING

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURE1 = runpy.run_path(os.path.join(REPO, "scripts", "reproduce_figure1.py"))
figure1_checks, percentile_drift = FIGURE1["figure1_checks"], FIGURE1["percentile_drift"]

KEY = "test_accuracy"
# A run as train_and_evaluate records it: evaluations every 100 steps, then the
# final model with population statistics (Algorithm 2) after training.
RUN = [
    {"step": 100, "train_loss": 2.1, KEY: 0.50, "test_loss": 1.9, "wall_time_s": 1.0},
    {"step": 200, "train_loss": 1.2, KEY: 0.80, "test_loss": 0.9},
    {"step": 300, "train_loss": 0.5, KEY: 0.95, "test_loss": 0.3},
    {"step": 400, "train_loss": 0.4, KEY: 0.93, "test_loss": 0.4},
    {"step": 500, "train_loss": 0.3, KEY: 0.95, "test_loss": 0.3},
    {"step": 500, AFTER_TRAINING: True, f"{KEY}_population_stats": 0.99, "test_loss_population_stats": 0.1},
]


def test_summary_of_a_run():
    """Final and best accuracy (the earliest step of the best), the accuracy at
    each milestone step, the first step reaching each target."""
    summary = metrics.summarize_accuracy(RUN, KEY, milestones=(200, 250, 500, 1000), targets=(0.5, 0.8, 0.94, 0.96))
    assert summary == {
        "final_step": 500,
        "final_test_accuracy": 0.95,
        "best_test_accuracy": 0.95,
        "best_step": 300,  # 0.95 again at 500: the first time counts
        # 250: no evaluation at that step; 1000: beyond the run
        "test_accuracy_at": {"200": 0.80, "250": None, "500": 0.95, "1000": None},
        "steps_to": {"0.5": 100, "0.8": 200, "0.94": 300, "0.96": None},  # reached exactly counts; 0.96 never
    }


def test_records_after_training_and_without_accuracy_change_nothing():
    """The population-statistics record after training (0.99, above every
    evaluation) is not an evaluation of training; a divergence record has no accuracy."""
    training_only = [r for r in RUN if not r.get(AFTER_TRAINING)]
    args = dict(key=KEY, milestones=(500,), targets=(0.97,))
    assert metrics.summarize_accuracy(RUN, **args) == metrics.summarize_accuracy(training_only, **args)
    assert metrics.summarize_accuracy(RUN, **args)["steps_to"] == {"0.97": None}
    # Even if an after-training record carried the evaluation's own key.
    relabelled = RUN + [{"step": 500, AFTER_TRAINING: True, KEY: 0.99}]
    assert metrics.summarize_accuracy(relabelled, **args) == metrics.summarize_accuracy(training_only, **args)
    diverged = RUN[:3] + [{"step": 357, "diverged": True}]
    summary = metrics.summarize_accuracy(diverged, KEY, milestones=(300, 357), targets=(0.9,))
    assert summary["final_step"] == 300 and summary["final_test_accuracy"] == 0.95
    assert summary["test_accuracy_at"] == {"300": 0.95, "357": None} and summary["steps_to"] == {"0.9": 300}


def test_no_evaluation_gives_an_empty_summary():
    assert metrics.summarize_accuracy([], KEY, (100,), (0.5,)) == {}
    assert metrics.summarize_accuracy([{"step": 1, "diverged": True}], KEY, (100,), (0.5,)) == {}


def test_target_keys_as_the_config_writes_them():
    """configs/imagenet.py's targets (Figure 3's accuracies) keep their digits."""
    records = [{"step": s, "val_top1": a} for s, a in [(1_000_000, 0.70), (2_000_000, 0.7225), (3_000_000, 0.749)]]
    summary = metrics.summarize_accuracy(records, "val_top1", (2_000_000,), (0.698, 0.722, 0.727, 0.748, 0.75))
    assert summary["steps_to"] == {"0.698": 1_000_000, "0.722": 2_000_000, "0.727": 3_000_000, "0.748": 3_000_000,
                                   "0.75": None}
    assert summary["val_top1_at"] == {"2000000": 0.7225}


def test_final_and_best_of_a_secondary_accuracy():
    records = [{"step": 1, "val_top5": 0.5}, {"step": 2, "val_top1": 0.3}, {"step": 3, "val_top5": 0.9},
               {"step": 4, "val_top5": 0.85}, {"step": 4, AFTER_TRAINING: True, "val_top5_population_stats": 0.95}]
    assert metrics.final_and_best(records, "val_top5") == {"final_val_top5": 0.85, "best_val_top5": 0.9}
    assert metrics.final_and_best(records, "val_top2") == {}


@pytest.mark.parametrize("values, index", [
    ([0.5, 0.4, math.nan, 0.3], 2), ([1.0, math.inf], 1), ([-math.inf, math.nan], 0), ([0.1, 1e38], None), ([], None),
])
def test_first_non_finite(values, index):
    assert metrics.first_non_finite(values) == index


def evaluations(points, percentiles=None):
    """Records of evaluations at (step, accuracy), optionally with the tracked sigmoid input's percentiles."""
    out = []
    for i, (step, accuracy) in enumerate(points):
        record = {"step": step, KEY: accuracy}
        if percentiles is not None:
            p15, p50, p85 = percentiles[i]
            record.update(sigmoid_input_p15=p15, sigmoid_input_p50=p50, sigmoid_input_p85=p85)
        out.append(record)
    return out


BASELINE = evaluations([(500, 0.60), (1000, 0.80), (1500, 0.90), (2000, 0.95)])
ABOVE = "bn_above_baseline_at_every_evaluation_from_1k_steps"
FINAL = "bn_final_test_accuracy_at_least_0.98"


@pytest.mark.parametrize("bn_points, above", [
    ([(500, 0.50), (1000, 0.90), (1500, 0.95), (2000, 0.98)], True),  # below before 1k steps: not checked
    ([(500, 0.90), (1000, 0.90), (1500, 0.89), (2000, 0.98)], False),  # below at one evaluation
    ([(500, 0.90), (1000, 0.80), (1500, 0.95), (2000, 0.98)], False),  # equal at 1k steps is not above
    ([(500, 0.90), (900, 0.95)], False),  # no evaluation from 1k steps in common: nothing shown
])
def test_figure1_check_bn_above_the_baseline(bn_points, above):
    """Figure 1(a): the BN net is above the baseline at every evaluation from 1k steps on."""
    bn = evaluations(bn_points) + [{"step": 2000, AFTER_TRAINING: True, f"{KEY}_population_stats": 0.5}]
    assert figure1_checks(BASELINE, bn, {"final_test_accuracy": 0.99})[ABOVE] is above


def test_figure1_check_compares_only_common_steps():
    bn = evaluations([(1000, 0.81), (1250, 0.10), (1500, 0.91)])  # 1250: no baseline evaluation there
    assert figure1_checks(BASELINE, bn, {})[ABOVE] is True
    assert figure1_checks(BASELINE[:2], evaluations([(1000, 0.79)]), {})[ABOVE] is False


@pytest.mark.parametrize("summary, ok", [
    ({"final_test_accuracy": 0.98}, True), ({"final_test_accuracy": 0.9912}, True),
    ({"final_test_accuracy": 0.9799}, False), ({}, False),
])
def test_figure1_check_bn_final_accuracy(summary, ok):
    """The BN net's final test accuracy is at least 0.98 (the paper's Figure 1(a))."""
    assert figure1_checks(BASELINE, BASELINE, summary)[FINAL] is ok


def test_percentile_drift():
    """Figure 1(b, c): the percentiles at the first evaluation, at 1k steps and at
    the end, and how far the median moves from 1k steps on."""
    records = evaluations(
        [(500, 0.5), (1000, 0.8), (1500, 0.9), (2000, 0.95)],
        [(-1.0, 0.90, 1.0), (-0.9, 0.30, 1.1), (-1.2, -0.20, 0.7), (-0.8, 0.25, 1.2)],
    )
    records.insert(2, {"step": 1200, "train_loss": 0.3})  # no percentiles: not an evaluation
    records.append({"step": 2000, AFTER_TRAINING: True, f"{KEY}_population_stats": 0.97})
    assert percentile_drift(records) == {
        "first_evaluation": {"step": 500, "p15": -1.0, "p50": 0.90, "p85": 1.0},
        "at_1k_steps": {"step": 1000, "p15": -0.9, "p50": 0.30, "p85": 1.1},
        "final": {"step": 2000, "p15": -0.8, "p50": 0.25, "p85": 1.2},
        "median_range_from_1k_steps": pytest.approx(0.50),  # 0.30 - (-0.20); 0.90 at 500 steps not counted
    }


def test_percentile_drift_of_a_run_shorter_than_1k_steps():
    records = evaluations([(200, 0.5), (400, 0.6)], [(-1.0, 0.0, 1.0), (-2.0, 0.5, 2.0)])
    drift = percentile_drift(records)
    assert drift["at_1k_steps"] == drift["final"] == {"step": 400, "p15": -2.0, "p50": 0.5, "p85": 2.0}
    assert drift["median_range_from_1k_steps"] == 0.0
