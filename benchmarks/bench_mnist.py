"""CPU speed of the MNIST training loop against PyTorch and the arithmetic ceiling.

For the 784-100-100-100-10 sigmoid MLP (batch 60, ``configs/mnist.py:bn`` and
``:baseline``) one run measures, per thread setting:

* ours: steps/s of ``bn_repro.mnist_experiment.make_train_chunk`` (the real jitted lax.scan
  sampling batches on the device) on synthetic uint8 data of MNIST's shape;
  compiled first, then the median of ``--repeats`` calls of ``--steps`` steps.
* torch eager (optional): an eager PyTorch loop doing the identical step (init
  std, bias-free Linear + BatchNorm1d before each sigmoid, binarised input,
  per-epoch permutation of a preloaded uint8 tensor, SGD with the config's
  cosine lr, momentum and weight decay on Linear weights only, cross-entropy).
  Its first ``min(--steps, 500)`` steps are an untimed warm-up, then the median
  of ``--repeats`` calls of ``--steps`` steps, as ours.
* torch compiled (optional, ``--torch_compile``, default the inductor backend
  in its default mode): the same loop, same seed and so the same initial
  weights and batches (its first-step loss must equal eager's), with the
  network under ``torch.compile`` (forward and, through AOTAutograd, backward)
  and the optimizer step eager. Compiling the whole step function instead
  (data gather, forward, loss, backward, ``optimizer.step()``: dynamo breaks the
  graph at ``backward``) took longer to compile and ran about a third slower
  in tiny trials (1 thread, under heavy load from other processes), where the
  compiled network was about as fast as eager or a little faster, and
  ``mode="max-autotune-no-cudagraphs"`` no faster than the default. Dynamo is
  reset and inductor's caches are off, so the first step compiles cold (the
  script uses no JAX compilation cache either): that step's time is the
  compiled peer's compile s, and it is the first of the same warm-up. A
  failure to compile (no C++ compiler, an inductor error) is recorded in the
  row instead of its rates.
* the ceiling: XLA's cost-analysis FLOPs of one jitted ``train.train_step``
  (checked against a hand count of the matmul FLOPs) and a float32 1024^3 matmul
  rate at the same thread setting; ceiling steps/s = rate / FLOPs. Also the
  steps/s of the step's seven matmuls alone at their batch-60 shapes, in a scan.

Threads: 1 = one pinned core, single-threaded XLA (as ``reproduce_figure1.py``
runs each net); N = the first N cores, XLA's default threading,
``torch.set_num_threads(N)`` (for inductor's kernels too). XLA flags must be
set before jax is imported, so each setting runs in a child process of this
script.

    python benchmarks/bench_mnist.py --output results/bench/mnist_cpu.md
"""

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bn_repro.sweep import SINGLE_THREAD_XLA  # imports no JAX: the flags below are set before it starts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETS = ("baseline", "bn")
MARKER = "BENCH_JSON "


def add_torch_compile_flags(parser: argparse.ArgumentParser) -> None:
    """``--torch_compile BACKEND[:MODE]`` (default inductor) and ``--no-torch_compile``, which skips that peer."""
    parser.add_argument("--torch_compile", "--torch-compile", default="inductor", metavar="BACKEND[:MODE]",
                        help="torch.compile backend of the compiled PyTorch peer, optionally with a mode, e.g. "
                             "inductor:max-autotune-no-cudagraphs (default: inductor, default mode).")
    parser.add_argument("--no-torch_compile", "--no-torch-compile", dest="torch_compile", action="store_const",
                        const=None, help="Skip the torch.compile'd PyTorch peer.")


def torch_compiled(module: Any, spec: str) -> Any:
    """``torch.compile(module)`` with ``spec`` = 'BACKEND[:MODE]', set to compile cold at its first
    call: dynamo's compiled code is reset and inductor's on-disk caches are off."""
    import torch

    backend, _, mode = spec.partition(":")
    torch._dynamo.reset()
    torch.compiler.config.force_disable_caches = True
    return torch.compile(module, backend=backend, mode=mode or None)


