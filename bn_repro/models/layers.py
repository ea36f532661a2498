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


class PointwiseConv(nn.Module):
    """A 1x1, stride-1 convolution as one matrix product over the channel axis.

    The same function and parameters as ``nn.Conv(features, (1, 1))``: a
    ``kernel`` of shape (1, 1, in, out) drawn by the same initializer from the
    same key, and ``bias``, so a checkpoint of either loads into the other.
    """

    features: int
    use_bias: bool
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", KERNEL_INIT, (1, 1, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        # As a 2-D product: with the 4-D operand, XLA:CPU transposes the output gradient for the kernel's gradient.
        y = (x.reshape(-1, x.shape[-1]) @ kernel[0, 0]).reshape(x.shape[:-1] + (self.features,))
        return y if bias is None else y + bias


class DepthwiseConv(nn.Module):
    """A depthwise convolution ('SAME', no bias) as one ordinary convolution per input channel.

    The same function and parameters as ``nn.Conv(channels * multiplier,
    kernel, stride, feature_group_count=channels, use_bias=False)``: a
    ``kernel`` of shape (k, k, 1, channels * multiplier) whose outputs
    ``c * multiplier ... (c + 1) * multiplier - 1`` read input channel ``c``.
    """

    multiplier: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels, m = x.shape[-1], self.multiplier
        kernel = self.param("kernel", KERNEL_INIT, (*self.kernel, 1, channels * m), jnp.float32)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return jnp.concatenate([
            jax.lax.conv_general_dilated(x[..., c : c + 1], kernel[..., c * m : (c + 1) * m], self.stride, "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
            for c in range(channels)
        ], axis=-1)


def cpu_formulations() -> bool:
    """Whether ConvUnits use :class:`PointwiseConv` and :class:`DepthwiseConv`
    (faster on XLA's CPU backend: README, "Speed") rather than ``nn.Conv``: on
    CPU; elsewhere ``nn.Conv``, which accelerator libraries tune."""
    return jax.default_backend() == "cpu"


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
      cpu_formulations: 1x1 stride-1 convolutions as :class:`PointwiseConv`
        and the depthwise one as :class:`DepthwiseConv` (the same functions and
        parameters); None: as :func:`cpu_formulations` decides for the backend.
    """

    features: int
    kernel: int
    stride: int = 1
    separable_multiplier: int = 0
    norm: Norm | None = BatchNorm
    act: Callable[[jax.Array], jax.Array] = nn.relu
    dtype: jnp.dtype | None = None
    cpu_formulations: bool | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kernel, stride = (self.kernel, self.kernel), (self.stride, self.stride)
        on_cpu = self.cpu_formulations if self.cpu_formulations is not None else cpu_formulations()
        if self.separable_multiplier:
            if on_cpu:
                x = DepthwiseConv(self.separable_multiplier, kernel, stride, dtype=self.dtype, name="depthwise")(x)
            else:
                channels = x.shape[-1]
                x = nn.Conv(
                    channels * self.separable_multiplier, kernel, stride, feature_group_count=channels,
                    use_bias=False, kernel_init=KERNEL_INIT, dtype=self.dtype, name="depthwise",
                )(x)
            kernel, stride = (1, 1), (1, 1)
        if kernel == (1, 1) and stride == (1, 1) and on_cpu:
            x = PointwiseConv(self.features, use_bias=self.norm is None, dtype=self.dtype, name="conv")(x)
        else:
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


def _pool_geometry(shape: tuple[int, ...], window: int, stride: int) -> tuple[int, int, tuple[int, int], tuple[int, int]]:
    """'SAME' pooling of an (N, H, W, C) shape: output height and width, padding of H and of W."""
    height, width = shape[1:3]
    out_h, out_w = -(-height // stride), -(-width // stride)
    pad_h = max((out_h - 1) * stride + window - height, 0)
    pad_w = max((out_w - 1) * stride + window - width, 0)
    return out_h, out_w, (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
    """Max pooling with 'SAME' padding, as the maximum of shifted strided slices.

    Same values and gradients as ``nn.max_pool(x, (w, w), (s, s), 'SAME')``,
    ties included: each window's gradient goes to its first maximum in
    row-major order, as XLA's select-and-scatter gives it. The forward pass
    keeps that position (an int8 per output); the backward pass sends the
    gradient there with one padded add per window offset. On XLA's CPU
    backend this is several times cheaper than reduce_window's gradient and
    than differentiating the chain of maxima (see README).
    """
    return _max_pool_forward(x, window, stride)[0]


def _max_pool_forward(x: jax.Array, window: int, stride: int) -> tuple[jax.Array, tuple[jax.Array, tuple[int, ...]]]:
    out_h, out_w, pad_h, pad_w = _pool_geometry(x.shape, window, stride)
    padded = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)), constant_values=-jnp.inf)
    result = first_max = None
    for i in range(window):
        for j in range(window):
            part = padded[:, i : i + (out_h - 1) * stride + 1 : stride, j : j + (out_w - 1) * stride + 1 : stride]
            if result is None:
                result, first_max = part, jnp.zeros(part.shape, jnp.int8)
            else:
                first_max = jnp.where(part > result, jnp.int8(i * window + j), first_max)
                result = jnp.maximum(result, part)
    return result, (first_max, x.shape)


def _max_pool_backward(window: int, stride: int, residuals: tuple, g: jax.Array) -> tuple[jax.Array]:
    first_max, shape = residuals
    out_h, out_w, pad_h, pad_w = _pool_geometry(shape, window, stride)
    padded_h, padded_w = shape[1] + sum(pad_h), shape[2] + sum(pad_w)
    zero = jnp.zeros((), g.dtype)
    grad = None
    for i in range(window):
        for j in range(window):
            # The transpose of the strided slice at offset (i, j): the selected gradients spread back with stride gaps.
            part = jax.lax.pad(jnp.where(first_max == i * window + j, g, zero), zero, (
                (0, 0, 0),
                (i, padded_h - i - (out_h - 1) * stride - 1, stride - 1),
                (j, padded_w - j - (out_w - 1) * stride - 1, stride - 1),
                (0, 0, 0),
            ))
            grad = part if grad is None else grad + part
    return (grad[:, pad_h[0] : pad_h[0] + shape[1], pad_w[0] : pad_w[0] + shape[2]],)


max_pool.defvjp(_max_pool_forward, _max_pool_backward)


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
