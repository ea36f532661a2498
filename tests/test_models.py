"""BN-Inception (Figure 5) and GoogLeNet: shapes, parameter counts, options, layers.

Shapes at 224x224 are checked with jax.eval_shape (nothing is computed); the
numerical tests run tiny widths and inputs.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_repro.batchnorm import BatchNorm
from bn_repro.models.bn_inception import BNInception
from bn_repro.models.googlenet import GoogLeNet
from bn_repro.models.layers import local_response_norm, max_pool

IMAGE = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)

# Figure 5's output column, with the documented corrections: 3c and 4e are
# given after their stride; 4c/4d/4e depend on the 4c/4d pool projection.
FIGURE5_OUTPUTS = {
    "conv1": (112, 112, 64),
    "conv2_reduce": (56, 56, 64),
    "conv2": (56, 56, 192),
    "inception_3a": (28, 28, 256),
    "inception_3b": (28, 28, 320),
    "inception_3c": (14, 14, 576),
    "inception_4a": (14, 14, 576),
    "inception_4b": (14, 14, 576),
    "inception_4c": (14, 14, 576),
    "inception_4d": (14, 14, 576),
    "inception_4e": (7, 7, 1024),
    "inception_5a": (7, 7, 1024),
    "inception_5b": (7, 7, 1024),
    "logits": (1000,),
}
CAFFE_LINEAGE_CHANGES = {"inception_4c": (14, 14, 608), "inception_4d": (14, 14, 608), "inception_4e": (7, 7, 1056)}
GOOGLENET_OUTPUTS = {
    "inception_3a": (28, 28, 256), "inception_3b": (28, 28, 480), "inception_4a": (14, 14, 512),
    "inception_4b": (14, 14, 512), "inception_4c": (14, 14, 512), "inception_4d": (14, 14, 528),
    "inception_4e": (14, 14, 832), "inception_5a": (7, 7, 832), "inception_5b": (7, 7, 1024), "logits": (1000,),
}


def layer_outputs(model, image=IMAGE):
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), image)
    _, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, capture_intermediates=True, mutable=["intermediates"]),
        variables, image,
    )
    shapes = {
        name: out["__call__"][0].shape[1:]
        for name, out in state["intermediates"].items()
        if isinstance(out, dict) and "__call__" in out
    }
    return variables, shapes


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("pool_proj_4cd", [96, 128])
def test_bn_inception_layer_outputs_match_figure5(pool_proj_4cd):
    _, shapes = layer_outputs(BNInception(pool_proj_4cd=pool_proj_4cd))
    expected = dict(FIGURE5_OUTPUTS, **(CAFFE_LINEAGE_CHANGES if pool_proj_4cd == 128 else {}))
    assert {k: v for k, v in shapes.items() if k in expected} == expected


def test_googlenet_layer_outputs():
    _, shapes = layer_outputs(GoogLeNet())
    assert {k: v for k, v in shapes.items() if k in GOOGLENET_OUTPUTS} == GOOGLENET_OUTPUTS


# An independent count from the printed tables: (k*k*c_in + bias) * c_out per
# conv, 2 * c_out (gamma, beta) per BN.
def conv_params(k, c_in, c_out, bn):
    return k * k * c_in * c_out + (2 * c_out if bn else c_out)


def figure5_param_count(pool_proj_4cd, bn=True, separable=True):
    rows = [  # 1x1, 3x3r, 3x3, d3x3r, d3x3, proj (0: pass through)
        (64, 64, 64, 64, 96, 32), (64, 64, 96, 64, 96, 64), (0, 128, 160, 64, 96, 0),
        (224, 64, 96, 96, 128, 128), (192, 96, 128, 96, 128, 128),
        (160, 128, 160, 128, 160, pool_proj_4cd), (96, 128, 192, 160, 192, pool_proj_4cd),
        (0, 128, 192, 192, 256, 0), (352, 192, 320, 160, 224, 128), (352, 192, 320, 192, 224, 128),
    ]
    if separable:  # depthwise 7x7 x 8 (no bias), then pointwise 1x1 24 -> 64
        total = 7 * 7 * 3 * 8 + conv_params(1, 24, 64, bn)
    else:
        total = conv_params(7, 3, 64, bn)
    total += conv_params(1, 64, 64, bn) + conv_params(3, 64, 192, bn)
    c = 192
    for n1, r3, n3, rd, nd, proj in rows:
        total += (conv_params(1, c, n1, bn) if n1 else 0) + conv_params(1, c, r3, bn) + conv_params(3, r3, n3, bn)
        total += conv_params(1, c, rd, bn) + conv_params(3, rd, nd, bn) + conv_params(3, nd, nd, bn)
        total += conv_params(1, c, proj, bn) if proj else 0
        c = n1 + n3 + nd + (proj or c)
    return total + c * 1000 + 1000


def googlenet_param_count():
    rows = [
        (64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64), (192, 96, 208, 16, 48, 64),
        (160, 112, 224, 24, 64, 64), (128, 128, 256, 24, 64, 64), (112, 144, 288, 32, 64, 64),
        (256, 160, 320, 32, 128, 128), (256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128),
    ]
    total = conv_params(7, 3, 64, False) + conv_params(1, 64, 64, False) + conv_params(3, 64, 192, False)
    c = 192
    for n1, r3, n3, r5, n5, proj in rows:
        total += conv_params(1, c, n1, False) + conv_params(1, c, r3, False) + conv_params(3, r3, n3, False)
        total += conv_params(1, c, r5, False) + conv_params(5, r5, n5, False) + conv_params(1, c, proj, False)
        c = n1 + n3 + n5 + proj
    return total + c * 1000 + 1000


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, figure5_param_count(96)),
        ({"pool_proj_4cd": 128}, figure5_param_count(128)),
        ({"separable_stem": False}, figure5_param_count(96, separable=False)),
        ({"norm": None, "use_lrn": True, "dropout_rate": 0.4}, figure5_param_count(96, bn=False)),
    ],
)
def test_bn_inception_parameter_count(kwargs, expected):
    variables, _ = layer_outputs(BNInception(**kwargs))
    assert count(variables["params"]) == expected
    assert ("batch_stats" in variables) == (kwargs.get("norm", BatchNorm) is not None)


def test_parameter_counts_in_the_expected_range():
    # PAPER.md: counting Figure 5 gives about 11.2-11.3e6 (the paper says 13.6e6).
    assert 11.1e6 < figure5_param_count(96) < figure5_param_count(128) < 11.35e6
    variables, _ = layer_outputs(GoogLeNet())
    assert count(variables["params"]) == googlenet_param_count()
    assert 6.8e6 < googlenet_param_count() < 7.1e6


def test_small_net_trains_and_keeps_float32_statistics():
    model = BNInception(num_classes=10, width=0.0625, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    variables = model.init(jax.random.PRNGKey(1), x, train=False)
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables["params"]))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updates["batch_stats"]))
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], updates["batch_stats"])
    assert all(jax.tree.leaves(changed))


@pytest.mark.parametrize("model", [
    BNInception(num_classes=7, width=0.0625, nonlinearity="sigmoid", dropout_rate=0.5, use_lrn=True),
    BNInception(num_classes=7, width=0.0625, norm=None, separable_stem=False),
    GoogLeNet(num_classes=7, width=0.0625, aux_heads=True),
])
def test_variants_run_at_small_size(model):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 40, 40, 3))
    variables = model.init(jax.random.PRNGKey(1), x, train=False)  # eager: faster than compiling here
    out = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(2)})[0]
    leaves = jax.tree.leaves(out)
    assert [leaf.shape for leaf in leaves] == [(2, 7)] * len(leaves)
    assert len(leaves) == (3 if isinstance(model, GoogLeNet) else 1)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves)


@pytest.mark.parametrize("size, window, stride", [(7, 3, 1), (8, 3, 2), (7, 3, 2), (11, 5, 3)])
def test_max_pool_matches_reduce_window_values_and_gradients(size, window, stride):
    x = jax.random.normal(jax.random.PRNGKey(size), (2, size, size, 3))  # no ties
    reference = lambda x: nn.max_pool(x, (window, window), (stride, stride), padding="SAME")  # noqa: E731
    ours = lambda x: max_pool(x, window, stride)  # noqa: E731
    np.testing.assert_array_equal(ours(x), reference(x))
    g = jax.random.normal(jax.random.PRNGKey(0), reference(x).shape)
    np.testing.assert_allclose(
        jax.grad(lambda x: jnp.sum(ours(x) * g))(x), jax.grad(lambda x: jnp.sum(reference(x) * g))(x), atol=1e-6
    )


def test_local_response_norm_matches_caffe_formula():
    x = np.random.RandomState(0).normal(size=(2, 3, 3, 8)) * 10
    expected = np.empty_like(x)
    for c in range(8):
        window = x[..., max(0, c - 2) : c + 3]
        expected[..., c] = x[..., c] / (1.0 + 1e-4 / 5 * np.sum(window**2, axis=-1)) ** 0.75
    np.testing.assert_allclose(local_response_norm(jnp.asarray(x, jnp.float32)), expected, rtol=1e-5)
