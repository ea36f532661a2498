"""The PyTorch peer of BN-Inception (Figure 5) computes the same function as ours.

At width 1/8 on 64x64 inputs: equal parameter counts, and with the Flax
variables copied in (randomised BN statistics, scales and biases, so that eval
mode is not an identity BN) the logits agree in eval mode and in training mode
(batch statistics), as do the updated running means.
"""

import jax
import numpy as np
import pytest
import torch  # in the test extra: this test never skips

from bn_repro.models.bn_inception import BNInception
from torch_bn_inception import (  # benchmarks/, on pytest's pythonpath
    avg_pool_same,
    load_flax_variables,
    max_pool_same,
    peer_of,
)
from bn_repro.models.layers import avg_pool, max_pool

SETTINGS = dict(width=0.125, num_classes=10)


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def random_variables(model, x, seed: int = 1):
    """Variables of the shapes ``model.init`` gives (found without compiling it), drawn
    at random: kernels N(0, 1/fan_in), BN scale/bias/mean/var and biases around their
    defaults, so that eval mode is not an identity BN."""
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            return rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape).astype(np.float32)
        if name == "var":
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return ((name == "scale") + rng.normal(0, 0.1, shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def to_torch(x) -> "torch.Tensor":
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


@pytest.mark.parametrize("size,stride", [(7, 2), (8, 2), (9, 1), (6, 3)])
def test_same_pools_match_flax(size, stride):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 3))
    for ours, theirs in ((max_pool, max_pool_same), (avg_pool, avg_pool_same)):
        np.testing.assert_allclose(
            theirs(to_torch(x), 3, stride).numpy().transpose(0, 2, 3, 1), ours(x, 3, stride), rtol=1e-6, atol=1e-6
        )


def test_forward_matches_flax_in_eval_and_training_mode():
    model = BNInception(**SETTINGS)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 64, 64, 3))
    variables = random_variables(model, x)
    peer = peer_of(model)
    assert sum(p.numel() for p in peer.parameters()) == count(variables["params"])
    assert sum(b.numel() for n, b in peer.named_buffers() if "running" in n) == count(variables["batch_stats"])
    load_flax_variables(peer, variables)

    expected = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    with torch.no_grad():
        got = peer.eval()(to_torch(x)).numpy()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * scale)

    expected, updated = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    with torch.no_grad():
        got = peer.train()(to_torch(x)).numpy()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * scale)
    for name in ("conv1", "inception_4e"):
        layer = updated["batch_stats"][name]["bn"] if name == "conv1" else updated["batch_stats"][name]["3x3"]["bn"]
        bn = peer.conv1.bn if name == "conv1" else peer.inception_4e.get_submodule("3x3").bn
        np.testing.assert_allclose(bn.running_mean.numpy(), layer["mean"], rtol=1e-4, atol=1e-5)
