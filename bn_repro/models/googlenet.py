"""GoogLeNet (Szegedy et al. 2014, arXiv:1409.4842), the 2014 "Inception".

The BN paper's baseline is Figure 5's network without BN (``BNInception(norm=None)``);
this is the original network, kept as a second reference row. Auxiliary
classifiers (at 4a and 4d, loss weight 0.3 in the original) are optional and
off by default: the BN paper does not mention them.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bn_repro.batchnorm import Norm
from bn_repro.models.layers import ConvUnitFactory, conv_unit_factory, inception_stem, max_pool, scaled


class GoogLeNetModuleSpec(NamedTuple):
    """One row of GoogLeNet's Table 1: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj."""

    name: str
    n1x1: int
    n3x3_reduce: int
    n3x3: int
    n5x5_reduce: int
    n5x5: int
    pool_proj: int


GOOGLENET_MODULES = (
    GoogLeNetModuleSpec("3a", 64, 96, 128, 16, 32, 32),
    GoogLeNetModuleSpec("3b", 128, 128, 192, 32, 96, 64),
    GoogLeNetModuleSpec("4a", 192, 96, 208, 16, 48, 64),
    GoogLeNetModuleSpec("4b", 160, 112, 224, 24, 64, 64),
    GoogLeNetModuleSpec("4c", 128, 128, 256, 24, 64, 64),
    GoogLeNetModuleSpec("4d", 112, 144, 288, 32, 64, 64),
    GoogLeNetModuleSpec("4e", 256, 160, 320, 32, 128, 128),
    GoogLeNetModuleSpec("5a", 256, 160, 320, 32, 128, 128),
    GoogLeNetModuleSpec("5b", 384, 192, 384, 48, 128, 128),
)
# Max pool 3x3/2 after these modules.
POOL_AFTER = ("3b", "4e")
AUX_AFTER = ("4a", "4d")


class GoogLeNetModule(nn.Module):
    """1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 | 3x3 max pool -> 1x1, concatenated."""

    spec: GoogLeNetModuleSpec
    unit: ConvUnitFactory
    width: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        s = self.spec

        def conv(features: int, kernel: int, name: str) -> nn.Module:
            return self.unit(scaled(features, self.width), kernel, name=name)

        return jnp.concatenate(
            [
                conv(s.n1x1, 1, "1x1")(x, train),
                conv(s.n3x3, 3, "3x3")(conv(s.n3x3_reduce, 1, "3x3_reduce")(x, train), train),
                conv(s.n5x5, 5, "5x5")(conv(s.n5x5_reduce, 1, "5x5_reduce")(x, train), train),
                conv(s.pool_proj, 1, "pool_proj")(max_pool(x, 3, 1), train),
            ],
            axis=-1,
        )


class AuxiliaryHead(nn.Module):
    """5x5/3 avg pool, 1x1 conv 128, FC 1024, dropout 0.7, linear (GoogLeNet Sec. 5)."""

    num_classes: int
    unit: ConvUnitFactory
    width: float = 1.0
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.avg_pool(x, (5, 5), (3, 3), padding="VALID") if min(x.shape[1:3]) >= 5 else x
        x = self.unit(scaled(128, self.width), 1, name="conv")(x, train)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(scaled(1024, self.width), dtype=self.dtype, name="fc")(x))
        x = nn.Dropout(0.7, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(x).astype(jnp.float32)


class GoogLeNet(nn.Module):
    """GoogLeNet: stem with LRN, modules 3a-5b, global average pool, dropout 0.4, linear.

    With ``aux_heads`` the call returns ``(logits, (aux_4a, aux_4d))``;
    otherwise just the logits. ``norm`` puts that BN layer after every
    convolution (not part of the 2014 network; None by default).
    """

    num_classes: int = 1000
    norm: Norm | None = None
    nonlinearity: str = "relu"
    dropout_rate: float = 0.4
    use_lrn: bool = True
    aux_heads: bool = False
    width: float = 1.0
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool):
        unit = conv_unit_factory(self.norm, self.nonlinearity, self.dtype)
        x = x.astype(self.dtype) if self.dtype else x
        x = inception_stem(x, train, self.width, unit, self.use_lrn)
        aux = []
        for spec in GOOGLENET_MODULES:
            x = GoogLeNetModule(spec, unit, self.width, name=f"inception_{spec.name}")(x, train)
            if self.aux_heads and spec.name in AUX_AFTER:
                aux.append(AuxiliaryHead(self.num_classes, unit, self.width, self.dtype, name=f"aux_{spec.name}")(x, train))
            if spec.name in POOL_AFTER:
                x = max_pool(x, 3, 2)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(x).astype(jnp.float32)
        return (logits, tuple(aux)) if self.aux_heads else logits