def attempt(measure: Callable[[], Any]) -> tuple[Any, str | None]:
    """(measure(), None), or (None, the error) if it raises: a compiled peer that fails to
    compile (no C++ compiler, an inductor error) is recorded, not fatal to the benchmark."""
    try:
        return measure(), None
    except Exception as error:  # noqa: BLE001 - whatever torch.compile raises
        return None, f"{type(error).__name__}: {error}"


def first_line(error: str, limit: int = 300) -> str:
    """An error message shortened for a Markdown line (the JSON keeps it whole)."""
    line = error.strip().splitlines()[0] if error.strip() else error
    return line if len(line) <= limit else line[:limit] + "..."


def timed(run: Callable[[], None], steps: int, repeats: int) -> list[float]:
    """steps/s of each of ``repeats`` calls of ``run`` (each doing ``steps`` steps)."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        rates.append(steps / (time.perf_counter() - start))
    return rates


def hand_flops(config, batch: int, input_dim: int = 784) -> int:
    """Matmul FLOPs of one step: forward, weight gradients (= forward), input gradients but the first layer's."""
    dims = [input_dim, *config.model.hidden_units, config.model.num_classes]
    forward = 2 * batch * sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    return 3 * forward - 2 * batch * dims[0] * dims[1]


def bench_ours(config, images, labels, steps: int, repeats: int) -> tuple[list[float], float]:
    """(steps/s of each call, compile + first call s) of make_train_chunk."""
    import jax
    from bn_repro import mnist_experiment, train

    setup = train.create_setup(config)
    chunk = mnist_experiment.make_train_chunk(config, setup.layout)
    steps_per_epoch = images.shape[0] // config.batch_size
    state = train.create_train_state(jax.random.PRNGKey(0), config, setup.model, (28, 28), steps_per_epoch)
    rng = jax.random.PRNGKey(1)
    holder = {"state": state, "order": mnist_experiment.no_epoch_order(images.shape[0]), "step": 0}

    def run() -> None:
        holder["state"], holder["order"], losses = chunk(
            holder["state"], holder["order"], images, labels, rng, holder["step"], num_steps=steps
        )
        losses.block_until_ready()
        holder["step"] += steps

    start = time.perf_counter()
    run()
    compile_s = time.perf_counter() - start
    return timed(run, steps, repeats), compile_s


