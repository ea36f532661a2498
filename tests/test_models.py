"""BN-Inception (Figure 5) and GoogLeNet: shapes, parameter counts, options, layers.

Nothing here runs a whole network. Shapes at 224x224 come from jax.eval_shape;
whether an option (nonlinearity, LRN, dropout, dtype, BN, pool type) reaches
the computation is read off the traced program (jax.make_jaxpr of the
training-mode forward pass at width 1/16): which primitives run, in which
flax module, on which dtypes. Tracing takes about a second per network;
compiling one would take far longer on this CPU.
"""

import collections
import os
import runpy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_repro import train
from bn_repro.batchnorm import BatchNorm
from bn_repro.main import load_config
from bn_repro.models.bn_inception import BNInception
from bn_repro.models.googlenet import GoogLeNet
from bn_repro.models import layers
from bn_repro.models.layers import local_response_norm, max_pool

IMAGE = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
KEY = jax.random.PRNGKey(0)

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


_INITS: dict[str, dict] = {}


def _init_trace(model, image) -> dict:
    """``jax.eval_shape`` of ``init`` with every layer's output captured, once per model and input."""
    key = f"{model!r} {image}"
    if key not in _INITS:
        init = lambda x: model.init(KEY, x, train=False, capture_intermediates=True, mutable=True)  # noqa: E731
        _INITS[key] = jax.eval_shape(init, image)
    return _INITS[key]


def init_shapes(model, image=IMAGE) -> dict:
    """The shapes and dtypes of the model's variables."""
    return {k: v for k, v in _init_trace(model, image).items() if k != "intermediates"}


def layer_outputs(model, image=IMAGE):
    shapes = {
        name: out["__call__"][0].shape[1:]
        for name, out in _init_trace(model, image)["intermediates"].items()
        if isinstance(out, dict) and "__call__" in out
    }
    return init_shapes(model, image), shapes


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
    variables = init_shapes(BNInception(**kwargs))
    assert count(variables["params"]) == expected
    assert ("batch_stats" in variables) == (kwargs.get("norm", BatchNorm) is not None)


def test_parameter_counts_in_the_expected_range():
    """PAPER.md Sec. 4: counting Figure 5 gives about 11.2-11.3e6 (the paper says
    13.6e6); GoogLeNet without auxiliary heads has about 6.8e6. Counted on the models."""
    bn_96, bn_128 = (count(init_shapes(BNInception(pool_proj_4cd=p))["params"]) for p in (96, 128))
    assert 11.1e6 < bn_96 < bn_128 < 11.35e6
    googlenet = count(init_shapes(GoogLeNet())["params"])
    assert googlenet == googlenet_param_count()
    assert 6.8e6 < googlenet < 7.1e6


# What a network computes, read off its traced training-mode forward pass
# (Sec. 4.2: every conv is conv -> BN -> nonlinearity; Figure 5's pool column;
# Sec. 4.2.1's LRN and dropout; the computation dtype).

SMALL_IMAGE = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
LRN_BETA = 0.75


def traced_equations(jaxpr, scope=""):
    """(flax module path, equation) for every equation of ``jaxpr`` and of its
    sub-jaxprs (jit, custom_jvp, ...), the path prefixed by the caller's."""
    for eqn in jaxpr.eqns:
        here = "/".join(filter(None, (scope, str(eqn.source_info.name_stack))))
        yield here, eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(inner, "eqns"):
                    yield from traced_equations(inner, here)


def literal_values(eqn) -> list[float]:
    return [float(np.asarray(v.val)) for v in eqn.invars if hasattr(v, "val") and np.ndim(v.val) == 0]


