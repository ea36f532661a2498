"""The real training loop, run for a few hundred steps on a small generated MNIST."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bn_repro import checkpoints, train
from bn_repro import mnist_experiment, run_records
from bn_repro.main import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "mnist.py")


def small_config(data_dir: str, variant: str = "bn", **overrides):
    fields = {
        "num_steps": 300,
        "eval_every": 50,
        "checkpoint_every": 100,
        "bn.population_batches": 20,
        "data.data_dir": data_dir,
        "data.verify_checksums": False,  # A generated copy, not the real MNIST.
        **overrides,
    }
    return load_config(f"{CONFIG}:{variant}", [f"--config.{k}={v}" for k, v in fields.items()])


def deterministic(records):
    return [{k: v for k, v in r.items() if k not in run_records.TIMING_KEYS} for r in records]


class Interrupted(Exception):
    pass


def train_interrupted_after(config, workdir, step: int, monkeypatch) -> None:
    """Runs ``config`` in ``workdir`` and stops it right after the metrics of ``step`` are written."""
    append = run_records.append_metrics

    def append_then_interrupt(path, record):
        append(path, record)
        if record["step"] == step:
            raise Interrupted

    monkeypatch.setattr(run_records, "append_metrics", append_then_interrupt)
    with pytest.raises(Interrupted):
        train.train_and_evaluate(config, str(workdir))
    monkeypatch.setattr(run_records, "append_metrics", append)


@pytest.mark.parametrize("variant", ["bn", "baseline"])
def test_resume_after_interruption_gives_identical_metrics(small_mnist_dir, tmp_path, monkeypatch, variant):
    config = small_config(small_mnist_dir, variant)
    uninterrupted = tmp_path / "uninterrupted"
    train.train_and_evaluate(config, str(uninterrupted))

    # Interrupt right after the evaluation at step 250 is written: the last
    # checkpoint is at 200, so the resumed run redoes steps 201-300.
    resumed = tmp_path / "resumed"
    train_interrupted_after(config, resumed, 250, monkeypatch)
    assert [r["step"] for r in run_records.read_metrics(str(resumed / "metrics.jsonl"))][-1] == 250
    train.train_and_evaluate(config, str(resumed))

    want = run_records.read_metrics(str(uninterrupted / "metrics.jsonl"))
    got = run_records.read_metrics(str(resumed / "metrics.jsonl"))
    assert deterministic(got) == deterministic(want)  # bitwise: floats compared with ==
    assert [r["step"] for r in want if "test_accuracy" in r] == list(range(50, 301, 50))

    # The final states agree bitwise as well.
    states = []
    for workdir in (uninterrupted, resumed):
        manager = checkpoints.checkpoint_manager(str(workdir))
        assert manager.latest_step() == 300
        state = train.create_train_state(jax.random.PRNGKey(0), config, train.create_setup(config).program_model, (28, 28), 1)
        states.append(checkpoints.restore_latest(manager, state)[0])
        manager.close()
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_streamed_batches_match_the_on_device_loop(small_mnist_dir, tmp_path):
    """Feeding the same batches one step at a time from the host gives the same run."""
    on_device = train.train_and_evaluate(small_config(small_mnist_dir, num_steps=150), str(tmp_path / "a"))
    streamed = train.train_and_evaluate(
        small_config(small_mnist_dir, num_steps=150, **{"data.on_device": False}), str(tmp_path / "b")
    )
    want = deterministic(run_records.read_metrics(str(tmp_path / "a" / "metrics.jsonl")))
    got = deterministic(run_records.read_metrics(str(tmp_path / "b" / "metrics.jsonl")))
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in g:
            np.testing.assert_allclose(g[key], w[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert on_device["final_test_accuracy"] == pytest.approx(streamed["final_test_accuracy"], abs=0.02)


def test_batches_cover_each_epoch_without_replacement():
    rng = jax.random.PRNGKey(0)
    images = np.arange(120, dtype=np.int64)[:, None]
    labels = np.arange(120)
    seen = [b[1] for b in mnist_experiment.host_batches(images, labels, rng, 0, 6, batch_size=40)]
    assert sorted(np.concatenate(seen[:3]).tolist()) == list(range(120))
    assert sorted(np.concatenate(seen[3:]).tolist()) == list(range(120))
    assert not np.array_equal(np.concatenate(seen[:3]), np.concatenate(seen[3:]))
    # Starting mid-epoch gives the same batches as getting there from step 0.
    later = [b[1] for b in mnist_experiment.host_batches(images, labels, rng, 4, 2, batch_size=40)]
    np.testing.assert_array_equal(np.stack(later), np.stack(seen[4:]))


def test_divergence_stops_the_run_and_is_recorded(small_mnist_dir, tmp_path):
    config = small_config(small_mnist_dir, "baseline", learning_rate=1e38, lr_schedule="constant")
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary["diverged"] is True
    records = run_records.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert records[-1] == {"step": summary["diverged_at_step"], "diverged": True}


def test_population_statistics_replace_the_moving_averages(small_mnist_dir, tmp_path):
    config = small_config(small_mnist_dir, num_steps=100)
    summary = train.train_and_evaluate(config, str(tmp_path))
    final = run_records.read_metrics(str(tmp_path / "metrics.jsonl"))[-1]
    assert final[run_records.AFTER_TRAINING] is True
    assert final["test_accuracy_population_stats"] == summary["final_test_accuracy_population_stats"]
    assert summary["population_batches"] == 20


def test_reproduce_figure1_end_to_end(small_mnist_dir, tmp_path):
    """The README's main command, shortened: both nets through `python -m bn_repro.main`."""
    results, workdir = tmp_path / "results", tmp_path / "runs"
    command = [
        sys.executable, os.path.join(REPO, "scripts", "reproduce_figure1.py"),
        f"--workdir={workdir}", f"--results={results}",
        "--config.num_steps=300", "--config.eval_every=100", "--config.checkpoint_every=100",
        "--config.bn.population_batches=10",
        f"--config.data.data_dir={small_mnist_dir}", "--config.data.verify_checksums=False",
    ]
    subprocess.run(command, check=True, cwd=tmp_path, timeout=300)

    assert (results / "figure1.png").stat().st_size > 10_000
    summary = json.loads((results / "summary.json").read_text())
    assert set(summary["nets"]) == {"baseline", "bn"}
    assert "final_test_accuracy_population_stats" in summary["nets"]["bn"]
    assert summary["nets"]["bn"]["environment"]["command"].startswith("python -m bn_repro.main")
    assert summary["command"].startswith("python scripts/reproduce_figure1.py")
    for variant in ("baseline", "bn"):
        run = workdir / variant
        assert json.loads((run / "config.json").read_text())["model"]["use_bn"] == (variant == "bn")
        assert (run / "checkpoints" / "300").is_dir()
        records = run_records.read_metrics(str(run / "metrics.jsonl"))
        assert all("step" in r for r in records)
        evaluations = [r for r in records if "test_accuracy" in r]
        assert [r["step"] for r in evaluations] == [100, 200, 300]
        for r in evaluations:
            assert r["sigmoid_input_p15"] <= r["sigmoid_input_p50"] <= r["sigmoid_input_p85"]
        assert (results / f"metrics_{variant}.jsonl").read_text() == (run / "metrics.jsonl").read_text()


