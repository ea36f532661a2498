"""Every convolution of BN-Inception's training step on its own: ours against PyTorch's, per layer.

The layers are read from the model itself: ``--config``'s network (default
``configs/imagenet.py:bn_x30``, 224x224, batch 32) is run once under
``flax.linen.intercept_methods``, and every convolution module it calls
(``nn.Conv``, ``layers.PointwiseConv``, ``layers.DepthwiseConv``) is
recorded with its input. Identical layers (same module kind, input shape,
kernel shape and stride) are grouped and counted.

For each distinct layer, float32, one thread pool per library (JAX's default,
torch ``set_num_threads`` = the cores available):

* ours: that module, unbound and re-initialised, exactly as the model builds it
  on this backend. forward = ``jit(apply)``; input gradient and kernel gradient
  = ``jit`` of ``jax.vjp`` w.r.t. the input or the kernel alone, applied to a
  fixed output cotangent (XLA drops the unused forward).
* torch: channels_last tensors, the kernel of the same shape; forward =
  ``F.conv2d``; the gradients = ``aten.convolution_backward`` with only the
  input's or only the weight's output requested (what autograd calls). 'SAME'
  padding as the peer (``torch_bn_inception``): symmetric padding inside the
  convolution, the stride-2 layers' asymmetric padding applied to the input
  beforehand, untimed (in the peer's step it is a separate F.pad).

Times are the median of ``--repeats`` calls after one warm-up, wall clock: run
it on an otherwise idle machine. The totals weight each layer by its count: the
convolutions' share of one training step of each library (BN, pooling and the
rest excluded), without the first layer's input gradient: a training step
differentiates the parameters, not the image (shown in brackets).

    python benchmarks/bench_conv_layers.py --output results/bench/bn_inception_conv_layers_cpu.md
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench_mnist import command_line, publish, version, xla_flags_line  # This script's directory is on sys.path.
from bench_model import add_network_flags, network_config_and_batch

OPERATIONS = ("forward", "input gradient", "kernel gradient")


def conv_layers(config, image: np.ndarray) -> list[dict]:
    """The distinct convolution layers of ``config``'s network on ``image``'s shape, in call order:
    {"name" (the first such layer's path), "count", "module" (unbound), "input_shape", "kernel_shape", "stride",
    "reads_image" (the first layer called, whose input is the image)}."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from bn_repro import train
    from bn_repro.models import layers

    kinds = (nn.Conv, layers.PointwiseConv, layers.DepthwiseConv)
    found: dict[tuple, dict] = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        out = next_fun(*args, **kwargs)
        if isinstance(module, kinds) and context.method_name == "__call__":
            kernel_shape = tuple(module.variables["params"]["kernel"].shape)
            stride = getattr(module, "strides", None) or getattr(module, "stride", None) or (1, 1)
            stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
            key = (type(module).__name__, tuple(args[0].shape), kernel_shape, stride)
            if key not in found:
                found[key] = {"name": "/".join(module.scope.path), "count": 0, "module": module.clone(parent=None),
                              "kind": type(module).__name__, "input_shape": key[1], "kernel_shape": kernel_shape,
                              "output_shape": tuple(out.shape), "stride": stride, "reads_image": not found}
            found[key]["count"] += 1
        return out

    model = train.create_setup(config).model
    x = jnp.zeros(image.shape, jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"],
                                             rngs={"dropout": jax.random.PRNGKey(0)}), variables)
    return list(found.values())


def median_ms(run: Callable[[], Any], repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def ours_ms(layer: dict, repeats: int) -> dict[str, float]:
    import jax

    module = layer["module"]
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], layer["input_shape"])
    variables = module.init(keys[1], x)
    g = jax.random.normal(keys[2], layer["output_shape"])

    def apply(params, x):
        return module.apply({"params": params}, x)

    forward = jax.jit(apply)
    input_gradient = jax.jit(lambda p, x, g: jax.vjp(lambda x: apply(p, x), x)[1](g))
    kernel_gradient = jax.jit(lambda p, x, g: jax.vjp(lambda p: apply(p, x), p)[1](g))
    params = variables["params"]
    calls = {"forward": lambda: forward(params, x), "input gradient": lambda: input_gradient(params, x, g),
             "kernel gradient": lambda: kernel_gradient(params, x, g)}
    return {op: median_ms(lambda: jax.block_until_ready(calls[op]()), repeats) for op in OPERATIONS}


def torch_ms(layer: dict, repeats: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F
    from torch_bn_inception import same_padding

    n, h, w, c = layer["input_shape"]
    kh, kw, c_per_group, features = layer["kernel_shape"]
    groups = c // c_per_group
    stride = layer["stride"]
    (top, bottom), (left, right) = same_padding(h, kh, stride[0]), same_padding(w, kw, stride[1])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=generator).contiguous(memory_format=torch.channels_last)
    if top == bottom == left == right:
        padding = (top, left)
    else:
        x, padding = F.pad(x, (left, right, top, bottom)).contiguous(memory_format=torch.channels_last), (0, 0)
    weight = torch.randn(features, c_per_group, kh, kw, generator=generator).contiguous(
        memory_format=torch.channels_last)
    g = torch.randn(n, features, *layer["output_shape"][1:3], generator=generator).contiguous(
        memory_format=torch.channels_last)

    def backward(mask: list[bool]):
        return torch.ops.aten.convolution_backward(g, x, weight, None, list(stride), list(padding), [1, 1], False,
                                                   [0, 0], groups, mask)

    calls = {"forward": lambda: F.conv2d(x, weight, None, stride, padding, 1, groups),
             "input gradient": lambda: backward([True, False, False]),
             "kernel gradient": lambda: backward([False, True, False])}
    with torch.no_grad():
        return {op: median_ms(calls[op], repeats) for op in OPERATIONS}


