"""The real training loop, run for a few hundred steps on a small generated MNIST."""

import json
import os
import re
import signal
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

import jax.numpy as jnp
import orbax.checkpoint as ocp

from bn_repro import checkpoints, mnist_data, train
from bn_repro import mnist_experiment, run_records
from bn_repro.main import load_config
from conftest import assert_resumed_from, metrics_lines

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
    """Runs ``config`` in ``workdir`` and stops it right after the metrics of ``step`` and their TensorBoard
    events are written."""
    write = run_records.write_scalars

    def write_then_interrupt(writer, at, scalars):
        write(writer, at, scalars)
        if at == step:
            raise Interrupted

    monkeypatch.setattr(run_records, "write_scalars", write_then_interrupt)
    with pytest.raises(Interrupted):
        train.train_and_evaluate(config, str(workdir))
    monkeypatch.setattr(run_records, "write_scalars", write)


def restore_checkpoint(workdir, config, step: int):
    """The training state checkpointed at ``step`` in ``workdir``, read with orbax directly."""
    model = train.create_setup(config).program_model
    state = train.create_train_state(jax.random.PRNGKey(0), config, model, (28, 28), 1)
    manager = checkpoints.checkpoint_manager(str(workdir))
    try:
        assert manager.latest_step() == step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))
    finally:
        manager.close()


