"""The ImageNet experiments train through the real training path and pipeline.

The runs (``tests/mock_imagenet_runs.py``, the session fixture ``imagenet_runs``)
train ``:small`` variants on TFDS's mock imagenet2012 through the entry point's
training, in two processes side by side; a copy of one is interrupted and
resumed through the entry point itself.
"""

import functools
import json
import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_repro import checkpoints, classification_experiment, fashion_mnist_data, main, run_records, train
from conftest import assert_resumed_from, metrics_lines
from mock_imagenet_runs import CONFIG, NUM_EXAMPLES, RESUMED, RESUMED_FROM
from test_fashion_mnist_data import synthetic_files
from test_models import traced_equations
from test_train import deterministic

TRAINED = ("bn_baseline", "bn_x5", "inception", "googlenet")


def load_run(imagenet_runs, name: str) -> tuple[list[dict], dict, dict]:
    if imagenet_runs["errors"][name] is not None:
        raise imagenet_runs["errors"][name]
    workdir = imagenet_runs["root"] / name
    summary = json.loads((workdir / "summary.json").read_text())
    config = json.loads((workdir / "config.json").read_text())
    return run_records.read_metrics(str(workdir / "metrics.jsonl")), summary, config


def final_model(imagenet_runs, name: str) -> dict:
    return checkpoints.load_final_model(str(imagenet_runs["root"] / name))


@pytest.mark.parametrize("name", TRAINED)
def test_run_trains_evaluates_and_saves_its_final_model(imagenet_runs, name):
    records, summary, config = load_run(imagenet_runs, name)
    evaluations = [r for r in records if "val_top1" in r]
    assert [r["step"] for r in evaluations] == [2, 4]
    for r in evaluations:
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"])
        assert 0.0 <= r["val_top1"] <= r["val_top5"] <= 1.0
        # Every one of the 20 validation examples counted once (the padded
        # slots of the last batch of 8 are not): accuracies are k/20.
        assert r["val_top5"] * NUM_EXAMPLES == pytest.approx(round(r["val_top5"] * NUM_EXAMPLES))
    assert "diverged" not in summary
    assert summary["final_val_top1"] == evaluations[-1]["val_top1"]
    assert summary["environment"]["command"].startswith("python -m bn_repro.main")
    variables = final_model(imagenet_runs, name)
    after = [r for r in records if r.get(run_records.AFTER_TRAINING)]
    if config["model"]["use_bn"]:  # Algorithm 2 before the final evaluation, saved with the model.
        assert len(after) == 1 and math.isfinite(after[0]["val_loss_population_stats"])
        assert summary["final_val_top1_population_stats"] == after[0]["val_top1_population_stats"]
        assert jax.tree.leaves(variables["batch_stats"])
    else:
        assert after == [] and not jax.tree.leaves(variables.get("batch_stats", {}))


def test_googlenet_trains_with_its_auxiliary_classifiers(imagenet_runs):
    _, _, config = load_run(imagenet_runs, "googlenet")
    assert config["model"]["architecture"] == "googlenet" and config["model"]["aux_heads"] is True
    params = final_model(imagenet_runs, "googlenet")["params"]
    assert {"aux_4a", "aux_4d"} <= set(params)


def test_inception_x5_diverges_and_is_recorded(imagenet_runs):
    records, summary, _ = load_run(imagenet_runs, "diverging")
    assert records[-1]["diverged"] is True
    assert summary["diverged"] is True and summary["diverged_at_step"] == records[-1]["step"] <= 20
    assert not (imagenet_runs["root"] / "diverging" / "final_model").exists()


def test_resume_continues_from_the_checkpoint_and_gives_the_same_run(imagenet_runs):
    """bn_baseline has dropout (0.4): equal losses after the resume also mean
    the resumed steps drew the masks the uninterrupted run drew."""
    records, summary, config = load_run(imagenet_runs, RESUMED)
    reference, reference_summary, _ = load_run(imagenet_runs, RESUMED_FROM)
    assert config["model"]["dropout_rate"] > 0
    workdir = imagenet_runs["root"] / RESUMED
    before = (workdir / "metrics_before_resume.jsonl").read_text().splitlines()
    assert_resumed_from(workdir, before, checkpoint_step=2)
    assert deterministic(records) == deterministic(reference)
    assert summary["final_val_top1_population_stats"] == reference_summary["final_val_top1_population_stats"]
    for a, b in zip(jax.tree.leaves(final_model(imagenet_runs, RESUMED)),
                    jax.tree.leaves(final_model(imagenet_runs, RESUMED_FROM))):
        np.testing.assert_array_equal(a, b)
    assert len(metrics_lines(workdir)) == len(reference)  # no line written twice


