"""train.train_step's loss and gradient with GoogLeNet-style auxiliary
classifiers (arXiv:1409.4842 Sec. 5: each auxiliary loss weighted 0.3),
on a tiny module, against a loss written here in numpy / jax.numpy."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bn_repro import train

LR = 0.1
AUX_WEIGHT = 0.3  # GoogLeNet's auxiliary loss weight


class WithAuxHeads(nn.Module):
    """A trunk, a main classifier and two auxiliary ones; ``aux2`` reads the input
    directly, so its parameters enter the loss through its own head only."""

    aux: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        h = jnp.tanh(nn.Dense(5, name="trunk")(x))
        logits = nn.Dense(3, name="main")(h)
        if not self.aux:
            return logits
        return logits, (nn.Dense(3, name="aux1")(h), nn.Dense(3, name="aux2")(x))


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy, written out."""
    logits = logits - logits.max(axis=-1, keepdims=True)
    log_probs = logits - jnp.log(jnp.exp(logits).sum(axis=-1, keepdims=True))
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))


def losses(model, params, batch):
    """The main and auxiliary cross-entropies (no auxiliary ones without heads)."""
    outputs = model.apply({"params": params}, batch["image"], train=True)
    logits, aux = outputs if model.aux else (outputs, ())
    return cross_entropy(logits, batch["label"]), [cross_entropy(a, batch["label"]) for a in aux]


def expected_loss(model, params, batch):
    main, aux = losses(model, params, batch)
    return main + AUX_WEIGHT * sum(aux)


@functools.cache
def one_step(aux: bool):
    """A state, a batch, the state and metrics after ``train.train_step``, and
    the reference: the loss terms, the gradient of the whole loss and of the main term alone."""
    model = WithAuxHeads(aux=aux)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "label": jnp.asarray(rng.integers(0, 3, 8))}
    params = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(batch["image"])["params"]
    state = train.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(LR), batch_stats={})
    new_state, metrics = jax.jit(train.train_step)(state, batch)

    @jax.jit
    def reference(params):
        terms = losses(model, params, batch)
        grads = jax.grad(lambda p: expected_loss(model, p, batch))(params)
        main_grads = jax.grad(lambda p: losses(model, p, batch)[0])(params)
        return terms, grads, main_grads

    return state, new_state, metrics, reference(state.params)


def test_loss_is_main_plus_0_3_times_each_auxiliary_loss():
    _, new_state, metrics, ((main, (a1, a2)), _, _) = one_step(True)
    assert a1 > 0.1 and a2 > 0.1  # the auxiliary terms are not negligible here
    assert float(metrics["loss"]) == pytest.approx(float(main) + 0.3 * (float(a1) + float(a2)), rel=1e-5)
    assert train.AUX_LOSS_WEIGHT == AUX_WEIGHT
    assert int(new_state.step) == 1


def test_cross_entropy_reference_matches_numpy():
    """The reference loss above, checked once against numpy."""
    logits = np.random.default_rng(1).normal(size=(6, 3)) * 3
    labels = np.array([0, 1, 2, 2, 1, 0])
    z = logits - logits.max(-1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(-1, keepdims=True))
    assert float(cross_entropy(jnp.asarray(logits), jnp.asarray(labels))) == pytest.approx(
        -np.mean(log_probs[np.arange(6), labels]), rel=1e-6
    )


def test_gradient_includes_the_auxiliary_losses():
    """One SGD step moves every parameter by -lr times the gradient of the
    whole loss: the trunk by main and aux1 terms, aux1 and aux2 by theirs only."""
    state, new_state, _, (_, grads, main_grads) = one_step(True)
    expected = jax.tree.map(lambda p, g: p - LR * g, state.params, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new_state.params, expected)
    for head in ("aux1", "aux2"):  # used by their auxiliary loss only
        moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new_state.params[head], state.params[head])
        assert min(jax.tree.leaves(moved)) > 1e-4, head
    # Without the auxiliary terms the trunk would move differently.
    assert not np.allclose(grads["trunk"]["kernel"], main_grads["trunk"]["kernel"], rtol=1e-3)


def test_without_auxiliary_heads_the_loss_is_the_main_cross_entropy():
    state, new_state, metrics, ((main, aux), grads, _) = one_step(False)
    assert aux == [] and float(metrics["loss"]) == pytest.approx(float(main), rel=1e-6)
    expected = jax.tree.map(lambda p, g: p - LR * g, state.params, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new_state.params, expected)
