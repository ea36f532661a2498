"""A PyTorch peer of :class:`bn_repro.models.bn_inception.BNInception` (Figure 5).

The same network, layer for layer and with the same submodule names, for
benchmarks against PyTorch (``benchmarks/bench_model.py``) and for checking the
two numerically (``tests/test_torch_peer.py``, via :func:`load_flax_variables`).
Only the settings of BN-Inception are covered (BN, ReLU or sigmoid, no LRN).

What makes it the same function as the Flax model:

* 'SAME' padding as TF/Flax define it: out = ceil(in / stride), total padding
  max((out - 1) * stride + k - in, 0), the odd pixel on the bottom/right
  (``same_padding``); strided convolutions and pools pad explicitly (F.pad),
  symmetric cases use the layer's own padding.
* max pool pads with -inf; avg pool averages the valid positions only
  (count_include_pad=False).
* the separable stem (Figure 5's footnote): depthwise 7x7/2 with depth
  multiplier 8, then a 1x1 pointwise conv, BN and the nonlinearity after it.
* BN eps and momentum from the Flax model's ``norm`` (torch momentum = 1 - Flax
  momentum), no conv bias before BN.

One difference: in training mode torch updates ``running_var`` with the
unbiased batch variance (times m/(m-1), m = N*H*W), Flax with the biased one;
the normalisation itself (biased variance) and ``running_mean`` are identical.

torch is an optional dependency (the ``[torch]`` extra); only this module
imports it.
"""

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bn_repro.batchnorm import BatchNorm
from bn_repro.models.bn_inception import BNInception, ModuleSpec, figure5_modules
from bn_repro.models.layers import scaled

ACTIVATIONS = {"relu": F.relu, "sigmoid": torch.sigmoid}


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TF/Flax 'SAME' along one axis: the extra pixel goes after."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> tuple[torch.Tensor, int]:
    """(x padded for 'SAME', padding left for the layer): symmetric padding is left
    to the layer (returned as an int), anything else is applied here with F.pad."""
    top, bottom = same_padding(x.shape[2], kernel, stride)
    left, right = same_padding(x.shape[3], kernel, stride)
    if top == bottom == left == right:
        return x, top
    return F.pad(x, (left, right, top, bottom), value=value), 0