def computation(model, image=SMALL_IMAGE) -> dict:
    """What ``model`` computes in training mode, from one trace of ``init`` with
    ``train=True`` (it runs the training forward pass; only BN's moving-average
    update is skipped while initialising: see :func:`statistics_update`).

    ``units``: the module path of every conv -> [BN] -> nonlinearity unit (the
    module holding a ``conv`` convolution, or a 1x1 one as a matrix product) mapped to its nonlinearities, with
    ``bn`` whether it normalises (an rsqrt in its ``bn`` submodule);
    ``pools``: for each inception module, the pooling of its pool branch
    (``max``: maxima of shifted slices; ``avg``: a reduce_window sum);
    ``lrn``: LRN's powers x^-0.75; ``dropout``: keep probability (the
    divisor of the kept activations) of each dropout layer that runs;
    ``conv_dtypes``: operand dtypes of every convolution and matmul;
    ``params``/``stats``: dtypes of the parameters and BN statistics;
    ``outputs``: the shapes and dtypes of the network's outputs.
    """
    init = lambda x: model.init_with_output({"params": KEY, "dropout": KEY}, x, train=True)  # noqa: E731
    closed, (outputs, variables) = jax.make_jaxpr(init, return_shape=True)(image)
    equations = list(traced_equations(closed.jaxpr))
    root = type(model).__name__
    relative = lambda scope: scope[len(root) + 1 :] if scope.startswith(root + "/") else scope  # noqa: E731

    unit_scopes = {
        relative(scope).rsplit("/", 1)[0]
        for scope, eqn in equations
        if eqn.primitive.name in ("conv_general_dilated", "dot_general") and scope.endswith("/conv")
    }
    acts, rsqrt, pool_ops = collections.defaultdict(list), set(), collections.defaultdict(set)
    lrn, dropout, conv_dtypes = 0, {}, set()
    for scope, eqn in equations:
        name, scope = eqn.primitive.name, relative(scope)
        if name == "logistic":
            acts[scope].append("sigmoid")
        elif name == "max" and 0.0 in literal_values(eqn):
            acts[scope].append("relu")
        elif name == "max":
            pool_ops[scope].add("max")
        elif name == "reduce_window_sum":
            pool_ops[scope].add("avg")
        elif name == "rsqrt":
            rsqrt.add(scope)
        elif name == "pow" and LRN_BETA in literal_values(eqn):
            lrn += 1
        elif name == "div" and scope.split("/")[-1].startswith("Dropout"):
            dropout[scope] = round(literal_values(eqn)[0], 2)
        if name in ("conv_general_dilated", "dot_general"):
            conv_dtypes.update(str(v.aval.dtype) for v in eqn.invars)
    return {
        "units": {
            u: {"act": acts[u], "bn": any(f"{s}/".startswith(f"{u}/bn/") for s in rsqrt)} for u in sorted(unit_scopes)
        },
        "pools": {s: sorted(ops) for s, ops in pool_ops.items() if s.startswith("inception_") and "/" not in s},
        "lrn": lrn,
        "dropout": dropout,
        "conv_dtypes": conv_dtypes,
        "params": {str(leaf.dtype) for leaf in jax.tree.leaves(variables["params"])},
        "has_batch_stats": "batch_stats" in variables,
        "stats": {str(leaf.dtype) for leaf in jax.tree.leaves(variables.get("batch_stats", {}))},
        "outputs": [(leaf.shape, str(leaf.dtype)) for leaf in jax.tree.leaves(outputs)],
    }


def statistics_update(model, image=SMALL_IMAGE) -> tuple[set[str], bool]:
    """The dtypes of the batch statistics a training step returns, and whether
    every one of them is computed (none is its input passed through), from the
    trace of ``apply(..., train=True, mutable=['batch_stats'])``."""
    variables = init_shapes(model, image)
    forward = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": KEY})  # noqa: E731
    closed, (outputs, updates) = jax.make_jaxpr(forward, return_shape=True)(variables, image)
    inputs = {id(v) for v in closed.jaxpr.invars}
    updated = closed.jaxpr.outvars[len(jax.tree.leaves(outputs)) :]
    assert len(updated) == len(jax.tree.leaves(variables["batch_stats"])) > 0
    return {str(leaf.dtype) for leaf in jax.tree.leaves(updates)}, all(id(v) not in inputs for v in updated)


_COMPUTATIONS: dict[str, dict] = {}


def computation_of(model) -> dict:
    """``computation(model)``, traced once per model."""
    key = repr(model)
    if key not in _COMPUTATIONS:
        _COMPUTATIONS[key] = computation(model)
    return _COMPUTATIONS[key]


