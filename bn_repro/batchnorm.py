"""The Batch Normalizing Transform (Ioffe & Szegedy 2015, Sec. 3).

Training normalises with the statistics of the mini-batch (Algorithm 1):

    mu_B  = mean(x)                         var_B = mean((x - mu_B)^2)
    x_hat = (x - mu_B) / sqrt(var_B + eps)  y     = gamma * x_hat + beta

Moving averages of mu_B and var_B, kept in Flax's ``batch_stats`` collection,
"track the accuracy of a model as it trains" (Sec. 3.1). For the final model,
Algorithm 2 replaces them by population statistics over many training
mini-batches: E[x] = mean of mu_B, Var[x] = m/(m-1) * mean of var_B
(:func:`population_statistics`).
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Name of the collection in which BatchNorm writes each mini-batch's moments
# (mean, biased variance, and the number m of values per feature) when the
# caller makes it mutable. Algorithm 2 averages these over mini-batches.
BATCH_MOMENTS = "batch_moments"


def batch_moments(
    x: jax.Array, axes: tuple[int, ...], use_fast_variance: bool, axis_name: str | None = None
) -> tuple[jax.Array, jax.Array]:
    """Mini-batch mean and biased variance over ``axes`` (Algorithm 1).

    Computed in float32 at least, whatever the input dtype. The two-pass
    formula mean((x - mu)^2) is the paper's; the one-pass E[x^2] - E[x]^2 is
    faster and can lose precision when |mu| >> sigma. With ``axis_name``
    (inside ``pmap``) the mini-batch is the union of every device's equal
    share: the moments are averaged over that axis.
    """
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = _mean_over_batch(x, axes, axis_name)
    if use_fast_variance:
        var = jnp.maximum(_mean_over_batch(jnp.square(x), axes, axis_name) - jnp.square(mean), 0.0)
    else:
        var = _mean_over_batch(jnp.square(x - jnp.expand_dims(mean, axes)), axes, axis_name)
    return mean, var


def _mean_over_batch(v: jax.Array, axes: tuple[int, ...], axis_name: str | None) -> jax.Array:
    """The mean over ``axes``, and over every device's share with ``axis_name`` (inside ``pmap``)."""
    m = jnp.mean(v, axis=axes)
    return m if axis_name is None else jax.lax.pmean(m, axis_name)


