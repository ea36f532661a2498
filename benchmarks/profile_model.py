"""Where BN-Inception's training step spends its time: XLA's own trace of the compiled step, by operation kind.

Builds our training step as ``bench_model.py`` does (``train.make_streamed_step``
of ``--config``, one batch kept on the device), runs ``--warmup`` steps, then
records ``--steps`` steps with ``jax.profiler`` (XLA:CPU traces every thunk it
runs: each fusion, convolution, copy). Each traced operation is named after an
instruction of the compiled HLO module, and is put in one kind by what that
instruction computes (inside a fusion, its fused instructions):

* a convolution: ``conv KxK`` by the kernel of the layer it belongs to (from
  the HLO metadata's module path and the parameters; for a kernel gradient XLA
  rewrote, which has no metadata, from its output's shape), ``depthwise`` for
  the stem's grouped one, forward or backward (a JAX ``transpose`` in the path);
* a matrix product: ``dot`` (the classifier, or 1x1 convolutions written as one);
* BN (under a ``bn`` module: its reductions and normalisation), pooling,
  concatenation, the loss, the optimizer (outside the network), layout copies,
  and the rest of the network's elementwise work (ReLU, dropout, LRN).

Time is thread time: the durations of every traced event on every XLA thread,
summed (two threads busy for 1 ms count 2 ms), divided by the steps traced.
XLA's own convolutions (``bn_repro`` turns YNNPACK's off: README, "Speed")
run asynchronously on XLA's Eigen thread pool and their trace events end
when they are launched, so the trace leaves almost all of their time out:
time them with ``bench_conv_layers.py``. YNNPACK's (``XLA_FLAGS=
--xla_cpu_experimental_ynn_fusion_type=+individual_convolution``) are traced.

    python benchmarks/profile_model.py --output results/bench/bn_inception_profile_cpu.md
    # "before": every convolution an nn.Conv, and YNNPACK's convolutions (XLA:CPU's default)
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+individual_convolution python benchmarks/profile_model.py --nn_conv --output results/bench/bn_inception_profile_cpu_before.md
    python benchmarks/profile_model.py --image_size 32 --set=--config.model.width=0.125
"""

import argparse
import collections
import contextlib
import datetime
import glob
import os
import platform
import re
import sys
import tempfile
import time

import numpy as np

from bench_mnist import command_line, publish, version, xla_flags_line  # This script's directory is on sys.path.
from bench_model import add_network_flags, network_config_and_batch, nn_conv_everywhere, setup_ours

INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<shape>.+?) (?P<opcode>[a-z][\w\-]*)\((?P<rest>.*)$")
COMPUTATION = re.compile(r"^(?:ENTRY )?%(?P<name>[\w.\-]+) ")
# Trace events that are not an operation of the step (the executor's own bookkeeping).
NOT_AN_OPERATION = ("ThunkExecutor", "end: ", "ThreadpoolListener", "PjRt", "Execute", "Allocate", "Handle inputs")


def parse_hlo(text: str) -> dict[str, list[dict]]:
    """``{computation name: [instruction, ...]}``; an instruction is ``{name, opcode, shape, rest, op_name}``."""
    computations, current = {}, None
    for line in text.splitlines():
        if not line.startswith(" ") and (match := COMPUTATION.match(line)):
            current = computations.setdefault(match["name"], [])
            continue
        if current is not None and (match := INSTRUCTION.match(line)):
            op_name = re.search(r'op_name="([^"]*)"', match["rest"])
            current.append({"name": match["name"], "opcode": match["opcode"], "shape": match["shape"],
                            "rest": match["rest"], "op_name": op_name[1] if op_name else ""})
    return computations


def instructions_inside(instruction: dict, computations: dict[str, list[dict]]) -> list[dict]:
    """The instruction itself, or for a fusion (or call) every instruction of the computations it calls."""
    called = re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", instruction["rest"])
    if not called or instruction["opcode"] not in ("fusion", "call", "custom-call"):
        return [instruction]
    return [inner for name in called for inner in computations.get(name, [])
            for inner in instructions_inside(inner, computations)] or [instruction]


def module_path(op_name: str) -> list[str]:
    """The Flax module path in an HLO op_name: 'jit(step)/transpose(jvp(BNInception))/inception_3a/1x1/conv/...'
    -> ['inception_3a', '1x1', 'conv', ...] (the part after the model's own name)."""
    parts = op_name.split("/")
    start = next((i for i, p in enumerate(parts) if "BNInception" in p or "GoogLeNet" in p), None)
    return [] if start is None else parts[start + 1:]


def kernel_size(path: list[str], params: dict) -> str | None:
    """'KxK' of the convolution kernel the module path leads to, if any."""
    node = params
    for part in path:
        if not isinstance(node, dict) or part not in node:
            break
        node = node[part]
        if isinstance(node, dict) and "kernel" in node and np.ndim(node["kernel"]) == 4:
            return "x".join(str(s) for s in np.shape(node["kernel"])[:2])
    return None


def kind_of(instruction: dict, computations: dict[str, list[dict]], params: dict) -> str:
    """The operation kind of one traced top-level instruction (see the module docstring)."""
    inside = instructions_inside(instruction, computations)
    opcodes = {i["opcode"] for i in inside}
    # A kernel's gradient that XLA rewrote has no metadata.
    direction = lambda i: "backward" if "transpose(" in i["op_name"] or not i["op_name"] else "forward"  # noqa: E731
    for inner in inside:
        if inner["opcode"] == "convolution":
            path = module_path(inner["op_name"])
            grouped = re.search(r"feature_group_count=(\d+)", inner["rest"])
            output = [int(d) for d in re.match(r"\w+\[([\d,]*)\]", inner["shape"])[1].split(",")]
            if "depthwise" in path or (grouped and int(grouped[1]) > 1) or len(output) == 5:
                return f"depthwise conv (stem), {direction(inner)}"
            if not inner["op_name"]:  # its output is the kernel('s gradient)
                return f"conv {output[1]}x{output[2]}, backward"
            return f"conv {kernel_size(path, params) or '?'}, {direction(inner)}"
    for inner in inside:
        if inner["opcode"] == "dot":
            path = module_path(inner["op_name"])
            size = kernel_size(path, params)
            return f"{'conv ' + size + ' as a matmul' if size else 'dot (classifier)'}, {direction(inner)}"
    op_names = [i["op_name"] for i in inside if i["op_name"]]
    paths = [module_path(n) for n in op_names]
    if instruction["opcode"] in ("copy", "transpose") or instruction["name"].startswith(("copy", "transpose")):
        return "layout copies and transposes"
    if any("bn" in p for p in paths):
        return "BN (statistics, normalisation, their gradients)"
    if opcodes & {"reduce-window", "select-and-scatter"} or any("pool" in n for n in op_names):
        return "pooling"
    if "concatenate" in opcodes:
        return "concatenation (and its gradient's slices)"
    if any(paths):
        return "other network elementwise (ReLU, max-pool maxima, dropout, LRN)"
    if any(k in n for n in op_names for k in ("log_softmax", "take_along_axis", "_take", "logsumexp")):
        return "loss"
    return "optimizer and the rest (outside the network)"


def traced_thread_times(trace_dir: str) -> dict[str, float]:
    """``{event name: summed duration in s}`` over the XLA threads of the trace in ``trace_dir``."""
    from jax.profiler import ProfileData

    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    totals: dict[str, float] = collections.defaultdict(float)
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                if not event.name.startswith(NOT_AN_OPERATION) and not event.name.startswith("$"):
                    totals[event.name] += event.duration_ns / 1e9
    return totals


def profile(args: argparse.Namespace) -> dict:
    import jax
    config, batch_np, overrides = network_config_and_batch(args, args.precision)
    size, batch = config.data.image_size, config.batch_size
    with nn_conv_everywhere() if args.nn_conv else contextlib.nullcontext():
        variables, run, _, _, compiled = setup_ours(config, batch_np)
    computations = parse_hlo(compiled.as_text())
    by_name = {i["name"]: i for body in computations.values() for i in body}
    run(args.warmup)
    with tempfile.TemporaryDirectory() as trace_dir:
        start = time.perf_counter()
        with jax.profiler.trace(trace_dir):
            run(args.steps)
        wall = (time.perf_counter() - start) / args.steps
        totals = traced_thread_times(trace_dir)
    kinds: dict[str, float] = collections.defaultdict(float)
    unmatched = 0.0
    for name, seconds in totals.items():
        if name in by_name:
            kinds[kind_of(by_name[name], computations, variables["params"])] += seconds / args.steps
        else:
            unmatched += seconds / args.steps
    return {"config": args.config, "overrides": overrides, "nn_conv_everywhere": args.nn_conv,
            "image_size": size, "batch_size": batch,
            "channels": config.data.channels, "precision": args.precision, "steps": args.steps,
            "wall_s_per_step_traced": wall, "thread_s_per_step": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "untraced_names_s_per_step": unmatched}


def markdown(record: dict, command: str) -> str:
    from bn_repro.run_records import cpu_model

    total = sum(record["thread_s_per_step"].values())
    lines = [
        f"# BN-Inception training step, by operation kind: {record['image_size']}x{record['image_size']}x"
        f"{record['channels']}, batch {record['batch_size']}, {record['precision']}"
        + (", nn.Conv everywhere (before)" if record["nn_conv_everywhere"] else ""), "",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} available), "
        f"{platform.platform()}; jax {version('jax')}, jaxlib {version('jaxlib')}",
        xla_flags_line(),
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; 1-min load average at the end "
        f"{os.getloadavg()[0]:.1f}",
        f"- command: `{command}`",
        f"- {record['steps']} traced steps after warm-up; {record['wall_s_per_step_traced'] * 1e3:.0f} ms of wall "
        f"time per step while traced; thread time = every XLA thread's traced events summed "
        f"({total * 1e3:.0f} ms per step; events not named after an HLO instruction: "
        f"{record['untraced_names_s_per_step'] * 1e3:.1f} ms)", "",
        "| operation kind | thread ms/step | share |", "|---|---|---|",
    ]
    lines += [f"| {kind} | {s * 1e3:.1f} | {s / total:.1%} |" for kind, s in record["thread_s_per_step"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_network_flags(parser)
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps first (>= 1).")
    parser.add_argument("--steps", type=int, default=3, help="Steps traced.")
    parser.add_argument("--nn_conv", action="store_true",
                        help="Every convolution an nn.Conv: the formulation before the CPU ones (the 'before' profile).")
    parser.add_argument("--output", help="Also write the Markdown here, and the JSON beside it (.json).")
    args = parser.parse_args(argv)
    args.warmup = max(1, args.warmup)
    record = profile(args)
    command = command_line(__file__, argv)
    publish(markdown(record, command), args.output, {"command": command, **record})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
