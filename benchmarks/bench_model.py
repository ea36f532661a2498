"""Training throughput of BN-Inception (Figure 5) at 224x224: ours (JAX/XLA) against PyTorch.

For each ``--precision`` one run measures, on the first JAX device and (with
``--torch``) the same device in PyTorch (cuda if available, else CPU):

* ours: OUR training step, ``train.make_streamed_step`` of ``--config`` (default
  ``configs/imagenet.py:bn_x30``) with ``--config.batch_size`` and
  ``--config.model.dtype`` set, compiled once via ``step.lower(...).compile()``;
  the compiled executable is then called with the donated state, as in training.
* torch eager: ``models.torch_bn_inception.peer_of`` the same Flax model, with
  the Flax initial weights copied in (so the first-step losses must agree),
  eager mode, cross-entropy, SGD with the config's momentum and initial
  learning rate, and torch's ``weight_decay`` = weight_decay / l2_reduction on
  conv and linear weights only (the same L2 on kernels as ours; optax adds it
  to the gradient before momentum, as torch does). bfloat16 = ``torch.autocast``.
  Run in both memory layouts (contiguous NCHW, channels_last; ``--torch_layouts``); the faster one
  is reported, both are in the JSON.
* torch compiled (``--torch_compile``, default the inductor backend in its
  default mode; ``--no-torch_compile`` skips it): the same peer, weights, batch,
  loss and optimizer, with the network under ``torch.compile`` (forward and,
  through AOTAutograd, backward) and the optimizer step eager. Compiling the
  whole step function instead (forward, loss, backward, ``optimizer.step()``;
  dynamo breaks the graph at ``backward``) ran slower than the compiled network
  in a tiny trial (width 1/16, 32x32, on a CPU under heavy load from other
  processes), as it did for the MNIST MLP (``bench_mnist.py``). Dynamo is reset
  and inductor's caches are off, so its first warm-up step compiles cold: that
  step's time is its compile s (it can take minutes on CPU). Both layouts as
  for eager, each compiled afresh. A failure to compile (no C++ compiler, an inductor error) is
  recorded in its row (``error``) and listed under the table.
* ours/this: ours' steps/s over the row's, measured in the same run.
* ``--loops jit,pmap``: ours again in each of these training loops
  (``config.parallel``, its state laid out by ``Layout.place_state``), fed the
  numpy batch every step as training feeds it, so that the transfer to the
  device counts; its compile s is its first call.
* on CPU (``--nn_conv_row``), also ours with every convolution an ``nn.Conv``:
  the formulation before ``layers.PointwiseConv``/``DepthwiseConv``.
* FLOPs per step: XLA's cost analysis of our compiled step (used for both
  implementations: the same network); achieved FLOP/s = FLOPs x steps/s.
* peak: a jitted ``--matmul_size``^3 matmul of the same dtype on the same
  device in JAX, and torch's ``a @ b`` likewise, each the best of ``--repeats``
  calls (other load only lowers a rate); the fraction of peak is of the faster.

One batch of random images in [-1, 1] and random labels stays on the device;
``--warmup`` steps (the first includes compilation for torch compiled; ours is
compiled before them) are excluded; the rate is the median over ``--repeats``
timed calls of ``--steps`` steps each.

    python benchmarks/bench_model.py --output results/bench/bn_inception_cpu.md
"""