def in_step(row: dict, operation: str) -> bool:
    """Whether a training step computes ``operation`` for the layer: all but the image's gradient."""
    return not (row["reads_image"] and operation == "input gradient")


def bench(args: argparse.Namespace) -> dict:
    import jax
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    config, batch, _ = network_config_and_batch(args, "float32")
    layers = conv_layers(config, batch["image"])
    rows = []
    for layer in layers:
        n, ho, wo, features = layer["output_shape"]
        kh, kw, c_per_group, _ = layer["kernel_shape"]
        row = {key: layer[key] for key in ("name", "count", "kind", "input_shape", "kernel_shape", "stride",
                                           "reads_image")}
        row["gflop_forward"] = 2 * n * ho * wo * features * kh * kw * c_per_group / 1e9
        row["ours_ms"], row["torch_ms"] = ours_ms(layer, args.repeats), torch_ms(layer, args.repeats)
        rows.append(row)
        print(f"{row['name']}: ours {row['ours_ms']} torch {row['torch_ms']}", file=sys.stderr, flush=True)
    totals = {who: {op: sum(r["count"] * r[f"{who}_ms"][op] for r in rows if in_step(r, op)) for op in OPERATIONS}
              for who in ("ours", "torch")}
    return {"image_size": config.data.image_size, "batch_size": config.batch_size, "layers": rows, "totals_ms": totals,
            "jax_device": str(jax.devices()[0]), "torch_threads": torch.get_num_threads()}


def markdown(record: dict, command: str, wall_s: float) -> str:
    from bn_repro.run_records import cpu_model

    size, batch = record["image_size"], record["batch_size"]
    lines = [
        f"# BN-Inception's convolutions one by one, {size}x{size}, batch {batch}, float32: ours against PyTorch", "",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} available), "
        f"{platform.platform()}; JAX device {record['jax_device']}",
        f"- versions: jax {version('jax')}, jaxlib {version('jaxlib')}, flax {version('flax')}, torch {version('torch')}"
        f" (oneDNN); torch threads {record['torch_threads']}, XLA its default pool",
        xla_flags_line(),
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; total run time {wall_s:.0f} s; 1-min load "
        f"average at the end {os.getloadavg()[0]:.1f}",
        f"- command: `{command}`",
        "- ms = median wall time of one call; fwd / dx / dW = forward, input gradient, kernel gradient; "
        "ours = the layer's module as the model builds it on this backend; torch = F.conv2d and "
        "aten.convolution_backward, channels_last; x n = layers of this shape in the network; [bracketed]: the "
        "image's gradient, which a training step does not compute (left out of the totals and ratios)", "",
        "| layer (first of its shape) | x n | ours: module | input | kernel | stride | GFLOP fwd | ours fwd / dx / dW ms "
        "| torch fwd / dx / dW ms | ours/torch (fwd+dx+dW) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["layers"]:
        ours, peer = r["ours_ms"], r["torch_ms"]
        ratio = (sum(ours[op] for op in OPERATIONS if in_step(r, op))
                 / sum(peer[op] for op in OPERATIONS if in_step(r, op)))

        def times(ms: dict) -> str:
            return " / ".join(f"{ms[op]:.1f}" if in_step(r, op) else f"[{ms[op]:.1f}]" for op in OPERATIONS)
        lines.append(
            f"| {r['name']} | {r['count']} | {r['kind']} | {'x'.join(map(str, r['input_shape']))} | "
            f"{'x'.join(map(str, r['kernel_shape']))} | {r['stride'][0]} | {r['gflop_forward']:.2f} | "
            + times(ours) + " | " + times(peer) + f" | {ratio:.2f} |")
    totals = record["totals_ms"]
    lines += ["", "Totals over the network (each layer times its count), ms per training step:", "",
              "| | forward | input gradient | kernel gradient | all |", "|---|---|---|---|---|"]
    for who in ("ours", "torch"):
        lines.append(f"| {who} | " + " | ".join(f"{totals[who][op]:.0f}" for op in OPERATIONS)
                     + f" | {sum(totals[who].values()):.0f} |")
    lines.append("| ours/torch | " + " | ".join(f"{totals['ours'][op] / totals['torch'][op]:.2f}" for op in OPERATIONS)
                 + f" | {sum(totals['ours'].values()) / sum(totals['torch'].values()):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_network_flags(parser)
    parser.add_argument("--repeats", type=int, default=5, help="Timed calls per operation (median reported).")
    parser.add_argument("--output", help="Also write the Markdown here, and the JSON beside it (.json).")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    record = bench(args)
    command = command_line(__file__, argv)
    publish(markdown(record, command, time.perf_counter() - start), args.output, {"command": command, **record})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