@pytest.mark.parametrize("variant", ["bn", "baseline"])
def test_resume_after_interruption_gives_identical_metrics(small_mnist_dir, tmp_path, monkeypatch, variant):
    """An interrupted run resumes from its last checkpoint (not from step 0) and ends as an uninterrupted one."""
    import tensorboardX.event_file_writer

    # Every event file as if started in the same second (tensorboardX names them by the second).
    monkeypatch.setattr(tensorboardX.event_file_writer, "time", types.SimpleNamespace(time=lambda: 1.8e9))
    config = small_config(small_mnist_dir, variant)
    uninterrupted = tmp_path / "uninterrupted"
    train.train_and_evaluate(config, str(uninterrupted))

    # Interrupt right after the evaluation at step 250 is written: the last
    # checkpoint is at 200, so the resumed run redoes steps 201-300.
    resumed = tmp_path / "resumed"
    train_interrupted_after(config, resumed, 250, monkeypatch)
    lines_before = metrics_lines(resumed)
    assert [r["step"] for r in run_records.read_metrics(str(resumed / "metrics.jsonl"))][-1] == 250
    train.train_and_evaluate(config, str(resumed))
    # A restart from step 0 would write the same deterministic metrics; only the
    # records up to the checkpoint, kept as written (timings included), tell them apart.
    assert_resumed_from(resumed, lines_before, 200)

    want = run_records.read_metrics(str(uninterrupted / "metrics.jsonl"))
    got = run_records.read_metrics(str(resumed / "metrics.jsonl"))
    assert deterministic(got) == deterministic(want)  # bitwise: floats compared with ==
    assert [r["step"] for r in want if "test_accuracy" in r] == list(range(50, 301, 50))

    # TensorBoard's own reader shows the resumed run as the uninterrupted one: the events the first process wrote
    # after its checkpoint (step 250) are replaced by the resumed process's, and none before it is lost.
    events = {d: tensorboard_scalars(d / "tensorboard") for d in (uninterrupted, resumed)}
    assert len(list((resumed / "tensorboard").iterdir())) == 2  # one event file per process
    for tag in ("train_loss", "test_accuracy", "test_loss", "learning_rate"):
        assert events[resumed][tag] == events[uninterrupted][tag], tag
    assert [s for s, _ in events[resumed]["test_accuracy"]] == list(range(50, 301, 50))

    # The final states agree bitwise as well.
    states = [restore_checkpoint(workdir, config, 300) for workdir in (uninterrupted, resumed)]
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def truncate_files(directory) -> None:
    """Cuts every file under ``directory`` to half its size: what a disk fault or a copy cut short leaves."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size // 2)


def test_a_damaged_checkpoint_or_a_torn_metrics_line_does_not_stop_a_resume(small_mnist_dir, tmp_path, monkeypatch,
                                                                           caplog):
    """The newest checkpoint unreadable: the run says so, resumes from the next newest and ends as an uninterrupted
    run; a torn last metrics line is dropped with a warning; no readable checkpoint at all: an error naming the
    directory, the checkpoints left as they were."""
    config = small_config(small_mnist_dir, "bn")
    uninterrupted = tmp_path / "uninterrupted"
    train.train_and_evaluate(config, str(uninterrupted))
    resumed = tmp_path / "resumed"
    train_interrupted_after(config, resumed, 250, monkeypatch)  # checkpoints at 100 and 200
    lines_before = metrics_lines(resumed)
    truncate_files(resumed / "checkpoints" / "200")
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write('{"step": 300, "train_loss": 0.1')  # torn
    with caplog.at_level("WARNING"):
        train.train_and_evaluate(config, str(resumed))
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert f"checkpoint at step 200 ({resumed / 'checkpoints' / '200'}) cannot be read" in warnings
    assert "dropping its torn last line" in warnings
    assert (resumed / "checkpoints_damaged" / "200").is_dir()
    assert_resumed_from(resumed, lines_before, 100)
    want = run_records.read_metrics(str(uninterrupted / "metrics.jsonl"))
    assert deterministic(run_records.read_metrics(str(resumed / "metrics.jsonl"))) == deterministic(want)

    # Every checkpoint damaged: refused, naming the directory; nothing moved or rewritten.
    broken = tmp_path / "broken"
    train_interrupted_after(config, broken, 250, monkeypatch)
    for step in ("100", "200"):
        truncate_files(broken / "checkpoints" / step)
    lines = metrics_lines(broken)
    with pytest.raises(checkpoints.CheckpointError, match=f"No checkpoint in {broken / 'checkpoints'} can be read"):
        train.train_and_evaluate(config, str(broken))
    assert sorted(p.name for p in (broken / "checkpoints").iterdir() if p.name.isdigit()) == ["100", "200"]
    assert metrics_lines(broken) == lines


def tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in ``directory``, by tag, as TensorBoard's own reader shows
    them (events a resumed run purged left out)."""
    from tensorboard.backend.event_processing import event_accumulator

    reader = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.SCALARS: 0})
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def test_progress_lines_and_tensorboard_events_change_no_number(small_mnist_dir, tmp_path, caplog, monkeypatch):
    """log_every < eval_every: a progress line (loss, steps/s, images/s, time left) every log_every steps, the
    same metrics as with one line per evaluation, TensorBoard events of them, and a divergence stopped within
    log_every steps."""
    config = small_config(small_mnist_dir, "bn", num_steps=100)
    train.train_and_evaluate(config, str(tmp_path / "plain"))
    with config.unlocked():
        config.log_every = 20
    with caplog.at_level("INFO"):
        train.train_and_evaluate(config, str(tmp_path / "logged"))
    lines = [r.getMessage() for r in caplog.records if "images/s" in r.getMessage()]
    assert [line.split()[2] for line in lines] == ["20/100", "40/100", "60/100", "80/100"]  # 50, 100: evaluations
    assert all(re.search(r"train_loss \d\.\d{4}  [\d.]+ steps/s  \d+ images/s  about \d\d:\d\d:\d\d left", line)
               for line in lines), lines
    plain, logged = (deterministic(run_records.read_metrics(str(tmp_path / d / "metrics.jsonl")))
                     for d in ("plain", "logged"))
    assert logged == plain

    # TensorBoard: the same numbers, read back from the event files.
    events = tensorboard_scalars(tmp_path / "logged" / "tensorboard")
    assert [step for step, _ in events["train_loss"]] == [20, 40, 50, 60, 80, 100]
    assert events["test_accuracy"] == [(r["step"], pytest.approx(r["test_accuracy"])) for r in logged
                                       if "test_accuracy" in r and not r.get("after_training")]
    schedule = train.create_learning_rate_schedule(config, steps_per_epoch=1)  # cosine: no epochs
    assert events["learning_rate"] == [(s, pytest.approx(float(schedule(s)))) for s in (20, 40, 50, 60, 80, 100)]
    assert events["learning_rate"][0][1] < config.learning_rate
    assert [s for s, _ in events["test_accuracy_population_stats"]] == [100]
    assert {"steps_per_sec", "wall_time_s", "test_loss"} <= set(events)

    calls = []
    with config.unlocked():
        config.learning_rate = 1e30  # NaN within the first steps
        config.num_steps, config.eval_every, config.checkpoint_every, config.log_every = 1000, 500, 500, 10
    make = mnist_experiment.experiment

    def counting(*args, **kwargs):
        experiment = make(*args, **kwargs)
        return experiment._replace(run_steps=lambda state, step, n: calls.append(n) or experiment.run_steps(state, step, n))

    monkeypatch.setattr(mnist_experiment, "experiment", counting)
    summary = train.train_and_evaluate(config, str(tmp_path / "diverged"))
    assert summary["diverged"] and summary["diverged_at_step"] <= 10
    assert calls == [10]  # stopped after the first 10 steps, not at the evaluation at step 500


