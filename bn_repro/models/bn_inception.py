"""BN-Inception, the network of the paper's Figure 5 (Sec. 4.2).

With ``norm=None`` (plus dropout 0.4, LRN and the original schedule) it is
the "Inception" baseline the paper compares against: the same network without
BN, with convolution biases.

Known inconsistencies of the printed table, and what the code does:

* 3c and 4e print their output before the stride: the code strides the 3x3
  conv, the second conv of the double-3x3 branch and the max pool, so 3c gives
  14x14x576 and 4e gives 7x7x1024 (or 1056, below).
* 4c and 4d sum to 608 channels with the printed pool projection of 128.
  ``pool_proj_4cd=96`` (TF-slim inception_v2, the default) gives 576, as the
  table's output column says, and 4e then gives 1024; ``128`` (the Caffe
  lineage) gives 608 and 1056.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bn_repro.batchnorm import BatchNorm, Norm
from bn_repro.models.layers import ConvUnitFactory, avg_pool, conv_unit_factory, inception_stem, max_pool, scaled


class ModuleSpec(NamedTuple):
    """One row of Figure 5: #1x1, #3x3 reduce, #3x3, double #3x3 reduce,
    double #3x3, pool type and projection (0 = pass through), stride."""

    name: str
    n1x1: int
    n3x3_reduce: int
    n3x3: int
    double_reduce: int
    double_3x3: int
    pool: str
    pool_proj: int
    stride: int = 1


def figure5_modules(pool_proj_4cd: int = 96) -> tuple[ModuleSpec, ...]:
    """The inception rows of Figure 5."""
    return (
        ModuleSpec("3a", 64, 64, 64, 64, 96, "avg", 32),
        ModuleSpec("3b", 64, 64, 96, 64, 96, "avg", 64),
        ModuleSpec("3c", 0, 128, 160, 64, 96, "max", 0, stride=2),
        ModuleSpec("4a", 224, 64, 96, 96, 128, "avg", 128),
        ModuleSpec("4b", 192, 96, 128, 96, 128, "avg", 128),
        ModuleSpec("4c", 160, 128, 160, 128, 160, "avg", pool_proj_4cd),
        ModuleSpec("4d", 96, 128, 192, 160, 192, "avg", pool_proj_4cd),
        ModuleSpec("4e", 0, 128, 192, 192, 256, "max", 0, stride=2),
        ModuleSpec("5a", 352, 192, 320, 160, 224, "avg", 128),
        ModuleSpec("5b", 352, 192, 320, 192, 224, "max", 128),
    )


class InceptionModule(nn.Module):
    """Figure 5's module: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3 | pool [-> 1x1 proj],
    concatenated along channels."""

    spec: ModuleSpec
    unit: ConvUnitFactory
    width: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        s = self.spec

        def conv(features: int, kernel: int, name: str, stride: int = 1) -> nn.Module:
            return self.unit(scaled(features, self.width), kernel, stride, name=name)

        branches = []
        if s.n1x1:
            branches.append(conv(s.n1x1, 1, "1x1")(x, train))
        y = conv(s.n3x3_reduce, 1, "3x3_reduce")(x, train)
        branches.append(conv(s.n3x3, 3, "3x3", s.stride)(y, train))
        y = conv(s.double_reduce, 1, "double_3x3_reduce")(x, train)
        y = conv(s.double_3x3, 3, "double_3x3_a")(y, train)
        branches.append(conv(s.double_3x3, 3, "double_3x3_b", s.stride)(y, train))
        pool = max_pool if s.pool == "max" else avg_pool
        y = pool(x, 3, s.stride)
        branches.append(conv(s.pool_proj, 1, "pool_proj")(y, train) if s.pool_proj else y)
        return jnp.concatenate(branches, axis=-1)


class BNInception(nn.Module):
    """Figure 5: stem, modules 3a-5b, global average pool, dropout, linear.

    Attributes:
      num_classes: outputs of the final linear layer (1000 for ImageNet).
      norm: the BN layer of every conv -> BN -> nonlinearity (a ``functools.partial``
        of ``BatchNorm`` with the run's settings); None: the Inception baseline,
        no BN and conv biases.
      nonlinearity: 'relu' or 'sigmoid' (BN-x5-Sigmoid, Inception-Sigmoid).
      dropout_rate: dropout before the classifier (0.4 in the baseline, 0 after Sec. 4.2.1).
      use_lrn: LRN (size 5, alpha 1e-4, beta 0.75) at GoogLeNet's two stem positions.
      separable_stem: the first conv as depthwise (multiplier 8) + pointwise, per the footnote.
      pool_proj_4cd: pool projection of 4c and 4d (96 as TF-slim, 128 as printed).
      width: multiplier of every layer's channel count (1 = the paper's net).
      dtype: computation dtype (bfloat16 on accelerators); parameters and BN
        statistics stay float32.
    """

    num_classes: int = 1000
    norm: Norm | None = BatchNorm
    nonlinearity: str = "relu"
    dropout_rate: float = 0.0
    use_lrn: bool = False
    separable_stem: bool = True
    pool_proj_4cd: int = 96
    width: float = 1.0
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        unit = conv_unit_factory(self.norm, self.nonlinearity, self.dtype)
        x = x.astype(self.dtype) if self.dtype else x
        x = inception_stem(x, train, self.width, unit, self.use_lrn, separable_multiplier=8 if self.separable_stem else 0)
        for spec in figure5_modules(self.pool_proj_4cd):
            x = InceptionModule(spec, unit, self.width, name=f"inception_{spec.name}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(x)
        return x.astype(jnp.float32)
