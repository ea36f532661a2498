"""The MNIST network of Sec. 4.1 as configs/mnist.py builds it: layer sizes,
biases, initial weights, the binarised input, and the tensor Figure 1(b, c) reads.

Expected values come from numpy written here, not from the library's own code.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bn_repro import mnist_experiment, train
from bn_repro.main import load_config

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "mnist.py")
IMAGES = jax.ShapeDtypeStruct((2, 28, 28), jnp.float32)
SIZES = [784, 100, 100, 100, 10]  # Sec. 4.1


def mnist_model(variant: str, overrides=()):
    config = load_config(f"{CONFIG}:{variant}", list(overrides))
    return config, train.create_setup(config, device_count=1).model


def init(model, seed: int = 0) -> dict:
    return jax.jit(lambda key: model.init(key, jnp.zeros((2, 784)), train=False))(jax.random.PRNGKey(seed))


def init_shapes(model):
    """The shapes of ``model.init``'s output and variables, nothing computed."""
    return jax.eval_shape(lambda x: model.init_with_output(jax.random.PRNGKey(0), x, train=False), IMAGES)


@pytest.mark.parametrize("variant", ["bn", "baseline"])
def test_layer_sizes_784_100_100_100_10(variant):
    _, model = mnist_model(variant)
    logits, variables = init_shapes(model)
    dense = [f"hidden{i}" for i in range(3)] + ["output"]
    assert [variables["params"][name]["kernel"].shape for name in dense] == list(zip(SIZES[:-1], SIZES[1:]))
    assert logits.shape == (2, 10)


def test_hidden_layers_have_a_bias_only_without_bn():
    """Sec. 3.2: with BN, beta replaces the bias: sigmoid(BN(W u)); without,
    sigmoid(W u + b). The output layer is linear with a bias in both nets."""
    shapes = {}
    for variant in ("bn", "baseline"):
        _, model = mnist_model(variant)
        shapes[variant] = jax.tree.map(lambda leaf: leaf.shape, init_shapes(model)[1])
    bn, baseline = shapes["bn"], shapes["baseline"]
    assert baseline["params"] == {
        **{f"hidden{i}": {"kernel": (SIZES[i], SIZES[i + 1]), "bias": (SIZES[i + 1],)} for i in range(3)},
        "output": {"kernel": (100, 10), "bias": (10,)},
    }
    assert "batch_stats" not in baseline
    assert bn["params"] == {
        **{f"hidden{i}": {"kernel": (SIZES[i], SIZES[i + 1])} for i in range(3)},
        **{f"bn{i}": {"scale": (100,), "bias": (100,)} for i in range(3)},
        "output": {"kernel": (100, 10), "bias": (10,)},
    }
    assert bn["batch_stats"] == {f"bn{i}": {"mean": (100,), "var": (100,)} for i in range(3)}


@pytest.mark.parametrize("variant, overrides, std", [
    ("bn", [], 0.01),  # configs/mnist.py: "small random Gaussian values", std 0.01
    ("baseline", ["--config.model.weight_init_std=0.05"], 0.05),
])
def test_initial_weights_are_gaussian_with_the_configured_std(variant, overrides, std):
    """Sec. 4.1: weights initialised to small random Gaussian values; the std is the config's."""
    config, model = mnist_model(variant, overrides)
    assert config.model.weight_init_std == std
    params = init(model)["params"]
    for name in ("hidden0", "hidden1", "hidden2", "output"):
        w = np.asarray(params[name]["kernel"], np.float64).ravel()
        n = w.size  # 78,400 down to 1,000 values: the sample std is within ~5/sqrt(2n) of std
        assert abs(w.std() - std) < std * 5 / np.sqrt(2 * n), name
        assert abs(w.mean()) < std * 5 / np.sqrt(n), name
        if n >= 10_000:  # Gaussian, not uniform: 68.3% within one std (uniform: 57.7%)
            assert abs(np.mean(np.abs(w) < std) - 0.683) < 0.02, name
    for name, layer in params.items():  # biases and BN's beta start at 0, gamma at 1
        if "bias" in layer:
            np.testing.assert_array_equal(layer["bias"], 0.0)
        if "scale" in layer:
            np.testing.assert_array_equal(layer["scale"], 1.0)