def bench_torch(config, images_np, labels_np, steps: int, repeats: int, compile_spec: str | None = None
                ) -> tuple[list[float], float, float]:
    """(steps/s of each call, first-step loss, first-step s) of the identical training loop in
    PyTorch: eager, or with the network under ``torch_compiled(.., compile_spec)``."""
    import torch

    torch.manual_seed(0)
    layers: list = []
    fan_in = 784
    for width in config.model.hidden_units:
        layers.append(torch.nn.Linear(fan_in, width, bias=not config.model.use_bn))
        if config.model.use_bn:
            layers.append(torch.nn.BatchNorm1d(width, eps=config.bn.epsilon, momentum=1.0 - config.bn.momentum))
        layers.append(torch.nn.Sigmoid())
        fan_in = width
    layers.append(torch.nn.Linear(fan_in, config.model.num_classes))
    model = torch.nn.Sequential(*layers).train()
    weights, others = [], []
    for module in model:
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=config.model.weight_init_std)
            weights.append(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
                others.append(module.bias)
        elif isinstance(module, torch.nn.BatchNorm1d):
            others.extend([module.weight, module.bias])
    optimizer = torch.optim.SGD(
        [{"params": weights, "weight_decay": config.weight_decay}, {"params": others, "weight_decay": 0.0}],
        lr=config.learning_rate, momentum=config.momentum,
    )
    net = torch_compiled(model, compile_spec) if compile_spec else model
    images, labels = torch.from_numpy(images_np), torch.from_numpy(labels_np).long()
    n, batch, threshold = images.shape[0], config.batch_size, config.data.binarize_threshold
    steps_per_epoch, total = n // batch, config.num_steps
    cosine = config.lr_schedule == "cosine"
    holder = {"step": 0, "order": torch.randperm(n)}

    def run(num_steps: int = steps) -> np.ndarray:  # the losses
        losses = []
        for step in range(holder["step"], holder["step"] + num_steps):
            position = step % steps_per_epoch
            if position == 0:
                holder["order"] = torch.randperm(n)
            if cosine:
                lr = config.learning_rate * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
                for group in optimizer.param_groups:
                    group["lr"] = lr
            index = holder["order"][position * batch : (position + 1) * batch]
            x = (images[index].reshape(batch, -1).float() / 255.0 > threshold).float()
            loss = torch.nn.functional.cross_entropy(net(x), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        holder["step"] += num_steps
        return torch.stack(losses).numpy()

    start = time.perf_counter()
    first_loss = float(run(1)[0])  # compiles the compiled peer
    first_s = time.perf_counter() - start
    run(min(steps, 500) - 1) if steps > 1 else None  # the rest of the warm-up
    return timed(run, steps, repeats), first_loss, first_s


def xla_flops(config) -> float:
    """FLOPs of one jitted train_step on a (60, 784) float32 batch, from XLA's cost analysis."""
    import jax
    import jax.numpy as jnp
    from bn_repro import train

    state = train.create_train_state(jax.random.PRNGKey(0), config, train.create_setup(config).model, (784,), 1000)
    batch = {"image": jnp.zeros((config.batch_size, 784), jnp.float32),
             "label": jnp.zeros((config.batch_size,), jnp.int32)}
    cost = jax.jit(train.train_step).lower(state, batch).compile().cost_analysis()
    costs = cost if isinstance(cost, (list, tuple)) else [cost]
    return float(sum(c.get("flops", 0.0) for c in costs))


def matmul_rates(config, repeats: int) -> dict:
    """GFLOP/s of a 1024^3 float32 matmul, and steps/s of a step's matmuls alone at batch-60 shapes."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (1024, 1024), jnp.float32)
    big = jax.jit(lambda x, y: x @ y)
    big(a, a).block_until_ready()
    calls = 20
    rate = statistics.median(timed(lambda: [big(a, a).block_until_ready() for _ in range(calls)], calls, repeats))
    dims = [784, *config.model.hidden_units, config.model.num_classes]
    keys = jax.random.split(jax.random.PRNGKey(1), len(dims))
    ws = tuple(0.01 * jax.random.normal(k, s) for k, s in zip(keys, zip(dims[:-1], dims[1:])))
    x = (jax.random.uniform(keys[-1], (config.batch_size, 784)) > 0.5).astype(jnp.float32)

    def body(ws, _):  # the forward, weight-gradient and input-gradient matmuls of one step
        acts = [x]
        for w in ws:
            acts.append(acts[-1] @ w)
        g, grads = acts[-1], [None] * len(ws)
        for i in reversed(range(len(ws))):
            grads[i] = acts[i].T @ g
            if i:
                g = g @ ws[i].T
        return tuple(w - 1e-6 * gw for w, gw in zip(ws, grads)), None

    iters = 2000
    chain = jax.jit(lambda ws: jax.lax.scan(body, ws, None, length=iters)[0])
    jax.block_until_ready(chain(ws))
    chain_rate = statistics.median(timed(lambda: jax.block_until_ready(chain(ws)), iters, repeats))
    return {"matmul_gflops": 2 * 1024**3 * rate / 1e9, "matmul_only_steps_per_s": chain_rate}


def torch_fields(peer: str, result: tuple | None, error: str | None, ours: float) -> dict:
    """A row's fields of the PyTorch ``peer`` ('torch' eager or 'torch_compiled') from ``bench_torch``'s result."""
    rates, first_loss, first_s = result or (None, None, None)
    rate = rates and statistics.median(rates)
    return {f"{peer}_steps_per_s": rate, f"{peer}_each_call": rates, f"{peer}_first_loss": first_loss,
            f"{peer}_first_step_s": first_s, f"{peer}_error": error, f"ratio_ours_{peer}": rate and ours / rate}


def child(threads: int, steps: int, repeats: int, torch_compile: str | None) -> list[dict]:
    """All measurements at one thread setting (already applied by the parent)."""
    from bn_repro.main import load_config

    rng = np.random.default_rng(0)
    images_np = rng.integers(0, 256, (60000, 28, 28), dtype=np.uint8)
    labels_np = rng.integers(0, 10, (60000,), dtype=np.int32)
    try:
        import torch

        torch.set_num_threads(threads)
        torch_error = None
    except (ImportError, OSError) as error:
        torch_error = f"import torch failed: {error}"
    import jax.numpy as jnp

    images, labels = jnp.asarray(images_np), jnp.asarray(labels_np)
    rows = []
    for net in NETS:
        config = load_config(f"{os.path.join(REPO, 'configs', 'mnist.py')}:{net}")
        ours_all, compile_s = bench_ours(config, images, labels, steps, repeats)
        ours = statistics.median(ours_all)
        eager = None if torch_error else bench_torch(config, images_np, labels_np, steps, repeats)
        compiled, compiled_error = None, torch_error or (None if torch_compile else "skipped (--no-torch_compile)")
        if not compiled_error:
            compiled, compiled_error = attempt(
                lambda: bench_torch(config, images_np, labels_np, steps, repeats, torch_compile))
        flops = xla_flops(config)
        rates = matmul_rates(config, repeats)
        ceiling = rates["matmul_gflops"] * 1e9 / flops
        rows.append({
            "net": net, "threads": threads, "ours_steps_per_s": ours, "ours_compile_s": compile_s,
            "ours_each_call": ours_all, **torch_fields("torch", eager, torch_error, ours),
            **torch_fields("torch_compiled", compiled, compiled_error, ours), "torch_compile": torch_compile,
            "xla_flops_per_step": flops, "hand_matmul_flops_per_step": hand_flops(config, config.batch_size),
            **rates, "ceiling_steps_per_s": ceiling, "fraction_of_ceiling": ours / ceiling,
            "steps_per_call": steps, "repeats": repeats, "loadavg_1min": os.getloadavg()[0],
        })
    return rows


def run_child(threads: int, args: argparse.Namespace) -> list[dict]:
    cores = sorted(os.sched_getaffinity(0))[:threads]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    if threads == 1:
        env["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), SINGLE_THREAD_XLA]))
    command = [sys.executable, os.path.abspath(__file__), "--child", str(threads),
               "--steps", str(args.steps), "--repeats", str(args.repeats)]
    command += ["--torch_compile", args.torch_compile] if args.torch_compile else ["--no-torch_compile"]
    out = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True,
                         preexec_fn=lambda: os.sched_setaffinity(0, set(cores)))
    return json.loads(next(l for l in out.stdout.splitlines() if l.startswith(MARKER))[len(MARKER):])


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def xla_flags_line() -> str:
    """A Markdown list item with this process's XLA_FLAGS (``import bn_repro`` adds its CPU option to them)."""
    return f"- XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`"


def markdown(rows: list[dict], command: str, wall_s: float) -> str:
    from bn_repro.run_records import cpu_model

    cpu = cpu_model()
    lines = [
        "# MNIST MLP training speed on CPU (784-100-100-100-10 sigmoid, batch 60)", "",
        f"- machine: {cpu}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} available), {platform.platform()}",
        f"- versions: python {platform.python_version()}, jax {version('jax')}, jaxlib {version('jaxlib')}, "
        f"flax {version('flax')}, torch {version('torch')}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; total run time {wall_s:.0f} s",
        f"- command: `{command}`",
        "- ours = `mnist_experiment.make_train_chunk` (lax.scan on device); torch eager = eager PyTorch, same step; "
        f"torch compiled = the same with the network under `torch.compile` ({rows[0]['torch_compile'] or 'skipped'}; "
        "optimizer step eager), compiled cold in its first step (= its compile s); first-step losses: the two torch "
        "loops start from the same weights and batch; median of repeats; ceiling = 1024^3 float32 matmul rate / "
        "XLA FLOPs of one `train_step`; matmul-only = the step's 7 matmuls alone at batch-60 shapes in a scan.", "",
    ]
    spread = lambda v: f"{statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})"  # noqa: E731
    columns = [("net", lambda r: r["net"]), ("threads", lambda r: str(r["threads"])),
               ("ours steps/s (min-max)", lambda r: spread(r["ours_each_call"]))]
    peers = {"torch": "eager", "torch_compiled": "compiled"}

    def peer_columns(p: str) -> list:  # "-" in a row where that peer failed
        cells = [(f"torch {peers[p]} steps/s (min-max)", lambda r: spread(r[f"{p}_each_call"])),
                 (f"ours/{peers[p]}", lambda r: f"{r[f'ratio_ours_{p}']:.2f}"),
                 (f"{peers[p]} first-step loss", lambda r: f"{r[f'{p}_first_loss']:.4f}")]
        if p == "torch_compiled":
            cells.append(("compile s ours / compiled",
                          lambda r: f"{r['ours_compile_s']:.1f} / {r['torch_compiled_first_step_s']:.1f}"))
        return [(name, lambda r, cell=cell: cell(r) if r[f"{p}_each_call"] else "-") for name, cell in cells]

    columns += [c for p in peers if any(r[f"{p}_each_call"] for r in rows) for c in peer_columns(p)]
    columns += [
        ("FLOPs/step XLA (hand matmul)", lambda r: f"{r['xla_flops_per_step'] / 1e6:.2f}M "
         f"({r['hand_matmul_flops_per_step'] / 1e6:.2f}M)"),
        ("matmul GFLOP/s (1024^3)", lambda r: f"{r['matmul_gflops']:.0f}"),
        ("ceiling steps/s", lambda r: f"{r['ceiling_steps_per_s']:.0f}"),
        ("fraction of ceiling", lambda r: f"{r['fraction_of_ceiling']:.2f}"),
        ("matmul-only steps/s", lambda r: f"{r['matmul_only_steps_per_s']:.0f}"),
    ]
    lines += ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
    errors = {f"torch {label} not measured: {first_line(r[f'{peer}_error'])}"
              for peer, label in peers.items() for r in rows if r[f"{peer}_error"]}
    lines += [""] + sorted(errors)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,all", help="Comma-separated thread counts; 'all' = every available core.")
    parser.add_argument(
        "--steps", type=int, default=500,
        help="Training steps per timed call (default: eval_every of configs/mnist.py, as in a real run).",
    )
    parser.add_argument("--repeats", type=int, default=20, help="Timed calls per measurement (median reported).")
    add_torch_compile_flags(parser)
    parser.add_argument("--output", help="Also write the Markdown here, and the JSON rows beside it (.json).")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(MARKER + json.dumps(child(args.child, args.steps, args.repeats, args.torch_compile)), flush=True)
        return 0
    available = len(os.sched_getaffinity(0))
    settings = []
    for item in args.threads.split(","):
        n = available if item.strip() == "all" else int(item)
        if not 1 <= n <= available:
            parser.error(f"--threads {n}: only {available} cores are available")
        settings += [n] if n not in settings else []
    start = time.perf_counter()
    rows = [row for n in settings for row in run_child(n, args)]
    command = command_line(__file__, argv)
    publish(markdown(rows, command, time.perf_counter() - start), args.output, {"command": command, "rows": rows})
    return 0


def write_outputs(path: str, text: str, record: dict) -> None:
    """The Markdown table at ``path``, and ``record`` as JSON beside it (``.json``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(record, f, indent=1)


def command_line(script: str, argv: list[str]) -> str:
    """How ``script`` was run, from the repository root, for a table's header."""
    return shlex.join(["python", os.path.relpath(os.path.abspath(script)), *argv])


def publish(text: str, output: str | None, record: dict) -> None:
    """Prints ``text``; with ``output``, also writes it there and ``record`` beside it (:func:`write_outputs`)."""
    print(text)
    if output:
        write_outputs(output, text, record)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
