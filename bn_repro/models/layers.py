"""Building blocks of the Inception networks (Sec. 4.2, Figure 5; GoogLeNet).

Every convolution is conv -> BN -> nonlinearity when BN is on, with no conv
bias (Sec. 3.2: beta replaces it), and conv(+bias) -> nonlinearity when off.
"""

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from bn_repro.batchnorm import BatchNorm, Norm

NONLINEARITIES: dict[str, Callable[[jax.Array], jax.Array]] = {"relu": nn.relu, "sigmoid": nn.sigmoid}
# GoogLeNet's convolutions were initialised with Caffe's "xavier" filler.
KERNEL_INIT = nn.initializers.xavier_uniform()


class ConvUnit(nn.Module):
    """conv -> [BN] -> nonlinearity, 'SAME' padding.

    A network builds these through one ``functools.partial(ConvUnit, norm=...,
    act=..., dtype=...)`` (:func:`conv_unit_factory`) handed to every block, so
    its BN settings, nonlinearity and dtype are set in one place.

    Attributes:
      features: output channels.
      kernel: kernel size (square).
      stride: stride (square).
      separable_multiplier: if > 0, a depthwise convolution with this depth
        multiplier followed by a 1x1 pointwise one (Figure 5's first layer,
        per the paper's footnote); BN and the nonlinearity follow the pointwise.
      norm: the BN layer after the convolution (no convolution bias); None:
        no BN, and the convolution has a bias.
      act: the nonlinearity.
      dtype: computation dtype (parameters and BN statistics stay float32).
    """

    features: int
    kernel: int
    stride: int = 1
    separable_multiplier: int = 0
    norm: Norm | None = BatchNorm
    act: Callable[[jax.Array], jax.Array] = nn.relu
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kernel, stride = (self.kernel, self.kernel), (self.stride, self.stride)
        if self.separable_multiplier:
            channels = x.shape[-1]
            x = nn.Conv(
                channels * self.separable_multiplier, kernel, stride, feature_group_count=channels,
                use_bias=False, kernel_init=KERNEL_INIT, dtype=self.dtype, name="depthwise",
            )(x)
            kernel, stride = (1, 1), (1, 1)
        x = nn.Conv(
            self.features, kernel, stride, use_bias=self.norm is None, kernel_init=KERNEL_INIT,
            dtype=self.dtype, name="conv",
        )(x)
        if self.norm is not None:
            x = self.norm(dtype=self.dtype, name="bn")(x, use_running_average=not train)
        return self.act(x)


ConvUnitFactory = Callable[..., ConvUnit]


def conv_unit_factory(norm: Norm | None, nonlinearity: str, dtype: jnp.dtype | None) -> ConvUnitFactory:
    """``ConvUnit`` with a network's shared settings bound: its BN layer (or None),
    its nonlinearity ('relu' or 'sigmoid') and its computation dtype."""
    return functools.partial(ConvUnit, norm=norm, act=NONLINEARITIES[nonlinearity], dtype=dtype)


def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
    """Max pooling with 'SAME' padding, as the maximum of shifted strided slices.

    Same values and gradients as ``nn.max_pool(x, (w, w), (s, s), 'SAME')``;
    on XLA's CPU backend the gradient of reduce_window is ~10x slower (3x3/2
    on 32x28x28x64: 31 ms against 3 ms forward+backward, see README).
    """
    height, width = x.shape[1:3]
    out_h, out_w = -(-height // stride), -(-width // stride)
    pad_h = max((out_h - 1) * stride + window - height, 0)
    pad_w = max((out_w - 1) * stride + window - width, 0)
    padded = jnp.pad(
        x,
        ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)),
        constant_values=-jnp.inf,
    )
    result = None
    for i in range(window):
        for j in range(window):
            part = padded[:, i : i + (out_h - 1) * stride + 1 : stride, j : j + (out_w - 1) * stride + 1 : stride]
            result = part if result is None else jnp.maximum(result, part)
    return result


def avg_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
    """Average pooling with 'SAME' padding, averaging over the valid positions only."""
    return nn.avg_pool(x, (window, window), (stride, stride), padding="SAME", count_include_pad=False)


def local_response_norm(
    x: jax.Array, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0
) -> jax.Array:
    """Cross-channel LRN as in GoogLeNet (Caffe): x / (k + alpha/size * sum x^2)^beta,
    the sum over ``size`` neighbouring channels centred on each channel."""
    squared = jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32)))
    half = size // 2
    padded = jnp.pad(squared, ((0, 0), (0, 0), (0, 0), (half, size - 1 - half)))
    channels = x.shape[-1]
    window_sum = sum(padded[..., i : i + channels] for i in range(size))
    return (x / (k + alpha / size * window_sum) ** beta).astype(x.dtype)


def inception_stem(
    x: jax.Array, train: bool, width: float, unit: ConvUnitFactory, use_lrn: bool, separable_multiplier: int = 0
) -> jax.Array:
    """GoogLeNet's stem, shared by Figure 5: 7x7/2 conv 64, 3x3/2 max pool, [LRN],
    1x1 conv 64, 3x3 conv 192, [LRN], 3x3/2 max pool.

    Called from a module's compact ``__call__``; the convolutions become its
    submodules ``conv1``, ``conv2_reduce`` and ``conv2``.
    """
    x = unit(scaled(64, width), 7, 2, separable_multiplier=separable_multiplier, name="conv1")(x, train)
    x = max_pool(x, 3, 2)
    if use_lrn:
        x = local_response_norm(x)
    x = unit(scaled(64, width), 1, name="conv2_reduce")(x, train)
    x = unit(scaled(192, width), 3, name="conv2")(x, train)
    if use_lrn:
        x = local_response_norm(x)
    return max_pool(x, 3, 2)


def scaled(channels: int, width: float) -> int:
    """Channel count times the width multiplier, at least 1."""
    return max(1, int(round(channels * width)))
