"""The ImageNet experiments train through the real training path and pipeline.

The runs (``tests/mock_imagenet_runs.py``, the session fixture ``imagenet_runs``)
train ``:small`` variants on TFDS's mock imagenet2012 through the entry point's
training, in two processes side by side; a copy of one is interrupted and
resumed through the entry point itself.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_repro import checkpoints, main, run_records, train
from conftest import assert_resumed_from, metrics_lines
from mock_imagenet_runs import CONFIG, NUM_EXAMPLES, RESUMED, RESUMED_FROM
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

