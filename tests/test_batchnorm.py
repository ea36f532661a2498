"""BN against an independent float64 NumPy implementation of Algorithms 1 and 2.

The reference below is written from the paper's equations (Sec. 3, Algorithm
1, the backpropagation formulas of Sec. 3, Algorithm 2), not from the module.
The module runs in float64 too (jax.enable_x64), so agreement is to ~1e-12.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_repro.batchnorm import BATCH_MOMENTS, BatchNorm, batch_normalize, population_statistics

EPS = 1e-3
MOMENTUM = 0.9


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def reference_forward(x, gamma, beta, eps):
    """Algorithm 1 over every axis but the last; returns y and what backprop needs."""
    axes = tuple(range(x.ndim - 1))
    m = x.size // x.shape[-1]
    mu = x.sum(axis=axes) / m
    var = ((x - mu) ** 2).sum(axis=axes) / m
    x_hat = (x - mu) / np.sqrt(var + eps)
    return gamma * x_hat + beta, (x, mu, var, x_hat, m, axes)


def reference_backward(dy, gamma, eps, cache):
    """The chain rule as printed in Sec. 3 of the paper."""
    x, mu, var, x_hat, m, axes = cache
    dx_hat = dy * gamma
    dvar = (dx_hat * (x - mu) * -0.5 * (var + eps) ** -1.5).sum(axis=axes)
    dmu = (dx_hat * -1.0 / np.sqrt(var + eps)).sum(axis=axes) + dvar * (-2.0 * (x - mu)).sum(axis=axes) / m
    dx = dx_hat / np.sqrt(var + eps) + dvar * 2.0 * (x - mu) / m + dmu / m
    dgamma = (dy * x_hat).sum(axis=axes)
    dbeta = dy.sum(axis=axes)
    return dx, dgamma, dbeta


def reference_population(batches, eps):
    """Algorithm 2: E[x] = mean of mu_B, Var[x] = m/(m-1) * mean of var_B."""
    mus, vars_ = [], []
    for x in batches:
        _, (_, mu, var, _, m, _) = reference_forward(x, 1.0, 0.0, eps)
        mus.append(mu)
        vars_.append(var)
    return np.mean(mus, axis=0), m / (m - 1) * np.mean(vars_, axis=0)


def make_inputs(shape, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.normal(3.0, 2.0, size=shape)  # offset mean: a stricter test of the variance
    gamma = rng.uniform(0.5, 1.5, size=shape[-1])
    beta = rng.normal(size=shape[-1])
    dy = rng.normal(size=shape)
    return x, gamma, beta, dy


def module_variables(gamma, beta, features):
    return {
        "params": {"scale": jnp.asarray(gamma), "bias": jnp.asarray(beta)},
        "batch_stats": {"mean": jnp.zeros(features), "var": jnp.ones(features)},
    }


SHAPES = {"dense": (32, 7), "conv": (4, 5, 6, 3)}


@pytest.mark.parametrize("use_fast_variance", [False, True])
@pytest.mark.parametrize("case", sorted(SHAPES))
def test_training_forward_matches_algorithm_1(case, use_fast_variance):
    x, gamma, beta, _ = make_inputs(SHAPES[case])
    bn = BatchNorm(epsilon=EPS, use_fast_variance=use_fast_variance)
    y = bn.apply(module_variables(gamma, beta, x.shape[-1]), jnp.asarray(x), use_running_average=False)
    expected, _ = reference_forward(x, gamma, beta, EPS)
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(y), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_gradients_match_the_papers_backprop_formulas(case):
    x, gamma, beta, dy = make_inputs(SHAPES[case], seed=1)
    bn = BatchNorm(epsilon=EPS)

    def loss(x, gamma, beta):
        y = bn.apply(module_variables(gamma, beta, x.shape[-1]), x, use_running_average=False)
        return jnp.sum(y * dy)  # so that dL/dy = dy

    grads = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta))
    _, cache = reference_forward(x, gamma, beta, EPS)
    for got, want in zip(grads, reference_backward(dy, gamma, EPS, cache)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-9, atol=1e-10)


def test_virtual_batch_gradients_are_each_groups_backprop_formulas():
    x, gamma, beta, dy = make_inputs((12, 3, 2, 4), seed=2)
    bn = BatchNorm(epsilon=EPS, virtual_batch_size=4)

    def loss(x, gamma, beta):
        y = bn.apply(module_variables(gamma, beta, x.shape[-1]), x, use_running_average=False)
        return jnp.sum(y * dy)

    dx, dgamma, dbeta = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta))
    want = [reference_backward(dy[g : g + 4], gamma, EPS, reference_forward(x[g : g + 4], gamma, beta, EPS)[1])
            for g in range(0, 12, 4)]
    np.testing.assert_allclose(np.asarray(dx), np.concatenate([w[0] for w in want]), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(np.asarray(dgamma), sum(w[1] for w in want), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(np.asarray(dbeta), sum(w[2] for w in want), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("use_fast_variance", [False, True])
def test_gradients_through_the_returned_moments_match_autodiff(use_fast_variance):
    """Only y reaches a training loss; a loss of the moments too gets their gradients as well."""
    x, gamma, beta, dy = make_inputs((6, 5, 3), seed=3)
    a, b = np.random.RandomState(4).normal(size=(2, 3))

    def written_out(x, gamma, beta):  # the same function, differentiated by JAX
        mean = jnp.mean(x, axis=(0, 1))
        var = jnp.mean(jnp.square(x - mean), axis=(0, 1))
        y = (x - mean) / jnp.sqrt(var + EPS) * gamma + beta
        return y, mean, var

    def loss(f):
        def value(x, gamma, beta):
            y, mean, var = f(x, gamma, beta)
            return jnp.sum(y * dy) + jnp.sum(mean * a) + jnp.sum(var * b)
        return jax.grad(value, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta))

    ours = loss(lambda x, g, b: batch_normalize(x, g, b, (0, 1), EPS, use_fast_variance, None, x.dtype))
    for got, want in zip(ours, loss(written_out)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_moving_averages_update_only_when_batch_stats_is_mutable(case):
    x, gamma, beta, _ = make_inputs(SHAPES[case], seed=2)
    bn = BatchNorm(momentum=MOMENTUM, epsilon=EPS)
    variables = module_variables(gamma, beta, x.shape[-1])
    _, updates = bn.apply(variables, jnp.asarray(x), use_running_average=False, mutable=["batch_stats"])
    _, (_, mu, var, _, _, _) = reference_forward(x, gamma, beta, EPS)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], (1 - MOMENTUM) * mu, atol=1e-12)
    np.testing.assert_allclose(updates["batch_stats"]["var"], MOMENTUM + (1 - MOMENTUM) * var, atol=1e-12)
    # Not mutable: training mode normalises with batch statistics, updates nothing.
    y = bn.apply(variables, jnp.asarray(x), use_running_average=False)
    np.testing.assert_allclose(np.asarray(y), reference_forward(x, gamma, beta, EPS)[0], atol=1e-10)


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_inference_is_the_affine_map_of_algorithm_2(case):
    x, gamma, beta, _ = make_inputs(SHAPES[case], seed=3)
    rng = np.random.RandomState(4)
    mean, var = rng.normal(size=x.shape[-1]), rng.uniform(0.5, 2.0, size=x.shape[-1])
    variables = module_variables(gamma, beta, x.shape[-1])
    variables["batch_stats"] = {"mean": jnp.asarray(mean), "var": jnp.asarray(var)}
    y = BatchNorm(epsilon=EPS).apply(variables, jnp.asarray(x), use_running_average=True)
    scale = gamma / np.sqrt(var + EPS)
    np.testing.assert_allclose(np.asarray(y), scale * x + (beta - scale * mean), atol=1e-10)


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_population_statistics_with_the_unbiased_correction(case):
    shape = SHAPES[case]
    batches = [make_inputs(shape, seed=10 + i)[0] for i in range(5)]
    bn = BatchNorm(epsilon=EPS)
    variables = module_variables(np.ones(shape[-1]), np.zeros(shape[-1]), shape[-1])
    moments = []
    for x in batches:
        _, collections = bn.apply(variables, jnp.asarray(x), use_running_average=False, mutable=[BATCH_MOMENTS])
        moments.append(collections[BATCH_MOMENTS])
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *moments)
    stats = population_statistics({"bn": stacked})["bn"]
    mean, var = reference_population(batches, EPS)
    m = int(np.prod(shape[:-1]))  # N, or N*H*W for a convolution
    assert float(stacked["count"][0]) == m
    np.testing.assert_allclose(np.asarray(stats["mean"]), mean, atol=1e-12)
    np.testing.assert_allclose(np.asarray(stats["var"]), var, atol=1e-12)


def test_population_statistics_walk_nested_models():
    moments = {
        "block": {"bn": {"mean": jnp.ones((2, 3)), "var": jnp.full((2, 3), 4.0), "count": jnp.full((2,), 5.0)}},
        "bn_out": {"mean": jnp.zeros((2, 1)), "var": jnp.ones((2, 1)), "count": jnp.full((2,), 2.0)},
    }
    stats = population_statistics(moments)
    np.testing.assert_allclose(stats["block"]["bn"]["var"], 5.0)  # 5/4 * 4
    np.testing.assert_allclose(stats["bn_out"]["var"], 2.0)  # 2/1 * 1
    assert set(stats["block"]["bn"]) == {"mean", "var"}


@pytest.mark.parametrize("use_fast_variance", [False, True])
@pytest.mark.parametrize("case", sorted(SHAPES))
def test_agrees_with_flax_linen_batchnorm(case, use_fast_variance):
    """Where both define the same thing: outputs, moving averages, inference."""
    x, _, _, _ = make_inputs(SHAPES[case], seed=5)
    x = jnp.asarray(x)
    ours = BatchNorm(momentum=MOMENTUM, epsilon=EPS, use_fast_variance=use_fast_variance)
    theirs = nn.BatchNorm(momentum=MOMENTUM, epsilon=EPS, use_fast_variance=use_fast_variance)
    variables = theirs.init(jax.random.PRNGKey(0), x, use_running_average=False)
    assert jax.tree.structure(variables) == jax.tree.structure(ours.init(jax.random.PRNGKey(0), x, False))
    y_ours, new_ours = ours.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    y_theirs, new_theirs = theirs.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y_ours, y_theirs, atol=1e-10)
    for key in ("mean", "var"):
        np.testing.assert_allclose(new_ours["batch_stats"][key], new_theirs["batch_stats"][key], atol=1e-12)
    trained = {**variables, **new_ours}
    np.testing.assert_allclose(
        ours.apply(trained, x, use_running_average=True),
        theirs.apply(trained, x, use_running_average=True),
        atol=1e-10,
    )


def test_statistics_stay_float32_for_bfloat16_inputs():
    with jax.enable_x64(False):
        x = jnp.asarray(make_inputs((16, 4))[0], jnp.bfloat16)
        bn = BatchNorm()
        variables = bn.init(jax.random.PRNGKey(0), x, use_running_average=False)
        y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        assert y.dtype == jnp.bfloat16
        assert updates["batch_stats"]["mean"].dtype == jnp.float32
        assert variables["params"]["scale"].dtype == jnp.float32


def test_scale_invariance_of_the_preceding_weights():
    """Sec. 3.3: BN(W u) = BN((aW) u), and d/d(aW) = (1/a) d/dW."""
    rng = np.random.RandomState(6)
    u, w, dy = rng.normal(size=(16, 5)), rng.normal(size=(5, 4)), rng.normal(size=(16, 4))
    bn = BatchNorm(epsilon=0.0)
    variables = module_variables(np.ones(4), np.zeros(4), 4)

    def loss(w):
        return jnp.sum(bn.apply(variables, jnp.asarray(u) @ w, use_running_average=False) * dy)

    a = 7.5
    np.testing.assert_allclose(loss(jnp.asarray(w)), loss(jnp.asarray(a * w)), rtol=1e-10)
    np.testing.assert_allclose(jax.grad(loss)(jnp.asarray(a * w)), jax.grad(loss)(jnp.asarray(w)) / a, rtol=1e-8)
