"""Figure 4's multi-crop and ensemble evaluation (bn_repro.ensemble, Sec. 4.2.3).

The bn_x5:small run of the shared mock ImageNet runs (``imagenet_runs``,
trained through the entry point's training on TFDS's mock imagenet2012:
checkpoints at steps 2 and 4, then the final model with population statistics)
is evaluated here under the same mock, whose examples are a function of split
and index, so on the data its training evaluated. A second ensemble member is
a copy of that run with its final model's parameters perturbed (training a
second network would double the test's time).
"""

import dataclasses
import json
import math
import os
import runpy
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bn_repro import checkpoints, ensemble, imagenet_data, imagenet_preprocessing
from bn_repro import image_data, run_records
from conftest import subprocess_env

from mock_imagenet_runs import NUM_EXAMPLES, REPO  # batches of 8 (the last padded) or 3 (144 crops)

MOCK_SCRIPT = os.path.join(REPO, "tests", "mock_imagenet_script.py")
ENV = subprocess_env()  # (XLA at a low optimisation level: conftest.py)


def run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def workdirs(imagenet_runs, tmp_path_factory) -> dict[str, str]:
    """"a": a copy of the bn_x5 run; "b": a's copy, final parameters perturbed."""
    if imagenet_runs["errors"]["bn_x5"] is not None:
        raise imagenet_runs["errors"]["bn_x5"]
    root = tmp_path_factory.mktemp("ensemble_runs")
    a, b = str(root / "a"), str(root / "b")
    shutil.copytree(imagenet_runs["root"] / "bn_x5", a)
    shutil.copytree(a, b)
    variables = ensemble.load_trained_model(b).variables
    leaves, treedef = jax.tree.flatten(variables["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.unflatten(treedef, [x * (1 + 0.3 * rng.standard_normal(x.shape, np.float32)) for x in leaves])
    checkpoints.save_final_model(b, {**variables, "params": params})
    return {"a": a, "b": b}


@pytest.fixture(scope="module")
def mock_imagenet():
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


@pytest.fixture(scope="module")
def runs(workdirs, mock_imagenet) -> dict[str, ensemble.TrainedModel]:
    return {name: ensemble.load_trained_model(path) for name, path in workdirs.items()}


def probabilities(runs, crops=1, **kwargs):
    return ensemble.probabilities(runs, crops=crops, num_workers=0, **kwargs)


def test_central_crop_reproduces_the_runs_own_evaluation(workdirs, runs):
    """The final model is the population-statistics model: one crop gives exactly
    the after-training evaluation; the step-2 checkpoint (moving averages) the step-2 one.
    (The mock's random labels leave top-1/top-5 near 0; the loss pins the probabilities.)"""
    records = run_records.read_metrics(os.path.join(workdirs["a"], "metrics.jsonl"))
    final = ensemble.evaluate([runs["a"]], crops=1, num_workers=0)
    after = next(r for r in records if r.get(run_records.AFTER_TRAINING))
    assert final["top1"] == after["val_top1_population_stats"]
    assert final["top5"] == after["val_top5_population_stats"]
    assert final["loss"] == pytest.approx(after["val_loss_population_stats"], rel=1e-5)
    assert (final["num_examples"], final["crops"], final["models"], final["steps"]) == (NUM_EXAMPLES, 1, 1, [None])
    at_step_2 = ensemble.evaluate([ensemble.load_trained_model(workdirs["a"], step=2)], crops=1, num_workers=0)
    during = next(r for r in records if r.get("step") == 2 and "val_loss" in r)
    assert (at_step_2["top1"], at_step_2["top5"]) == (during["val_top1"], during["val_top5"])
    assert at_step_2["loss"] == pytest.approx(during["val_loss"], rel=1e-5)
    assert at_step_2["loss"] != pytest.approx(final["loss"], rel=1e-3)  # Different BN statistics.


def test_one_run_gives_the_softmax_of_its_logits_on_each_central_crop(runs):
    """Against the network applied here to each example's own central crop."""
    alone, labels = probabilities([runs["a"]])
    source = imagenet_data.open_split("validation", None)
    size, fraction = runs["a"].config.data.image_size, runs["a"].config.data.crop_fraction
    images = np.stack([imagenet_preprocessing.eval_image(source[i]["image"], size, fraction)
                       for i in range(NUM_EXAMPLES)])
    apply = jax.jit(runs["a"].model.apply, static_argnames="train")
    logits = np.asarray(apply(runs["a"].variables, images, train=False), np.float64)
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(alone, expected / expected.sum(axis=1, keepdims=True), rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(labels, [source[i]["label"] for i in range(NUM_EXAMPLES)])
    twice, _ = probabilities([runs["a"], runs["a"]])
    np.testing.assert_allclose(twice, alone, rtol=1e-6)


def test_two_run_ensemble_averages_the_probabilities(runs):
    p_a, labels = probabilities([runs["a"]])
    p_b, _ = probabilities([runs["b"]])
    p_ab, labels_ab = probabilities([runs["a"], runs["b"]])
    assert not np.allclose(p_a, p_b, rtol=1e-3)  # b's parameters are perturbed: a different network.
    np.testing.assert_allclose(p_ab, (p_a + p_b) / 2, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(labels_ab, labels)
    # evaluate() scores those probabilities.
    results = ensemble.evaluate([runs["a"], runs["b"]], crops=1, num_workers=0)
    expected = ensemble.classification_metrics(p_ab, labels)
    assert {k: results[k] for k in expected} == pytest.approx(expected)
    assert results["models"] == 2 and results["workdirs"] == [runs["a"].workdir, runs["b"].workdir]


def test_144_crops_count_every_example_once(runs):
    source = imagenet_data.open_split("validation", None)
    labels = np.array([source[i]["label"] for i in range(NUM_EXAMPLES)])
    central, _ = probabilities([runs["a"]])
    multi, multi_labels = probabilities([runs["a"]], crops=144, batch_size=3)  # 7 batches, the last padded.
    assert multi.shape == (NUM_EXAMPLES, 1000)
    np.testing.assert_array_equal(multi_labels, labels)
    np.testing.assert_allclose(multi.sum(axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(multi, central, rtol=1e-3)
    # Example 5 alone equals its row: the mean of its 144 crops' softmax.
    crops = image_data.eval_batches(source, crops=144, image_size=32, crop_fraction=0.875,
                                       global_batch_size=NUM_EXAMPLES, num_workers=0)
    batch = next(iter(crops))
    assert batch["image"].shape == (NUM_EXAMPLES, 144, 32, 32, 3) and batch["mask"].all()
    row = ensemble.crop_probabilities(runs["a"].model, runs["a"].variables, batch["image"][5:6])
    np.testing.assert_allclose(np.asarray(row)[0], multi[5], rtol=1e-4, atol=1e-9)


def test_classification_metrics():
    probs = np.full((4, 10), 0.05, np.float32)
    probs[0, 3] = probs[1, 7] = 0.55  # Examples 0 and 1: top-1 class 3, 7; the rest ties at 0.05.
    probs[2] = probs[3] = 0.1  # All tied: top-5 is classes 0..4 (lower index first, as lax.top_k).
    labels = np.array([3, 2, 4, 5])
    results = ensemble.classification_metrics(probs, labels)
    assert results["top1"] == 0.25 and results["top1_error"] == 0.75
    assert results["top5"] == 0.75 and results["top5_error"] == pytest.approx(0.25)  # 1 in 0..4 after 7; 4; not 5.
    assert results["loss"] == pytest.approx(-(math.log(0.55) + math.log(0.05) + 2 * math.log(0.1)) / 4, rel=1e-6)


def test_errors_name_the_problem(workdirs, runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ensemble.load_trained_model(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 3 .*\[2, 4\]"):
        ensemble.load_trained_model(workdirs["a"], step=3)
    other = dataclasses.replace(runs["b"], config=runs["b"].config.copy_and_resolve_references())
    other.config.model.num_classes = 10
    with pytest.raises(ValueError, match="model.num_classes"):
        probabilities([runs["a"], other])
    with pytest.raises(ValueError, match="crops"):
        probabilities([runs["a"]], crops=10)


def test_scripts_run_end_to_end(workdirs, runs, tmp_path, monkeypatch):
    """The ensemble script in a subprocess under the mock, with grain worker
    processes; the single-network script in this process (already under the mock)."""
    output = tmp_path / "ensemble.json"
    result = run([sys.executable, MOCK_SCRIPT, str(NUM_EXAMPLES), "scripts/evaluate_ensemble.py",
                  f"--workdir={workdirs['a']}", f"--workdir={workdirs['b']}", "--crops=1", "--num_workers=2",
                  f"--output={output}"])
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[:5]] == ["top1", "top1_error", "top5", "top5_error", "loss"]
    written = json.loads(output.read_text())
    expected = ensemble.evaluate([runs["a"], runs["b"]], crops=1, num_workers=0)
    assert written["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert written["workdirs"] == expected["workdirs"] and written["models"] == 2
    assert written["command"].startswith("python scripts/evaluate_ensemble.py --workdir=")

    output = tmp_path / "multicrop.json"
    monkeypatch.setattr(sys, "argv", ["scripts/evaluate_multicrop.py", f"--workdir={workdirs['a']}", "--step=2",
                                      "--crops=1", "--num_workers=0", f"--output={output}"])
    monkeypatch.setattr(sys, "path", list(sys.path))
    runpy.run_path(os.path.join(REPO, "scripts", "evaluate_multicrop.py"), run_name="__main__")
    written = json.loads(output.read_text())
    records = run_records.read_metrics(os.path.join(workdirs["a"], "metrics.jsonl"))
    during = next(r for r in records if r.get("step") == 2 and "val_loss" in r)
    assert written["steps"] == [2] and written["loss"] == pytest.approx(during["val_loss"], rel=1e-5)


def test_runs_on_other_datasets_or_channel_counts_are_not_ensembled():
    import ml_collections

    def run(path, **data):
        config = ml_collections.ConfigDict({"data": {"dataset": "imagenet2012", "image_size": 32, "channels": 3,
                                                     "crop_fraction": 0.875, **data}, "model": {"num_classes": 10}})
        return ensemble.TrainedModel(path, None, config, None, None)

    ensemble.check_compatible([run("a"), run("b")], crops=1)
    legacy = run("c")
    del legacy.config.data["channels"]  # written before data.channels existed: 3 channels
    ensemble.check_compatible([run("a"), legacy], crops=1)
    with pytest.raises(ValueError, match="config.data.channels"):
        ensemble.check_compatible([run("a"), run("b", channels=1)], crops=144)
    with pytest.raises(ValueError, match="config.data.dataset"):
        ensemble.check_compatible([run("a"), run("b", dataset="fashion_mnist")], crops=144)