def normalize(x: jax.Array, mean: jax.Array, var: jax.Array, gamma: jax.Array, beta: jax.Array, epsilon: float,
              dtype: Any) -> jax.Array:
    """gamma * (x - mu) / sqrt(var + eps) + beta in ``dtype``, with the scale folded in; ``mean`` and ``var``
    broadcast against ``x``."""
    scale = gamma * jax.lax.rsqrt(var + epsilon)
    y = (x.astype(scale.dtype) - mean) * scale + beta
    return y.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def batch_normalize(
    x: jax.Array, gamma: jax.Array, beta: jax.Array, axes: tuple[int, ...], epsilon: float,
    use_fast_variance: bool, axis_name: str | None, dtype: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Algorithm 1 with the mini-batch's statistics over ``axes``: (y in ``dtype``, mu_B, sigma_B^2).

    Its gradient is the closed form of the chain rule printed in Sec. 3,
    simplified (x_hat = (x - mu_B) / sqrt(sigma_B^2 + eps)):

        dL/dx = gamma / sqrt(sigma_B^2 + eps) * (dL/dy - mean(dL/dy) - x_hat * mean(dL/dy * x_hat))
        dL/dgamma = sum(dL/dy * x_hat)    dL/dbeta = sum(dL/dy)

    the means over the mini-batch (every device's share with ``axis_name``),
    the sums over every axis but the features. It takes two reductions and one
    elementwise pass over the activations, where differentiating the forward
    pass takes more; the values are the same to float rounding (tests check
    them against the printed chain rule in float64). The returned moments'
    own gradients (zero in training, where only y reaches the loss) are added
    as the two-pass variance's; with ``use_fast_variance`` that is also its
    derivative wherever the variance is not clipped at 0.
    """
    return _batch_normalize_forward(x, gamma, beta, axes, epsilon, use_fast_variance, axis_name, dtype)[0]


def _batch_normalize_forward(x, gamma, beta, axes, epsilon, use_fast_variance, axis_name, dtype):
    mean, var = batch_moments(x, axes, use_fast_variance, axis_name)
    y = normalize(x, jnp.expand_dims(mean, axes), jnp.expand_dims(var, axes), gamma, beta, epsilon, dtype)
    return (y, mean, var), (x, mean, var, gamma)


def _batch_normalize_backward(axes, epsilon, use_fast_variance, axis_name, dtype, residuals, cotangents):
    x, mean, var, gamma = residuals
    dy, dmean, dvar = cotangents
    mean_over_batch = lambda v: jnp.expand_dims(_mean_over_batch(v, axes, axis_name), axes)  # noqa: E731

    inv_std = jax.lax.rsqrt(jnp.expand_dims(var, axes) + epsilon)
    dy = dy.astype(inv_std.dtype)
    centered = x.astype(inv_std.dtype) - jnp.expand_dims(mean, axes)
    x_hat = centered * inv_std
    dx = gamma * inv_std * (dy - mean_over_batch(dy) - x_hat * mean_over_batch(dy * x_hat))
    if axis_name is not None:  # the transpose of the forward pass's pmean
        dmean, dvar = jax.lax.pmean(dmean, axis_name), jax.lax.pmean(dvar, axis_name)
    count = x.size // mean.size
    dx = dx + (jnp.expand_dims(dmean, axes) + 2.0 * jnp.expand_dims(dvar, axes) * centered) / count
    feature_sum = functools.partial(jnp.sum, axis=tuple(range(x.ndim - 1)))
    return dx.astype(x.dtype), feature_sum(dy * x_hat), feature_sum(dy)


batch_normalize.defvjp(_batch_normalize_forward, _batch_normalize_backward)


class BatchNorm(nn.Module):
    """BN over every axis but the last (features / feature maps).

    For a dense layer's (N, C) output this normalises each of the C features
    over the N examples; for a convolution's (N, H, W, C) output it normalises
    each feature map over N, H and W, so the effective mini-batch is
    m' = N*H*W (Sec. 3.2). The layer feeding BN should have no bias: beta
    takes its role (Sec. 3.2).

    Two explicit switches decide which statistics are used and whether the
    running ones change:

    * ``use_running_average=False`` (training): normalise with the
      mini-batch statistics; the moving averages are updated only when the
      caller makes ``batch_stats`` mutable, and the mini-batch moments are
      written to the ``batch_moments`` collection only when that is mutable.
    * ``use_running_average=True`` (inference): normalise with
      ``batch_stats`` (moving averages during training, or the population
      statistics of Algorithm 2 once :func:`population_statistics` has
      replaced them).

    Attributes:
      momentum: decay of the moving averages, ra <- momentum*ra +
        (1-momentum)*batch value. Not given by the paper.
      epsilon: constant added to the variance inside the square root.
      use_fast_variance: one-pass variance E[x^2]-E[x]^2 instead of the
        two-pass mean((x-mu)^2).
      dtype: dtype of the output (statistics are always float32 or wider).
      axis_name: inside ``pmap``, the device axis over which the statistics
        are synchronised (the mini-batch is every device's share together).
      virtual_batch_size: if set, training normalises each consecutive group
        of this many examples with that group's own statistics (the paper's
        per-worker mini-batch of 32, whatever the global batch and device
        count); the moving averages and the recorded moments are the means
        over the groups, and m counts one group's values.
    """

    momentum: float = 0.99
    epsilon: float = 1e-5
    use_fast_variance: bool = False
    dtype: Any = None
    axis_name: str | None = None
    virtual_batch_size: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        features = x.shape[-1]
        axes = tuple(range(x.ndim - 1))
        stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
        gamma = self.param("scale", nn.initializers.ones, (features,), stat_dtype)
        beta = self.param("bias", nn.initializers.zeros, (features,), stat_dtype)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), stat_dtype)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), stat_dtype)

        if use_running_average:
            return normalize(x, ra_mean.value, ra_var.value, gamma, beta, self.epsilon, self.dtype or x.dtype)
        if self.virtual_batch_size:
            v = self.virtual_batch_size
            if x.shape[0] % v:
                raise ValueError(f"a batch of {x.shape[0]} examples cannot be cut into virtual batches of {v}")
            groups = x.reshape((x.shape[0] // v, v) + x.shape[1:])
            y, group_mean, group_var = batch_normalize(
                groups, gamma, beta, tuple(range(1, groups.ndim - 1)), self.epsilon, self.use_fast_variance, None,
                self.dtype or x.dtype,
            )
            y = y.reshape(x.shape)
            mean, var = jnp.mean(group_mean, axis=0), jnp.mean(group_var, axis=0)
            count = v * (x.size // (x.shape[0] * features))
        else:
            y, mean, var = batch_normalize(
                x, gamma, beta, axes, self.epsilon, self.use_fast_variance, self.axis_name, self.dtype or x.dtype
            )
            devices = 1 if self.axis_name is None else jax.lax.psum(1, self.axis_name)
            count = x.size // features * devices
        if self.is_mutable_collection(BATCH_MOMENTS) and not self.is_initializing():
            self.put_variable(BATCH_MOMENTS, "mean", mean)
            self.put_variable(BATCH_MOMENTS, "var", var)
            self.put_variable(BATCH_MOMENTS, "count", jnp.asarray(count, stat_dtype))
        if self.is_mutable_collection("batch_stats") and not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
            ra_var.value = m * ra_var.value + (1.0 - m) * var
        return y


# What the models take as their normalisation layer: ``BatchNorm`` itself, or
# ``functools.partial(BatchNorm, momentum=..., epsilon=..., ...)`` built once
# per run from ``config.bn`` (``train.create_norm``); None in a model = no BN.
Norm = Callable[..., BatchNorm]


def population_statistics(moments: Any) -> Any:
    """Population statistics of Algorithm 2 from stacked mini-batch moments.

    Args:
      moments: the ``batch_moments`` collection of several training-mode
        forward passes, stacked along a new leading axis (one entry per
        mini-batch): for each BN layer ``{'mean', 'var', 'count'}``.

    Returns:
      A ``batch_stats`` tree (for each BN layer ``{'mean', 'var'}``) with
      E[x] = mean over batches of mu_B and Var[x] = m/(m-1) * mean over
      batches of var_B, where m is the number of values per feature in one
      mini-batch (N, or N*H*W for a convolution).
    """

    def layer_stats(layer: dict) -> dict:
        if set(layer) != {"mean", "var", "count"}:
            return {name: layer_stats(sub) for name, sub in layer.items()}
        m = layer["count"][0]
        return {
            "mean": jnp.mean(layer["mean"], axis=0),
            "var": m / (m - 1.0) * jnp.mean(layer["var"], axis=0),
        }

    return layer_stats(dict(moments))