def test_sigterm_checkpoints_at_the_current_step_and_the_resumed_run_ends_as_an_uninterrupted_one(
        small_mnist_dir, tmp_path, monkeypatch):
    """SIGTERM (a real one, to this process) during training: the run stops after its current chunk of log_every
    steps, between evaluations, with a checkpoint there, and returns; resumed, it trains only the remaining steps
    and writes exactly the metrics of an uninterrupted run (the evaluation interval's losses from before the stop
    included)."""
    config = small_config(small_mnist_dir, "bn", num_steps=100)
    with config.unlocked():
        config.log_every = 20
    train.train_and_evaluate(config, str(tmp_path / "uninterrupted"))
    calls = []
    make = mnist_experiment.experiment

    def counting(*args, **kwargs):
        experiment = make(*args, **kwargs)

        def run_steps(state, step, n):
            calls.append((step, n))
            if step == 60:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives during steps 61-80
            return experiment.run_steps(state, step, n)

        return experiment._replace(run_steps=run_steps)

    monkeypatch.setattr(mnist_experiment, "experiment", counting)
    workdir = tmp_path / "preempted"
    summary = train.train_and_evaluate(config, str(workdir))
    assert summary == {"variant": "bn", "preempted_at_step": 80} and calls[-1] == (60, 20)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the run
    assert not (workdir / "summary.json").exists()
    assert 80 in [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    lines = metrics_lines(workdir)
    assert json.loads(lines[-1])["preempted"] and len(json.loads(lines[-1])["interval_losses"]) == 30  # 51-80

    calls.clear()
    train.train_and_evaluate(config, str(workdir))
    assert calls == [(80, 20)]  # only the remaining steps
    assert metrics_lines(workdir)[0] == lines[0]  # the evaluation at step 50, as first written
    want, got = (deterministic(run_records.read_metrics(str(d / "metrics.jsonl")))
                 for d in (tmp_path / "uninterrupted", workdir))
    assert got == want


def test_an_unreadable_metrics_line_before_the_last_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "torn\n{"step": 3}\n')
    with pytest.raises(run_records.MetricsFileError, match=r"metrics.jsonl, line 2: not a JSON record"):
        run_records.read_metrics(str(path))


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


def test_non_finite_parameters_with_finite_losses_are_a_divergence(small_mnist_dir, tmp_path, monkeypatch):
    """A chunk whose losses are all finite but which leaves a parameter infinite ends the run as diverged there."""
    real_experiment, losses_seen = mnist_experiment.experiment, []

    def experiment(*args):
        real = real_experiment(*args)

        def run_steps(state, step, num_steps):
            state, losses = real.run_steps(state, step, num_steps)
            losses_seen.append(np.asarray(losses))
            if step + num_steps == 100:  # One weight overflows in the second chunk.
                layer = state.params["hidden0"]
                params = {**state.params, "hidden0": {**layer, "kernel": layer["kernel"].at[0, 0].set(jnp.inf)}}
                state = state.replace(params=params)
            return state, losses

        return real._replace(run_steps=run_steps)

    monkeypatch.setattr(mnist_experiment, "experiment", experiment)
    summary = train.train_and_evaluate(small_config(small_mnist_dir, "baseline", num_steps=150), str(tmp_path))
    assert summary.get("diverged") is True and summary.get("diverged_at_step") == 100
    assert len(losses_seen) == 2 and all(np.isfinite(losses).all() for losses in losses_seen)  # finite losses only
    records = run_records.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [50, 100] and records[-1] == {"step": 100, "diverged": True}
    assert not (tmp_path / checkpoints.FINAL_MODEL).exists()
    assert not (tmp_path / "checkpoints" / "100").exists()


def numpy_mlp(params, images, threshold, batch_stats=None, epsilon=1e-5):
    """The BN MLP in float64 NumPy: (logits, each BN layer's (mean, biased var) of its input).

    Training mode (``batch_stats`` None) normalises with the batch's moments,
    inference mode with ``batch_stats``."""
    x = images.reshape(len(images), -1) / 255.0
    h = (x > threshold).astype(np.float64)
    moments = []
    for i in range(3):
        z = h @ np.asarray(params[f"hidden{i}"]["kernel"], np.float64)
        if batch_stats is None:
            mean, var = z.mean(axis=0), z.var(axis=0)
        else:
            mean, var = (np.asarray(batch_stats[f"bn{i}"][k], np.float64) for k in ("mean", "var"))
        moments.append((mean, var))
        bn = params[f"bn{i}"]
        scale, bias = (np.asarray(bn[k], np.float64) for k in ("scale", "bias"))
        z = (z - mean) / np.sqrt(var + epsilon) * scale + bias
        h = 1 / (1 + np.exp(-z))
    out = params["output"]
    return h @ np.asarray(out["kernel"], np.float64) + np.asarray(out["bias"], np.float64), moments


def loss_and_accuracy(logits, labels):
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(labels)), labels].mean(), np.mean(logits.argmax(axis=1) == labels)