import argparse
import contextlib
import datetime
import functools
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from bench_mnist import (  # This script's directory is on sys.path.
    add_torch_compile_flags,
    attempt,
    first_line,
    timed,
    torch_compiled,
    version,
    write_outputs,
    xla_flags_line,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMAGENET_TRAIN_IMAGES = 1_281_167


def torch_available() -> bool:
    try:
        import torch  # noqa: F401

        return True
    except (ImportError, OSError):
        return False


def matmul_gflops_jax(dtype: str, size: int, repeats: int) -> float:
    """GFLOP/s of a jitted size^3 matmul of ``dtype`` on the first JAX device (best of ``repeats``)."""
    import jax
    import jax.numpy as jnp

    a, b = (jax.random.normal(jax.random.PRNGKey(i), (size, size), jnp.float32).astype(dtype) for i in (0, 1))
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    calls = max(1, int(2e11 // (2 * size**3)))  # ~0.2 TFLOP per timed call
    return 2 * size**3 * max(timed(lambda: [f(a, b).block_until_ready() for _ in range(calls)], calls, repeats)) / 1e9


def matmul_gflops_torch(dtype: str, size: int, repeats: int, device: str) -> float:
    """GFLOP/s of torch's size^3 matmul of ``dtype`` on ``device`` (best of ``repeats``)."""
    import torch

    a, b = (torch.randn(size, size, device=device).to(getattr(torch, dtype)) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    (a @ b), sync()
    calls = max(1, int(2e11 // (2 * size**3)))

    def run() -> None:
        for _ in range(calls):
            a @ b
        sync()

    return 2 * size**3 * max(timed(run, calls, repeats)) / 1e9


@contextlib.contextmanager
def nn_conv_everywhere() -> Iterator[None]:
    """Our network with every convolution an ``nn.Conv`` (lax's convolution), as before the CPU formulations
    (``layers.PointwiseConv``, ``layers.DepthwiseConv``): the same function and parameters."""
    from bn_repro.models import layers

    chosen = layers.cpu_formulations
    layers.cpu_formulations = lambda: False
    try:
        yield
    finally:
        layers.cpu_formulations = chosen


def add_network_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that pick our network and its batch: ``--config``, ``--batch_size``, ``--image_size``, ``--set``."""
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "imagenet.py") + ":bn_x30")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, help="Override the config's (224), e.g. for smoke tests.")
    parser.add_argument("--set", action="append", default=[], metavar="--config.FIELD=VALUE",
                        help="A config override for our network (repeatable), e.g. "
                             "--set=--config.model.separable_stem=False.")


def network_config_and_batch(args: argparse.Namespace, precision: str,
                             extra: tuple[str, ...] = ()) -> tuple[Any, dict, list[str]]:
    """(the config the flags of :func:`add_network_flags` pick, computing in ``precision``, with the
    ``extra`` overrides last; one random batch of it as numpy; the overrides applied)."""
    from bn_repro import main as bn_main

    overrides = [f"--config.batch_size={args.batch_size}", f"--config.model.dtype={precision}"]
    overrides += [f"--config.data.image_size={args.image_size}"] if args.image_size else []
    overrides += [*args.set, *extra]
    config = bn_main.load_config(args.config, overrides)
    size, batch, channels = config.data.image_size, config.batch_size, config.data.channels
    data = np.random.default_rng(0)
    batch_np = {"image": data.uniform(-1, 1, (batch, size, size, channels)).astype(np.float32),
                "label": data.integers(0, config.model.num_classes, (batch,)).astype(np.int32)}
    return config, batch_np, overrides


def setup_ours(config, batch_np: dict, host_fed: bool = False) -> tuple[dict, Callable[[int], float], float, dict, Any]:
    """(Flax initial variables as numpy, run(n) -> last loss, compile s, XLA cost analysis, the step).

    The loop is ``config.parallel``'s, its state laid out as training lays it out. By default
    the batch stays on the device and the step is compiled ahead of time; ``host_fed`` hands the
    step the numpy batch every call, as the training loop does (the ``pmap`` loop is always
    host-fed: it splits the batch on the host), and it compiles at a first call on a copy of the
    state, which counts as the compile s, and no cost analysis is returned."""
    import jax
    from bn_repro import train

    setup = train.create_setup(config)
    size = config.data.image_size
    state = train.create_train_state(  # compiled_init as a classification run builds it
        jax.random.PRNGKey(0), config, setup.model, (size, size, config.data.channels), IMAGENET_TRAIN_IMAGES // config.batch_size,
        compiled_init=True,
    )
    variables = jax.tree.map(np.array, {"params": state.params, "batch_stats": state.batch_stats})
    state = setup.layout.place_state(state)
    rng = jax.random.PRNGKey(1)
    step = train.make_streamed_step(setup.layout)
    holder = {"state": state}
    start = time.perf_counter()
    if host_fed or setup.layout.pmap:
        batch = {"image": batch_np["image"], "label": batch_np["label"]}
        copy = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
        _, loss = step(copy, batch, rng)  # on a copy: the state is donated
        float(loss)
        compiled, cost = step, {}
    else:
        batch = jax.device_put({"image": batch_np["image"], "label": batch_np["label"]})
        compiled = step.lower(state, batch, rng).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    compile_s = time.perf_counter() - start

    def run(n: int) -> float:
        for _ in range(n):
            holder["state"], loss = compiled(holder["state"], batch, rng)
        return float(loss)

    return variables, run, compile_s, dict(cost), compiled


def setup_torch(model, variables: dict, config, batch_np: dict, precision: str, device: str, channels_last: bool,
                compile_spec: str | None = None) -> Callable[[int], float]:
    """run(n) -> last loss of the PyTorch peer's training step: eager, or with the network under
    ``torch_compiled(.., compile_spec)`` (compiled at the first call)."""
    import torch
    from torch_bn_inception import load_flax_variables, peer_of

    peer = peer_of(model)
    load_flax_variables(peer, variables)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    peer = peer.to(device, memory_format=layout).train()
    decay = [p for p in peer.parameters() if p.ndim > 1]
    others = [p for p in peer.parameters() if p.ndim <= 1]
    lr = config.learning_rate * config.get("lr_multiplier", 1.0)
    weight_decay = config.weight_decay / config.get("l2_reduction", 1.0)
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay}, {"params": others}],
                                lr=lr, momentum=config.momentum)
    x = torch.from_numpy(batch_np["image"].transpose(0, 3, 1, 2).copy()).to(device).contiguous(memory_format=layout)
    y = torch.from_numpy(batch_np["label"]).long().to(device)
    net = torch_compiled(peer, compile_spec) if compile_spec else peer

    def run(n: int) -> float:
        for _ in range(n):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                loss = torch.nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return float(loss.detach())  # synchronises

    return run


def measure(run: Callable[[int], float], args: argparse.Namespace) -> tuple[float, float, list[float]]:
    """(loss of the first warm-up step, its seconds, steps/s of each timed call)."""
    start = time.perf_counter()
    first = run(1)
    first_s = time.perf_counter() - start
    run(args.warmup - 1) if args.warmup > 1 else None
    return first, first_s, timed(lambda: run(args.steps), args.steps, args.repeats)


def measure_layouts(make_run: Callable[[bool], Callable[[int], float]], args: argparse.Namespace) -> dict:
    """A PyTorch peer's fields in the faster memory layout (``make_run(channels_last)`` builds it),
    the other layout's under ``other_layouts``."""
    layouts = {}
    for channels_last in [layout == "channels_last" for layout in args.torch_layouts]:
        first, first_s, rates = measure(make_run(channels_last), args)
        layouts["channels_last" if channels_last else "contiguous"] = {
            "first_loss": first, "first_step_s": first_s, "steps_per_s_each": rates}
    best = max(layouts, key=lambda k: statistics.median(layouts[k]["steps_per_s_each"]))
    return {"layout": best, **layouts[best], "other_layouts": {k: v for k, v in layouts.items() if k != best}}


def xla_cpu_threads() -> str:
    """How many threads XLA:CPU computes with: its default pool over the cores this process may use, or one."""
    if "--xla_cpu_multi_thread_eigen=false" in os.environ.get("XLA_FLAGS", ""):
        return "1 (single-threaded XLA)"
    return f"XLA default ({len(os.sched_getaffinity(0))} cores)"


def bench(precision: str, args: argparse.Namespace) -> list[dict]:
    import jax
    from bn_repro import train

    config, batch_np, _ = network_config_and_batch(args, precision)
    if config.model.architecture != "bn_inception":
        raise SystemExit(f"{args.config} is not BN-Inception")
    size, batch = config.data.image_size, config.batch_size
    device = jax.devices()[0]
    matmul_jax = matmul_gflops_jax(precision, args.matmul_size, args.repeats)
    variables, run, compile_s, cost, _ = setup_ours(config, batch_np)
    flops = float(cost["flops"])
    first, _, rates = measure(run, args)
    common = {"precision": precision, "batch_size": batch, "image_size": size, "flops_per_step": flops,
              "matmul_gflops_jax": matmul_jax, "matmul_size": args.matmul_size}
    ours = {**common, "device": f"{device.platform}: {device.device_kind}",
            "threads": xla_cpu_threads() if device.platform == "cpu" else "-", "layout": "NHWC"}
    rows = [{**ours, "implementation": "ours (JAX/XLA jit)", "compile_s": compile_s, "first_loss": first,
             "steps_per_s_each": rates, "bytes_accessed": cost.get("bytes accessed"),
             "loadavg_1min": os.getloadavg()[0]}]
    for loop in args.loops:
        loop_config, _, _ = network_config_and_batch(args, precision, [f"--config.parallel={loop}"])
        _, run_loop, compile_loop, _, _ = setup_ours(loop_config, batch_np, host_fed=True)
        first_loop, _, rates_loop = measure(run_loop, args)
        rows.append({**ours, "implementation": f"ours, {loop} loop, host-fed batch", "compile_s": compile_loop,
                     "first_loss": first_loop, "steps_per_s_each": rates_loop, "loadavg_1min": os.getloadavg()[0]})
    from bn_repro.models import layers

    if args.nn_conv_row and layers.cpu_formulations():
        with nn_conv_everywhere():
            _, run_before, compile_before, _, _ = setup_ours(config, batch_np)
            first_before, _, rates_before = measure(run_before, args)
        rows.append({**ours, "implementation": "ours, nn.Conv everywhere (before)", "compile_s": compile_before,
                     "first_loss": first_before, "steps_per_s_each": rates_before,
                     "loadavg_1min": os.getloadavg()[0]})
    if args.torch:
        import torch

        torch.set_num_threads(os.cpu_count())
        tdev = "cuda" if torch.cuda.is_available() else "cpu"
        matmul_torch = matmul_gflops_torch(precision, args.matmul_size, args.repeats, tdev)
        model = train.create_setup(config).model
        name = torch.cuda.get_device_name() if tdev == "cuda" else "cpu"
        peers = [("torch eager", None)] + ([("torch compiled", args.torch_compile)] if args.torch_compile else [])
        for implementation, spec in peers:
            make_run = functools.partial(setup_torch, model, variables, config, batch_np, precision, tdev,
                                         compile_spec=spec)
            if spec:
                fields, error = attempt(lambda: measure_layouts(make_run, args))
            else:  # eager torch failing is a bug, not a missing compiler
                fields, error = measure_layouts(make_run, args), None
            rows.append({**common, "implementation": implementation, "device": f"{tdev}: {name}",
                         "threads": str(torch.get_num_threads()) if tdev == "cpu" else "-", "torch_compile": spec,
                         "compile_s": fields["first_step_s"] if spec and fields else None, **(fields or {}),
                         "error": error, "loadavg_1min": os.getloadavg()[0]})
        for row in rows:
            row["matmul_gflops_torch"] = matmul_torch
    ours = statistics.median(rates)
    for row in rows:
        if row.get("error"):
            continue
        steps_per_s = statistics.median(row["steps_per_s_each"])
        peak = max(row["matmul_gflops_jax"], row.get("matmul_gflops_torch") or 0.0)
        row.update(steps_per_s=steps_per_s, images_per_s=steps_per_s * batch, achieved_gflops=flops * steps_per_s / 1e9,
                   peak_gflops=peak, fraction_of_peak=flops * steps_per_s / 1e9 / peak, ratio_ours=ours / steps_per_s)
    return rows


def markdown(rows: list[dict], command: str, wall_s: float, args: argparse.Namespace) -> str:
    import jax
    from bn_repro.run_records import cpu_model

    device = jax.devices()[0]
    lines = [
        f"# BN-Inception (Figure 5) training throughput, {rows[0]['image_size']}x{rows[0]['image_size']}, "
        f"batch {rows[0]['batch_size']}", "",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} available), "
        f"JAX device {device.platform} ({device.device_kind}), {platform.platform()}",
        f"- versions: python {platform.python_version()}, jax {version('jax')}, jaxlib {version('jaxlib')}, "
        f"flax {version('flax')}, torch {version('torch')}",
        xla_flags_line(),
        f"- threads: JAX/XLA {xla_cpu_threads()}; torch `set_num_threads({os.cpu_count()})`; "
        "one implementation at a time",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; total run time {wall_s:.0f} s; "
        f"1-min load average at the start {args.load_start:.1f}, at the end {os.getloadavg()[0]:.1f} "
        "(other processes share the machine)",
        f"- command: `{command}`",
        f"- config `{os.path.relpath(args.config.partition(':')[0], REPO)}:{args.config.partition(':')[2]}`; "
        "ours = the compiled `train.make_streamed_step`; torch eager = the peer "
        "(`benchmarks/torch_bn_inception.py`) with the same initial weights, SGD+momentum, L2 on weights; "
        "torch compiled = the same with the network under `torch.compile` "
        f"({args.torch_compile or 'skipped'}; optimizer step eager), compiled cold in its first warm-up step "
        f"(= its compile s); ours/this = ours' rate over the row's; "
        f"one batch kept on the device; {args.warmup} warm-up steps excluded, median (min-max) of {args.repeats} "
        f"timed calls of {args.steps} step(s); FLOPs = XLA cost analysis of our compiled step, for both; "
        f"peak = the faster of JAX's and torch's {args.matmul_size}^3 matmul of the same dtype (best of "
        f"{args.repeats} calls: contention only lowers rates).", "",
    ]
    spread = lambda r: "{:.1f} ({:.1f}-{:.1f})".format(  # noqa: E731
        r["images_per_s"], *(s * r["batch_size"] for s in (min(r["steps_per_s_each"]), max(r["steps_per_s_each"]))))
    columns = [
        ("implementation", lambda r: r["implementation"]), ("precision", lambda r: r["precision"]),
        ("device", lambda r: r["device"]), ("threads", lambda r: r["threads"]), ("layout", lambda r: r["layout"]),
        ("images/s (min-max)", spread), ("s/step", lambda r: f"{1 / r['steps_per_s']:.2f}"),
        ("GFLOPs/step (XLA)", lambda r: f"{r['flops_per_step'] / 1e9:.4g}"),
        ("achieved GFLOP/s", lambda r: f"{r['achieved_gflops']:.3g}"),
        ("matmul GFLOP/s JAX / torch", lambda r: f"{r['matmul_gflops_jax']:.0f} / "
         + (f"{r['matmul_gflops_torch']:.0f}" if r.get("matmul_gflops_torch") else "-")),
        ("fraction of peak", lambda r: f"{r['fraction_of_peak']:.3f}"),
        ("ours/this", lambda r: f"{r['ratio_ours']:.2f}"),
        ("first-step loss", lambda r: f"{r['first_loss']:.4f}"),
        ("compile s", lambda r: f"{r['compile_s']:.0f}" if r["compile_s"] is not None else "-"),
    ]
    measured = [r for r in rows if not r.get("error")]
    lines += ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in measured]
    others = [f"- {r['implementation']} {r['precision']} {k}: "
              f"{statistics.median(v['steps_per_s_each']) * r['batch_size']:.1f} images/s"
              for r in measured for k, v in r.get("other_layouts", {}).items()]
    lines += ["", "Other torch layout:", *others] if others else []
    failed = [f"- {r['implementation']} {r['precision']}: {first_line(r['error'])}" for r in rows if r.get("error")]
    lines += ["", "Not measured:", *failed] if failed else []
    if any(r["fraction_of_peak"] > 1 for r in measured):
        lines += ["", "A fraction above 1: the matmul measured here is not this dtype's peak on this device."]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_network_flags(parser)
    parser.add_argument("--precision", default="float32", help="float32, bfloat16, or both comma-separated.")
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=None,
                        help="Also measure the PyTorch peer (default: if torch imports).")
    add_torch_compile_flags(parser)
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps first (>= 1).")
    parser.add_argument("--repeats", type=int, default=5, help="Timed calls; the median is reported.")
    parser.add_argument("--steps", type=int, default=1, help="Steps per timed call.")
    parser.add_argument("--matmul_size", type=int, default=None, help="Peak matmul size (default 2048 CPU, 8192 else).")
    parser.add_argument("--nn_conv_row", action=argparse.BooleanOptionalAction, default=True,
                        help="On CPU, also time our step with nn.Conv everywhere (the formulation before).")
    parser.add_argument("--torch_layouts", type=lambda v: [x for x in v.split(",") if x],
                        default=["contiguous", "channels_last"], metavar="contiguous,channels_last",
                        help="The PyTorch peers' memory layouts to time (the faster one is reported).")
    parser.add_argument("--loops", type=lambda v: [x for x in v.split(",") if x], default=[],
                        metavar="jit,pmap", help="Also time our step in these training loops (config.parallel), "
                        "each fed the numpy batch every step as in training.")
    parser.add_argument("--output", help="Also write the Markdown here, and the JSON rows beside it (.json).")
    args = parser.parse_args(argv)
    if not args.torch_layouts or set(args.torch_layouts) - {"contiguous", "channels_last"}:
        parser.error(f"--torch_layouts: {args.torch_layouts} (give contiguous and/or channels_last)")
    if bad := [loop for loop in args.loops if loop not in ("jit", "pmap")]:
        parser.error(f"--loops: unknown {bad} (jit, pmap)")
    precisions = [p.strip() for p in args.precision.split(",")]
    if bad := [p for p in precisions if p not in ("float32", "bfloat16")]:
        parser.error(f"--precision: unknown {bad}")
    args.warmup = max(1, args.warmup)
    args.torch = torch_available() if args.torch is None else args.torch
    import jax

    if args.matmul_size is None:
        args.matmul_size = 2048 if jax.devices()[0].platform == "cpu" else 8192
    start, args.load_start = time.perf_counter(), os.getloadavg()[0]
    rows = [row for precision in precisions for row in bench(precision, args)]
    command = shlex.join(["python", os.path.relpath(os.path.abspath(__file__)), *argv])
    text = markdown(rows, command, time.perf_counter() - start, args)
    print(text)
    if args.output:
        from bn_repro.run_records import environment_info

        record = {"command": command, "environment": environment_info(command), "torch": version("torch"), "rows": rows}
        write_outputs(args.output, text, record)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
