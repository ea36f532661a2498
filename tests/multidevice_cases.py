"""Data-parallel equivalences on 8 CPU devices.

Run by ``tests/test_parallel.py`` in a pytest subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the device count is
fixed when JAX starts, and the rest of the suite runs on one device).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bn_repro import checkpoints, classification_experiment, parallel, train
from bn_repro import run_records
from bn_repro.batchnorm import BatchNorm
from conftest import assert_resumed_from, metrics_lines
from test_train import deterministic, small_config, train_interrupted_after

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason="needs 8 devices: run through tests/test_parallel.py")

N, C = 64, 6  # global batch, features
AXIS = parallel.DATA_AXIS


def bn_inputs():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (N, 3, 3, C)).astype(np.float32)
    params = {"scale": rng.uniform(0.5, 1.5, C).astype(np.float32), "bias": rng.normal(0, 1, C).astype(np.float32)}
    stats = {"mean": np.zeros(C, np.float32), "var": np.ones(C, np.float32)}
    return x, params, stats


def bn_train(bn: BatchNorm):
    """(x, params, stats) -> (y, updated stats, d sum(y * w) / d params) in training mode."""
    w = jnp.asarray(np.random.default_rng(1).normal(size=(N, 3, 3, C)).astype(np.float32))

    def f(x, params, stats, w):
        def loss(p):
            y, updates = bn.apply({"params": p, "batch_stats": stats}, x, use_running_average=False,
                                  mutable=["batch_stats"])
            return jnp.sum(y * w), (y, updates["batch_stats"])

        (_, (y, new_stats)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return y, new_stats, grads

    return f, w


def on_8_devices_with_pmap(bn: BatchNorm, sync_grads: bool):
    f, w = bn_train(bn)
    x, params, stats = bn_inputs()
    split = lambda a: a.reshape((8, N // 8) + a.shape[1:])  # noqa: E731

    def per_device(x, w):
        y, new_stats, grads = f(x, params, stats, w)
        grads = jax.lax.psum(grads, AXIS) if sync_grads else grads
        return y, new_stats, grads

    y, new_stats, grads = jax.pmap(per_device, AXIS)(split(x), split(np.asarray(w)))
    return y.reshape(x.shape), new_stats, grads


def test_global_statistics_on_8_devices_equal_one_device_on_the_whole_batch():
    x, params, stats = bn_inputs()
    f, w = bn_train(BatchNorm(momentum=0.9))
    y1, stats1, grads1 = jax.jit(f)(x, params, stats, w)
    y8, stats8, grads8 = on_8_devices_with_pmap(BatchNorm(momentum=0.9, axis_name=AXIS), sync_grads=True)
    np.testing.assert_allclose(y8, y1, rtol=1e-5, atol=1e-5)
    for k in ("mean", "var"):
        np.testing.assert_allclose(stats8[k], np.broadcast_to(stats1[k], stats8[k].shape), rtol=1e-5, atol=1e-6)
    for k in ("scale", "bias"):
        np.testing.assert_allclose(grads8[k][0], grads1[k], rtol=1e-4, atol=1e-4)


def test_virtual_batches_of_b_over_8_equal_per_device_statistics_on_8_devices():
    x, params, stats = bn_inputs()
    f, w = bn_train(BatchNorm(momentum=0.9, virtual_batch_size=N // 8))
    y1, stats1, grads1 = jax.jit(f)(x, params, stats, w)
    y8, stats8, grads8 = on_8_devices_with_pmap(BatchNorm(momentum=0.9), sync_grads=True)
    np.testing.assert_allclose(y8, y1, rtol=1e-5, atol=1e-5)
    for k in ("mean", "var"):  # the devices' moving averages, averaged (parallel.sync_batch_stats)
        np.testing.assert_allclose(np.mean(stats8[k], axis=0), stats1[k], rtol=1e-5, atol=1e-6)
    for k in ("scale", "bias"):
        np.testing.assert_allclose(grads8[k][0], grads1[k], rtol=1e-4, atol=1e-4)


def virtual_batch_norm_numpy(x, params, stats, group, momentum=0.9, epsilon=1e-5):
    """Independent reference: each consecutive ``group`` examples normalised with
    their own mean and biased variance; the moving averages move towards the
    groups' mean moments."""
    g = x.astype(np.float64).reshape((-1, group) + x.shape[1:])
    mean, var = g.mean(axis=(1, 2, 3), keepdims=True), g.var(axis=(1, 2, 3), keepdims=True)
    y = params["scale"] * (g - mean) / np.sqrt(var + epsilon) + params["bias"]
    new_stats = {"mean": momentum * stats["mean"] + (1 - momentum) * mean.mean(axis=0).ravel(),
                 "var": momentum * stats["var"] + (1 - momentum) * var.mean(axis=0).ravel()}
    return y.reshape(x.shape), new_stats


