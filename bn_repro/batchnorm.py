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

    def mean_over_batch(y):
        m = jnp.mean(y, axis=axes)
        return m if axis_name is None else jax.lax.pmean(m, axis_name)

    mean = mean_over_batch(x)
    if use_fast_variance:
        var = jnp.maximum(mean_over_batch(jnp.square(x)) - jnp.square(mean), 0.0)
    else:
        var = mean_over_batch(jnp.square(x - jnp.expand_dims(mean, axes)))
    return mean, var


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
            return self._normalize(x, ra_mean.value, ra_var.value, gamma, beta)
        if self.virtual_batch_size:
            v = self.virtual_batch_size
            if x.shape[0] % v:
                raise ValueError(f"a batch of {x.shape[0]} examples cannot be cut into virtual batches of {v}")
            groups = x.reshape((x.shape[0] // v, v) + x.shape[1:])
            group_mean, group_var = batch_moments(groups, tuple(range(1, groups.ndim - 1)), self.use_fast_variance)
            stat_shape = (groups.shape[0],) + (1,) * (groups.ndim - 2) + (features,)
            y = self._normalize(groups, group_mean.reshape(stat_shape), group_var.reshape(stat_shape), gamma, beta)
            y = y.reshape(x.shape)
            mean, var = jnp.mean(group_mean, axis=0), jnp.mean(group_var, axis=0)
            count = v * (x.size // (x.shape[0] * features))
        else:
            mean, var = batch_moments(x, axes, self.use_fast_variance, self.axis_name)
            y = self._normalize(x, mean, var, gamma, beta)
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

    def _normalize(self, x: jax.Array, mean: jax.Array, var: jax.Array, gamma: jax.Array, beta: jax.Array) -> jax.Array:
        # gamma * (x - mu) / sqrt(var + eps) + beta, with the scale folded in.
        scale = gamma * jax.lax.rsqrt(var + self.epsilon)
        y = (x.astype(scale.dtype) - mean) * scale + beta
        return y.astype(self.dtype or x.dtype)


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