def test_bfloat16_step_computes_in_bfloat16_and_keeps_float32_parameters_and_statistics():
    """Traced, not run: the training step of bn_x5:small with model.dtype=bfloat16."""
    config = main.load_config(f"{CONFIG}:bn_x5:small", ["--config.model.dtype=bfloat16"])
    setup = train.create_setup(config)
    size = config.data.image_size
    state = jax.eval_shape(lambda: train.create_train_state(jax.random.PRNGKey(0), config, setup.model,
                                                            (size, size, 3), 10))
    batch = {"image": jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)}
    step = lambda state, batch: train.train_step(state, batch)  # noqa: E731
    new_state, step_metrics = jax.eval_shape(step, state, batch)
    for tree in (new_state.params, new_state.batch_stats, state.params, state.batch_stats):
        assert tree and all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(tree))
    assert step_metrics["loss"].dtype == jnp.float32
    jaxpr = jax.make_jaxpr(step)(state, batch)
    conv_dtypes = {eqn.invars[0].aval.dtype for _, eqn in traced_equations(jaxpr.jaxpr)
                   if eqn.primitive.name == "conv_general_dilated"}
    assert conv_dtypes == {jnp.dtype(jnp.bfloat16)}



def test_sigterm_on_the_streamed_path_stops_after_the_current_step_and_the_resume_matches(tmp_path, monkeypatch):
    """The streamed (grain) path asks before every step: SIGTERM during step 7 (mid-way through the chunk of
    steps 6-10 between progress lines) stops the run after step 7, with a checkpoint there; the resumed run
    trains steps 8-12 only and ends with an uninterrupted run's metrics and final model (Algorithm 2 included)."""
    _, checksums = synthetic_files(tmp_path / "data" / "downloads" / "manual")
    data_dir = fashion_mnist_data.prepare_fashion_mnist(str(tmp_path / "data"), expected=checksums)
    config = main.load_config(f"{CONFIG}:bn_x5:fashion", [
        f"--config.data.data_dir={data_dir}", "--config.model.width=0.0625", "--config.data.image_size=32",
        "--config.batch_size=8", "--config.bn.virtual_batch_size=4", "--config.eval_batch_size=4",
        "--config.bn.population_batches=3", "--config.num_steps=12", "--config.eval_every=4",
        "--config.checkpoint_every=12", "--config.log_every=5", "--config.eval_at=()",
    ])
    train.train_and_evaluate(config, str(tmp_path / "uninterrupted"))

    make, steps = classification_experiment.make_streamed_step, []

    def signalling(*args, signal_at=None):
        step_fn = make(*args)

        def step(state, batch, rng):
            steps.append(len(steps) + 1)
            if len(steps) == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return step_fn(state, batch, rng)

        return step

    workdir = tmp_path / "preempted"
    monkeypatch.setattr(classification_experiment, "make_streamed_step", functools.partial(signalling, signal_at=7))
    assert train.train_and_evaluate(config, str(workdir)) == {"variant": config.variant, "preempted_at_step": 7}
    assert steps == list(range(1, 8))
    assert [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()] == [7]
    assert not (workdir / "summary.json").exists()

    steps.clear()
    monkeypatch.setattr(classification_experiment, "make_streamed_step", signalling)
    summary = train.train_and_evaluate(config, str(workdir))
    assert len(steps) == 5  # steps 8-12
    want, got = (deterministic(run_records.read_metrics(str(d / "metrics.jsonl")))
                 for d in (tmp_path / "uninterrupted", workdir))
    assert got == want and [r["step"] for r in got] == [4, 8, 12, 12]
    reference = json.loads((tmp_path / "uninterrupted" / "summary.json").read_text())
    assert summary["final_val_top1_population_stats"] == reference["final_val_top1_population_stats"]