def expected_computation(
    c: dict, *, nonlinearity: str, bn: bool, lrn: bool, dropout: dict, dtype: str, num_classes: int, outputs: int = 1
) -> dict:
    """What ``computation`` must report for these settings (``c`` supplies the units found)."""
    return {
        "units": {u: {"act": [nonlinearity], "bn": bn} for u in c["units"]},
        "lrn": 2 if lrn else 0,  # GoogLeNet's two stem positions
        "dropout": dropout,
        "conv_dtypes": {dtype},
        "params": {"float32"},
        "has_batch_stats": bn,
        "stats": {"float32"} if bn else set(),
        "outputs": [((2, num_classes), "float32")] * outputs,
    }


def checked_part(c: dict) -> dict:
    return {k: v for k, v in c.items() if k != "pools"}


# Figure 5's pool column (PAPER.md Sec. 4), independent of figure5_modules.
FIGURE5_POOLS = {
    "3a": "avg", "3b": "avg", "3c": "max", "4a": "avg", "4b": "avg", "4c": "avg", "4d": "avg",
    "4e": "max", "5a": "avg", "5b": "max",
}
# conv -> [BN] -> nonlinearity units: 3 in the stem; in each Figure 5 module
# 1x1, 3x3 reduce, 3x3, double 3x3 reduce, two 3x3 and the pool projection
# (3c and 4e: no 1x1, no projection); in each GoogLeNet module 1x1, 3x3
# reduce, 3x3, 5x5 reduce, 5x5, projection; one per auxiliary head.
FIGURE5_UNITS = 3 + sum(7 - 2 * (m in ("3c", "4e")) for m in FIGURE5_POOLS)
GOOGLENET_UNITS = 3 + 6 * 9


def expected_units(model) -> int:
    if isinstance(model, GoogLeNet):
        return GOOGLENET_UNITS + 2 * model.aux_heads
    return FIGURE5_UNITS


TINY = dict(num_classes=7, width=1 / 16)