def test_binarisation_against_a_numpy_threshold():
    """Sec. 4.1's "28x28 binary image": threshold 0.5 of pixel/255 means pixels
    128..255 become 1 and 0..127 become 0; a negative threshold keeps grey levels."""
    pixels = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    binary = np.asarray(mnist_experiment.preprocess(jnp.asarray(pixels), 0.5))
    assert binary.shape == (4, 64) and binary.dtype == np.float32
    np.testing.assert_array_equal(binary, (np.arange(256) >= 128).reshape(4, 64).astype(np.float32))
    quarter = np.asarray(mnist_experiment.preprocess(jnp.asarray(pixels), 0.25))
    np.testing.assert_array_equal(quarter, (np.arange(256) >= 64).reshape(4, 64).astype(np.float32))
    grey = np.asarray(mnist_experiment.preprocess(jnp.asarray(pixels), -1.0))
    np.testing.assert_allclose(grey, (np.arange(256) / 255.0).reshape(4, 64), rtol=1e-6)
    assert load_config(f"{CONFIG}:bn").data.binarize_threshold == 0.5


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def numpy_forward(variables: dict, x: np.ndarray, use_bn: bool, batch_statistics: bool, eps: float):
    """Sec. 4.1's net in numpy: each hidden layer sigmoid(W u + b), or with BN
    sigmoid(gamma * (W u - mu) / sqrt(var + eps) + beta) with the batch's mu and
    (biased) var in training mode or the moving averages in inference.
    Returns the logits and the last hidden layer's sigmoid input."""
    p = {k: {n: np.asarray(v, np.float64) for n, v in layer.items()} for k, layer in variables["params"].items()}
    h = x
    for i in range(3):
        z = h @ p[f"hidden{i}"]["kernel"]
        if use_bn:
            if batch_statistics:
                mean, var = z.mean(axis=0), z.var(axis=0)
            else:
                stats = variables["batch_stats"][f"bn{i}"]
                mean, var = np.asarray(stats["mean"], np.float64), np.asarray(stats["var"], np.float64)
            z = p[f"bn{i}"]["scale"] * (z - mean) / np.sqrt(var + eps) + p[f"bn{i}"]["bias"]
        else:
            z = z + p[f"hidden{i}"]["bias"]
        h = sigmoid(z)
    return h @ p["output"]["kernel"] + p["output"]["bias"], z


def randomised(variables: dict, seed: int) -> dict:
    """The same tree with every value drawn at random (BN's gamma, beta and moving
    averages included), so that each of them shows in the outputs."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(variables)
    new = [np.asarray(rng.normal(0.0, 0.3, leaf.shape), np.float32) for leaf in leaves]
    tree = jax.tree.unflatten(treedef, new)
    if "batch_stats" in tree:
        tree["batch_stats"] = jax.tree.map(np.abs, tree["batch_stats"])  # variances must be positive
    return tree


@pytest.mark.parametrize("variant", ["bn", "baseline"])
def test_figure1_reads_the_last_hidden_layers_sigmoid_input(variant):
    """Figure 1(b, c): the 15th/50th/85th percentiles, over the test set, of the
    input of one sigmoid (config.model.tracked_unit) of the LAST hidden layer:
    W u + b without BN, BN's output gamma * x_hat + beta with BN, normalised with
    the statistics of the batch (the whole set) as in training. Accuracy and
    loss in inference mode (moving averages). All against a numpy forward pass."""
    config, model = mnist_model(variant, ["--config.model.tracked_unit=7"])
    variables = randomised(init_shapes(model)[1], seed=1)
    state = train.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.sgd(0.1),
                                    batch_stats=variables.get("batch_stats", {}))
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (50, 28, 28)).astype(np.uint8)
    labels = rng.integers(0, 10, 50)
    metrics = mnist_experiment.make_eval_step(config, virtual_batch_size=None)(state, images, labels)

    x = (images.reshape(50, 784) >= 128).astype(np.float64)  # binarised at 0.5
    use_bn, eps = variant == "bn", config.bn.epsilon
    _, sigmoid_input = numpy_forward(variables, x, use_bn, batch_statistics=True, eps=eps)
    expected = np.percentile(sigmoid_input[:, 7], [15, 50, 85])
    got = [float(metrics[f"sigmoid_input_p{q}"]) for q in (15, 50, 85)]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    other_units = np.percentile(sigmoid_input, 50, axis=0)
    assert np.sum(np.isclose(other_units, got[1], rtol=1e-4, atol=1e-4)) == 1  # one unit has this median

    logits, _ = numpy_forward(variables, x, use_bn, batch_statistics=False, eps=eps)
    assert float(metrics["test_accuracy"]) == pytest.approx(np.mean(logits.argmax(-1) == labels))
    log_softmax = logits - logits.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    assert float(metrics["test_loss"]) == pytest.approx(-np.mean(log_softmax[np.arange(50), labels]), rel=1e-4)