@pytest.mark.parametrize("group", [4, 16])  # within a device's 8 examples, and across devices
@pytest.mark.parametrize("devices", [1, 2, 8])
def test_virtual_batches_give_the_same_result_on_1_2_and_8_devices(devices, group):
    x, params, stats = bn_inputs()
    f, w = bn_train(BatchNorm(momentum=0.9, virtual_batch_size=group))
    mesh = Mesh(np.asarray(jax.devices()[:devices]), (AXIS,))
    sharded = NamedSharding(mesh, P(AXIS))
    y, new_stats, grads = jax.jit(f)(jax.device_put(x, sharded), params, stats, jax.device_put(w, sharded))
    want_y, want_stats = virtual_batch_norm_numpy(x, params, stats, group)
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-5, atol=1e-5)
    for k in ("mean", "var"):
        np.testing.assert_allclose(np.asarray(new_stats[k]), want_stats[k], rtol=1e-5, atol=1e-6)
    if devices > 1:  # the gradients: as on one device
        reference = jax.jit(f)(x, params, stats, w)[2]
        for k in ("scale", "bias"):
            np.testing.assert_allclose(np.asarray(grads[k]), np.asarray(reference[k]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loop, statistics, m", [
    ("pmap", "global", 128), ("jit", "per_device", 16), ("pmap", "per_device", 16), ("pmap", "virtual", 8),
])
def test_algorithm_2_corrects_with_the_m_the_training_statistics_had(small_mnist_dir, loop, statistics, m):
    """Algorithm 2 (in the single program that evaluates and saves the model) sees
    each whole batch of 128; its variance correction m/(m-1) must use the m of
    the mini-batches training normalised over: 128 (global), 16 per device, or
    virtual batches of 8. Checked at the first BN layer against numpy's
    unbiased variance over those groups, averaged over 3 batches."""
    config = mnist_config(small_mnist_dir, parallel=loop, **{"bn.statistics": statistics, "bn.virtual_batch_size": 8})
    setup = train.create_setup(config)
    state = train.create_train_state(jax.random.PRNGKey(0), config, setup.program_model, (28, 28), 1)
    images = np.random.default_rng(0).integers(0, 2, (3, 128, 28, 28)).astype(np.float32)
    stats = classification_experiment.population_stats_from_stream(
        state, ({"image": jnp.asarray(b)} for b in images), jax.random.PRNGKey(1))
    h = images.reshape(3, 128, 784).astype(np.float64) @ np.asarray(state.params["hidden0"]["kernel"], np.float64)
    groups = h.reshape(3, 128 // m, m, -1)
    np.testing.assert_allclose(stats["bn0"]["var"], groups.var(axis=2, ddof=1).mean(axis=(0, 1)), rtol=2e-4)
    np.testing.assert_allclose(stats["bn0"]["mean"], h.mean(axis=(0, 1)), rtol=1e-4, atol=1e-6)


# The real training loop (MNIST MLP with BN, batch 128 = 8 devices x 16) in both
# loops. Virtual batches of 8 (2 per device): with groups of 4 binary images
# some features have almost no variance, and rounding differences between the
# two loops' reductions grow to ~1e-3 over 60 steps (measured).


def mnist_config(data_dir, **overrides):
    fields = {"batch_size": 128, "num_steps": 60, "eval_every": 20, "checkpoint_every": 20,
              "bn.population_batches": 4, **overrides}
    return small_config(data_dir, "bn", **fields)


def final_variables(workdir, config):
    manager = checkpoints.checkpoint_manager(str(workdir))
    state = train.create_train_state(jax.random.PRNGKey(0), config, train.create_setup(config).program_model, (28, 28), 1)
    state, _ = checkpoints.restore_latest(manager, state)
    manager.close()
    return {"params": state.params, "batch_stats": state.batch_stats}


def assert_runs_close(workdirs, configs):
    curves = [deterministic(run_records.read_metrics(str(w / "metrics.jsonl"))) for w in workdirs]
    assert [r["step"] for r in curves[0]] == [r["step"] for r in curves[1]]
    for a, b in zip(*curves):
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)
    variables = [final_variables(w, c) for w, c in zip(workdirs, configs)]
    for a, b in zip(jax.tree.leaves(variables[0]), jax.tree.leaves(variables[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def trained(small_mnist_dir, tmp_path_factory):
    """``trained(loop, statistics, on_device)`` -> (workdir, config) of that run, trained once per module."""
    root, done = tmp_path_factory.mktemp("runs"), {}

    def run(loop: str, statistics: str, on_device: bool = True):
        name = f"{loop}_{statistics}_{on_device}"
        config = mnist_config(small_mnist_dir, parallel=loop, **{"bn.statistics": statistics,
                                                                "bn.virtual_batch_size": 8, "data.on_device": on_device})
        if name not in done:
            train.train_and_evaluate(config, str(root / name))
            done[name] = root / name
        return done[name], config

    return run


@pytest.mark.parametrize("statistics", ["global", "per_device", "virtual"])
@pytest.mark.parametrize("on_device", [True, False])
def test_jit_and_pmap_loops_train_the_same(trained, statistics, on_device):
    workdirs, configs = zip(*(trained(loop, statistics, on_device) for loop in ("jit", "pmap")))
    assert_runs_close(workdirs, configs)


def test_per_device_statistics_differ_from_global(trained):
    """The modes are not the same computation (else the tests above prove nothing)."""
    a, b = (final_variables(*trained("jit", mode)) for mode in ("global", "per_device"))
    assert not np.allclose(a["batch_stats"]["bn0"]["var"], b["batch_stats"]["bn0"]["var"], rtol=1e-3)


@pytest.mark.parametrize("loop", ["jit", "pmap"])
def test_resume_after_interruption_in_both_loops(trained, tmp_path, monkeypatch, loop):
    uninterrupted, config = trained(loop, "per_device")
    train_interrupted_after(config, tmp_path, 40, monkeypatch)  # the last checkpoint: 20
    before = metrics_lines(tmp_path)
    train.train_and_evaluate(config, str(tmp_path))
    assert_resumed_from(tmp_path, before, checkpoint_step=20)
    want = deterministic(run_records.read_metrics(str(uninterrupted / "metrics.jsonl")))
    got = deterministic(run_records.read_metrics(str(tmp_path / "metrics.jsonl")))
    assert got == want