# Each option set once to its default and once away from it.
MODEL_CASES = {
    "bn_inception_defaults_without_bn": (
        BNInception(norm=None, **TINY),
        dict(nonlinearity="relu", bn=False, lrn=False, dropout={}, dtype="float32", num_classes=7),
    ),
    "bn_inception_all_options_changed": (
        BNInception(nonlinearity="sigmoid", use_lrn=True, dropout_rate=0.5, dtype=jnp.bfloat16, **TINY),
        dict(nonlinearity="sigmoid", bn=True, lrn=True, dropout={"Dropout_0": 0.5}, dtype="bfloat16",
             num_classes=7),
    ),
    "googlenet_defaults_with_aux_heads": (
        GoogLeNet(aux_heads=True, **TINY),
        dict(nonlinearity="relu", bn=False, lrn=True, dtype="float32", num_classes=7, outputs=3,
             dropout={"Dropout_0": 0.6, "aux_4a/Dropout_0": 0.3, "aux_4d/Dropout_0": 0.3}),
    ),
    "googlenet_all_options_changed": (
        GoogLeNet(norm=BatchNorm, nonlinearity="sigmoid", use_lrn=False, dropout_rate=0.0, dtype=jnp.bfloat16,
                  aux_heads=True, **TINY),
        dict(nonlinearity="sigmoid", bn=True, lrn=False, dtype="bfloat16", num_classes=7, outputs=3,
             dropout={"aux_4a/Dropout_0": 0.3, "aux_4d/Dropout_0": 0.3}),
    ),
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_model_options_reach_the_computation(case):
    """nonlinearity, BN, LRN, dropout, dtype and auxiliary heads change what is
    computed, not only the module's fields; parameters and BN statistics stay float32."""
    model, settings = MODEL_CASES[case]
    c = computation_of(model)
    assert checked_part(c) == expected_computation(c, **settings)
    assert len(c["units"]) == expected_units(model)


@pytest.mark.parametrize("case", ["bn_inception_defaults_without_bn", "bn_inception_all_options_changed"])
def test_bn_inception_pool_type_per_row_matches_figure5(case):
    c = computation_of(MODEL_CASES[case][0])
    assert c["pools"] == {f"inception_{m}": [kind] for m, kind in FIGURE5_POOLS.items()}


def test_googlenet_pool_branches_are_max_pools():
    """GoogLeNet's Table 1: every module's pool branch is 3x3 max pooling, then the projection."""
    c = computation_of(MODEL_CASES["googlenet_defaults_with_aux_heads"][0])
    assert c["pools"] == {f"inception_{m}": ["max"] for m in
                          ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b")}


def test_bn_statistics_stay_float32_in_a_bfloat16_net_and_are_updated():
    """Sec. 3.1: every training step updates the moving averages; in a bfloat16
    net they stay float32, as do the parameters (the convolutions run in bfloat16)."""
    model = MODEL_CASES["bn_inception_all_options_changed"][0]
    c = computation_of(model)
    assert c["conv_dtypes"] == {"bfloat16"} and c["params"] == {"float32"}
    assert all(unit["bn"] for unit in c["units"].values())
    assert statistics_update(model) == ({"float32"}, True)


# Config level: the model a run trains computes with what its config says.
IMAGENET_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "imagenet.py")
IMAGENET_VARIANTS = runpy.run_path(IMAGENET_CONFIG)["VARIANTS"]
# Every field set away from the model's default at least once: bn_x30 (the
# same network as bn_x5) in bfloat16; GoogLeNet also with every option flipped.
BFLOAT16 = ["--config.model.dtype=bfloat16"]
GOOGLENET_FLIPPED = [
    "--config.model.use_bn=True", "--config.model.nonlinearity=sigmoid", "--config.model.use_lrn=False",
    "--config.model.dropout_rate=0.2", "--config.model.aux_heads=True", *BFLOAT16,
]
CONFIG_CASES = {
    **{v: (v, BFLOAT16 if v == "bn_x30" else []) for v in IMAGENET_VARIANTS},
    "googlenet_flipped": ("googlenet", GOOGLENET_FLIPPED),
}


@pytest.mark.parametrize("variant, overrides", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_config_variant_model_computes_what_the_config_says(variant, overrides):
    config = load_config(f"{IMAGENET_CONFIG}:{variant}:small", overrides)
    m = config.model
    model = train.create_setup(config, device_count=1).model
    size = config.data.image_size
    c = computation(model, jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
    dropout = {"Dropout_0": round(1 - m.dropout_rate, 2)} if m.dropout_rate else {}
    if m.architecture == "googlenet" and m.aux_heads:
        dropout.update({"aux_4a/Dropout_0": 0.3, "aux_4d/Dropout_0": 0.3})
    expected = expected_computation(
        c, nonlinearity=m.nonlinearity, bn=m.use_bn, lrn=m.use_lrn, dropout=dropout, dtype=m.dtype,
        num_classes=m.num_classes, outputs=3 if m.architecture == "googlenet" and m.aux_heads else 1,
    )
    assert checked_part(c) == expected
    assert isinstance(model, GoogLeNet if m.architecture == "googlenet" else BNInception)
    assert len(c["units"]) == expected_units(model)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("size, window, stride", [(7, 3, 1), (8, 3, 2), (7, 3, 2), (11, 5, 3)])
def test_max_pool_matches_reduce_window_values_and_gradients(size, window, stride, ties):
    rng = np.random.default_rng(size)
    x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    if ties:  # as after a ReLU: most windows hold several equal maxima (zeros), some only zeros
        x = np.maximum(x, 0.0) * (rng.uniform(size=x.shape) < 0.3)
        x[0, : min(size, window + 1), : min(size, window + 1)] = 1.5
    out = -(-size // stride)
    g = rng.normal(size=(2, out, out, 3)).astype(np.float32)
    reference = lambda x: nn.max_pool(x, (window, window), (stride, stride), padding="SAME")  # noqa: E731
    ours = lambda x: max_pool(x, window, stride)  # noqa: E731

    @jax.jit  # one program: eager ops would each compile on their own
    def values_and_gradients(x, g):
        return [(f(x), jax.grad(lambda x: jnp.sum(f(x) * g))(x)) for f in (ours, reference)]

    (ours_y, ours_dx), (ref_y, ref_dx) = values_and_gradients(x, g)
    assert ref_y.shape == g.shape
    np.testing.assert_array_equal(ours_y, ref_y)
    np.testing.assert_allclose(ours_dx, ref_dx, atol=1e-6)


def test_local_response_norm_matches_caffe_formula():
    x = np.random.RandomState(0).normal(size=(2, 3, 3, 8)) * 10
    expected = np.empty_like(x)
    for c in range(8):
        window = x[..., max(0, c - 2) : c + 3]
        expected[..., c] = x[..., c] / (1.0 + 1e-4 / 5 * np.sum(window**2, axis=-1)) ** 0.75
    np.testing.assert_allclose(local_response_norm(jnp.asarray(x, jnp.float32)), expected, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(use_bn=True), dict(use_bn=False, separable_stem=False)])
def test_cpu_formulations_compute_the_same_with_the_same_parameters(kwargs, monkeypatch):
    """BN-Inception with its 1x1 convolutions as matrix products and its depthwise stem as one convolution per
    input channel, against ``nn.Conv`` for both: the same parameter tree and initial values (a checkpoint of one
    loads into the other), and training-mode loss, BN statistics and gradients as close to a float64 computation
    as ``nn.Conv``'s are (summation order differs; ~60 BN layers amplify float32 rounding in the gradients to
    ~1e-4 of their norm either way)."""
    model = BNInception(num_classes=10, width=0.0625, norm=BatchNorm if kwargs["use_bn"] else None,
                        **{k: v for k, v in kwargs.items() if k != "use_bn"})
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (4, 64, 64, 3)))
    labels = jnp.arange(4) % 10

    def run(cpu: bool, dtype=np.float32):
        monkeypatch.setattr(layers, "cpu_formulations", lambda: cpu)
        rngs = {"params": KEY, "dropout": KEY}
        variables = jax.jit(lambda x: model.init(rngs, x, train=False))(x.astype(np.float32))

        @jax.jit
        def loss_and_grads(variables, x):
            def loss(params):
                logits, updates = model.apply({**variables, "params": params}, x, train=True, rngs={"dropout": KEY},
                                              mutable=["batch_stats"])
                return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)), updates
            return jax.value_and_grad(loss, has_aux=True)(variables["params"])

        cast = jax.tree.map(lambda v: np.asarray(v, dtype), variables)
        equations = [eqn for _, eqn in traced_equations(jax.make_jaxpr(loss_and_grads)(cast, x).jaxpr)]
        conv = "conv_general_dilated"
        ops = [e.primitive.name + (f":groups={e.params['feature_group_count']}" if e.primitive.name == conv else "")
               for e in equations]
        (loss, stats), grads = loss_and_grads(cast, x.astype(dtype))
        return variables, [loss, *jax.tree.leaves((stats, grads))], ops

    conv_vars, conv_out, conv_ops = run(cpu=False)
    cpu_vars, cpu_out, cpu_ops = run(cpu=True)
    with jax.enable_x64(True):
        _, exact, _ = run(cpu=False, dtype=np.float64)
    assert jax.tree.structure(conv_vars) == jax.tree.structure(cpu_vars)
    for a, b in zip(jax.tree.leaves(conv_vars), jax.tree.leaves(cpu_vars)):
        np.testing.assert_array_equal(a, b)
    one_by_one = sum(1 for path, leaf in jax.tree_util.tree_flatten_with_path(conv_vars["params"])[0]
                     if path[-1].key == "kernel" and leaf.shape[:2] == (1, 1))
    assert one_by_one > 20 and cpu_ops.count("dot_general") >= conv_ops.count("dot_general") + one_by_one
    separable = model.separable_stem
    assert ("conv_general_dilated:groups=3" in conv_ops) == separable  # the depthwise stem: 3 input channels
    assert "conv_general_dilated:groups=3" not in cpu_ops

    def error(out):  # per array, relative to the float64 array's norm
        return max(np.linalg.norm(np.asarray(o, np.float64) - np.asarray(e)) / max(np.linalg.norm(np.asarray(e)), 1e-6)
                   for o, e in zip(out, exact))

    assert error(cpu_out) <= 2 * error(conv_out) + 1e-6, (error(cpu_out), error(conv_out))