def max_pool_same(x: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """Max pooling, 'SAME', padding with -inf (``layers.max_pool``)."""
    x, pad = _pad_same(x, window, stride, value=-float("inf"))
    return F.max_pool2d(x, window, stride, padding=pad)


def avg_pool_same(x: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """Average pooling, 'SAME', over the valid positions only (``layers.avg_pool``)."""
    padded, pad = _pad_same(x, window, stride)
    if padded is x:
        return F.avg_pool2d(x, window, stride, padding=pad, count_include_pad=False)
    ones, _ = _pad_same(torch.ones_like(x[:1, :1]), window, stride)
    return F.avg_pool2d(padded, window, stride) / F.avg_pool2d(ones, window, stride)


class ConvUnit(nn.Module):
    """conv -> BN -> nonlinearity with 'SAME' padding (``layers.ConvUnit``); with
    ``separable_multiplier`` the conv is depthwise (that multiplier) + 1x1 pointwise."""

    def __init__(
        self, in_channels: int, features: int, kernel: int, stride: int = 1, *, use_bn: bool = True,
        nonlinearity: str = "relu", separable_multiplier: int = 0, bn_momentum: float = 0.99,
        bn_epsilon: float = 1e-3,
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.activation = kernel, stride, ACTIVATIONS[nonlinearity]
        if separable_multiplier:
            mid = in_channels * separable_multiplier
            self.depthwise = nn.Conv2d(in_channels, mid, kernel, stride, groups=in_channels, bias=False)
            self.conv = nn.Conv2d(mid, features, 1, bias=not use_bn)
        else:
            self.depthwise = None
            self.conv = nn.Conv2d(in_channels, features, kernel, stride, bias=not use_bn)
        self.bn = nn.BatchNorm2d(features, eps=bn_epsilon, momentum=1.0 - bn_momentum) if use_bn else None
        for conv in (self.depthwise, self.conv):
            if conv is not None:
                nn.init.xavier_uniform_(conv.weight)  # as layers.KERNEL_INIT

    def _conv(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        x, pad = _pad_same(x, conv.kernel_size[0], conv.stride[0])
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, pad, 1, conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.depthwise is not None:
            x = self._conv(self.depthwise, x)
        x = self._conv(self.conv, x)
        return self.activation(self.bn(x) if self.bn is not None else x)


class InceptionModule(nn.Module):
    """Figure 5's module: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3 | pool [-> 1x1 proj], concatenated."""

    def __init__(self, in_channels: int, spec: ModuleSpec, width: float, **conv_kwargs: Any) -> None:
        super().__init__()
        self.spec = spec

        def unit(name: str, cin: int, features: int, kernel: int, stride: int = 1) -> int:
            out = scaled(features, width)
            self.add_module(name, ConvUnit(cin, out, kernel, stride, **conv_kwargs))
            return out

        s, out = spec, 0
        if s.n1x1:
            out += unit("1x1", in_channels, s.n1x1, 1)
        reduce = unit("3x3_reduce", in_channels, s.n3x3_reduce, 1)
        out += unit("3x3", reduce, s.n3x3, 3, s.stride)
        reduce = unit("double_3x3_reduce", in_channels, s.double_reduce, 1)
        double = unit("double_3x3_a", reduce, s.double_3x3, 3)
        out += unit("double_3x3_b", double, s.double_3x3, 3, s.stride)
        out += unit("pool_proj", in_channels, s.pool_proj, 1) if s.pool_proj else in_channels
        self.out_channels = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, branch = self.spec, lambda name, y: self.get_submodule(name)(y)  # noqa: E731
        outputs = [branch("1x1", x)] if s.n1x1 else []
        outputs.append(branch("3x3", branch("3x3_reduce", x)))
        outputs.append(branch("double_3x3_b", branch("double_3x3_a", branch("double_3x3_reduce", x))))
        y = (max_pool_same if s.pool == "max" else avg_pool_same)(x, 3, s.stride)
        outputs.append(branch("pool_proj", y) if s.pool_proj else y)
        return torch.cat(outputs, dim=1)


class TorchBNInception(nn.Module):
    """Figure 5 in PyTorch (NCHW input): stem, modules 3a-5b, global average pool,
    dropout, linear; the attributes of ``BNInception`` except ``use_lrn`` and ``dtype``
    (use torch.autocast for bfloat16)."""

    def __init__(
        self, num_classes: int = 1000, use_bn: bool = True, nonlinearity: str = "relu",
        dropout_rate: float = 0.0, separable_stem: bool = True, pool_proj_4cd: int = 96,
        width: float = 1.0, bn_momentum: float = 0.99, bn_epsilon: float = 1e-3, in_channels: int = 3,
    ) -> None:
        super().__init__()
        kw = dict(use_bn=use_bn, nonlinearity=nonlinearity, bn_momentum=bn_momentum, bn_epsilon=bn_epsilon)
        c64, c192 = scaled(64, width), scaled(192, width)
        self.conv1 = ConvUnit(in_channels, c64, 7, 2, separable_multiplier=8 if separable_stem else 0, **kw)
        self.conv2_reduce = ConvUnit(c64, c64, 1, **kw)
        self.conv2 = ConvUnit(c64, c192, 3, **kw)
        channels = c192
        for spec in figure5_modules(pool_proj_4cd):
            module = InceptionModule(channels, spec, width, **kw)
            self.add_module(f"inception_{spec.name}", module)
            channels = module.out_channels
        self.dropout = nn.Dropout(dropout_rate)
        self.logits = nn.Linear(channels, num_classes)
        self.module_names = [f"inception_{spec.name}" for spec in figure5_modules(pool_proj_4cd)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = max_pool_same(self.conv1(x), 3, 2)
        x = max_pool_same(self.conv2(self.conv2_reduce(x)), 3, 2)
        for name in self.module_names:
            x = self.get_submodule(name)(x)
        x = self.dropout(x.mean(dim=(2, 3)))
        return self.logits(x).float()


def peer_of(model: BNInception) -> TorchBNInception:
    """The torch network with the same settings as a Flax ``BNInception`` (no LRN)."""
    if not isinstance(model, BNInception) or model.use_lrn:
        raise ValueError(f"no torch peer for {type(model).__name__} with use_lrn={getattr(model, 'use_lrn', None)}")
    fields = ("num_classes", "nonlinearity", "dropout_rate", "separable_stem", "pool_proj_4cd", "width")
    bn = {}
    if model.norm is not None:  # BatchNorm, or a functools.partial of it with the run's settings.
        settings = getattr(model.norm, "keywords", {})
        bn = {"bn_momentum": settings.get("momentum", BatchNorm.momentum),
              "bn_epsilon": settings.get("epsilon", BatchNorm.epsilon)}
    return TorchBNInception(use_bn=model.norm is not None, **bn, **{name: getattr(model, name) for name in fields})


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, (*prefix, str(key))).items()}
    return {prefix: tree}


def load_flax_variables(model: TorchBNInception, variables: Any) -> None:
    """Copies a Flax ``BNInception``'s ``{'params', 'batch_stats'}`` into ``model`` in place.

    Conv kernels (H, W, in/groups, out) become (out, in/groups, H, W), the dense
    kernel (in, out) becomes (out, in); BN scale/bias/mean/var become
    weight/bias/running_mean/running_var. Raises if any tensor is left unmatched
    or a shape differs.
    """
    names = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean", "var": "running_var"}
    targets = dict(model.named_parameters()) | {
        n: b for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))
    }
    seen = set()
    for collection in ("params", "batch_stats"):
        for path, value in _flatten(variables.get(collection, {})).items():
            name = ".".join((*path[:-1], names[path[-1]]))
            array = np.asarray(value, dtype=np.float32)
            if array.ndim == 4:
                array = array.transpose(3, 2, 0, 1)
            elif array.ndim == 2:
                array = array.T
            target = targets[name]
            if tuple(target.shape) != array.shape:
                raise ValueError(f"{name}: torch shape {tuple(target.shape)}, Flax gives {array.shape}")
            with torch.no_grad():
                target.copy_(torch.from_numpy(np.array(array, order="C")))
            seen.add(name)
    if missing := sorted(set(targets) - seen):
        raise ValueError(f"not in the Flax variables: {missing}")