def test_population_statistics_replace_the_moving_averages(small_mnist_dir, tmp_path):
    """The final model holds Algorithm 2's statistics over the final parameters (not the
    moving averages of the last checkpoint), and the after-training evaluation uses them."""
    config = small_config(small_mnist_dir, num_steps=100)
    summary = train.train_and_evaluate(config, str(tmp_path))
    final = run_records.read_metrics(str(tmp_path / "metrics.jsonl"))[-1]
    assert final[run_records.AFTER_TRAINING] is True
    assert final["test_accuracy_population_stats"] == summary["final_test_accuracy_population_stats"]
    assert summary["population_batches"] == 20

    model = checkpoints.load_final_model(str(tmp_path))
    last = restore_checkpoint(tmp_path, config, 100)
    for a, b in zip(jax.tree.leaves(model["params"]), jax.tree.leaves(last.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Algorithm 2 by hand: the 20 training mini-batches of 60 drawn from the
    # run's population key, each through the net in training mode; E[x] is the
    # mean of the batch means, Var[x] m/(m-1) times the mean of the batch variances.
    data = mnist_data.load_mnist(small_mnist_dir, expected=None)
    images, n = data["train_images"], len(data["train_labels"])
    population_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)[2]
    m, per_epoch = config.batch_size, n // config.batch_size
    epochs = range(-(-config.bn.population_batches // per_epoch))
    orders = [np.asarray(mnist_experiment.epoch_permutation(population_rng, e, n))[: per_epoch * m] for e in epochs]
    batches = np.concatenate(orders).reshape(-1, m)[: config.bn.population_batches]
    moments = [numpy_mlp(model["params"], images[b], config.data.binarize_threshold)[1] for b in batches]
    threshold = config.data.binarize_threshold
    for i in range(3):
        mean = np.mean([batch[i][0] for batch in moments], axis=0)
        var = m / (m - 1) * np.mean([batch[i][1] for batch in moments], axis=0)
        stats, moving = model["batch_stats"][f"bn{i}"], last.batch_stats[f"bn{i}"]
        np.testing.assert_allclose(stats["mean"], mean, rtol=1e-4, atol=1e-6, err_msg=f"bn{i} mean")
        np.testing.assert_allclose(stats["var"], var, rtol=1e-4, atol=1e-6, err_msg=f"bn{i} var")
        assert np.max(np.abs(np.asarray(moving["mean"]) - mean)) > 1e-2  # the check above tells them apart

    # The after-training evaluation is the one with these statistics.
    test_images, test_labels = data["test_images"], data["test_labels"]
    loss, accuracy = loss_and_accuracy(numpy_mlp(model["params"], test_images, threshold, model["batch_stats"])[0],
                                       test_labels)
    assert final["test_loss_population_stats"] == pytest.approx(loss, rel=1e-4)
    assert final["test_accuracy_population_stats"] == pytest.approx(accuracy, abs=1.5 / len(test_labels))
    moving_loss, _ = loss_and_accuracy(numpy_mlp(last.params, test_images, threshold, last.batch_stats)[0], test_labels)
    assert abs(moving_loss - loss) > 1e-3 * loss


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