def test_resuming_with_another_config_is_refused(small_mnist_dir, tmp_path):
    train.train_and_evaluate(small_config(small_mnist_dir, num_steps=50), str(tmp_path))
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"different config \(fields: config\.learning_rate\)"):
        train.train_and_evaluate(small_config(small_mnist_dir, num_steps=50, learning_rate=0.1), str(tmp_path))
    assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing lost


def test_population_mean_over_one_epoch_is_the_training_set_mean(small_mnist_dir):
    """One epoch's equal batches partition the training set, so E[mu_B] is its mean."""
    from bn_repro import mnist_data

    config = small_config(small_mnist_dir)
    data = mnist_data.load_mnist(small_mnist_dir, expected=None)
    state = train.create_train_state(jax.random.PRNGKey(0), config, train.create_setup(config).program_model, (28, 28), 1)
    images = jax.numpy.asarray(data["train_images"])
    per_epoch = images.shape[0] // config.batch_size
    stats = mnist_experiment.population_stats_on_device(
        state, images, jax.random.PRNGKey(1), per_epoch, config.batch_size, config.data.binarize_threshold
    )
    x = np.asarray(mnist_experiment.preprocess(images, config.data.binarize_threshold), np.float64)
    first_layer_input = x @ np.asarray(state.params["hidden0"]["kernel"], np.float64)
    np.testing.assert_allclose(stats["bn0"]["mean"], first_layer_input.mean(axis=0), rtol=1e-4, atol=1e-6)
    assert set(stats) == {"bn0", "bn1", "bn2"}


def test_batch_larger_than_the_training_set_is_refused(small_mnist_dir, tmp_path):
    with pytest.raises(ValueError, match=r"config\.batch_size \(400\) is larger than the training set \(360"):
        train.train_and_evaluate(small_config(small_mnist_dir, batch_size=400), str(tmp_path))
