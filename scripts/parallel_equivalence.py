"""Trains the MNIST BN net in every data-parallel setting and tabulates how far each run is from its reference.

    python scripts/parallel_equivalence.py --output=results/parallel/equivalence.md

Each run is ``python -m bn_repro.main --config=configs/mnist.py:bn`` on forced
CPU devices (``--xla_force_host_platform_device_count``). Speed means nothing
there; the point is that the settings compute what they claim. Each setting on
``--devices`` devices is compared with a one-device run that must be the same
computation:

* ``global`` (jit and pmap loops) with one device on the whole global batch;
* ``per_device`` and ``virtual`` with groups of B/devices, with one device
  normalising virtual batches of B/devices;
* ``virtual`` with smaller groups, with one device using the same groups.

Reported: the largest absolute difference, after training, of any parameter
or population statistic of the final model, and of the test accuracy over the
evaluations.
"""

import argparse
import os
import shlex
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(workdir: str, devices: int, overrides: list[str]) -> None:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "bn_repro.main", "--config=configs/mnist.py:bn", f"--workdir={workdir}", *overrides]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{shlex.join(command)} failed:\n{result.stderr[-3000:]}")


def load(workdir: str) -> tuple[list[np.ndarray], list[float]]:
    import jax

    from bn_repro import checkpoints, run_records

    variables = checkpoints.load_final_model(workdir)
    curve = [r["test_accuracy"] for r in run_records.read_metrics(os.path.join(workdir, "metrics.jsonl"))
             if "test_accuracy" in r]
    return [np.asarray(x) for x in jax.tree.leaves(variables)], curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=64, help="Global batch, a multiple of --devices.")
    parser.add_argument("--num_steps", type=int, default=2000)
    parser.add_argument("--small_group", type=int, default=4, help="Virtual batch smaller than B/devices.")
    parser.add_argument("--workdir", help="Where the runs go (default: a temporary directory).")
    parser.add_argument("--output", help="Also write the Markdown table here.")
    args = parser.parse_args()
    per_device = args.batch_size // args.devices
    common = [f"--config.batch_size={args.batch_size}", f"--config.num_steps={args.num_steps}",
              f"--config.eval_every={min(500, args.num_steps)}", f"--config.checkpoint_every={args.num_steps}",
              "--config.bn.population_batches=100"]

    def virtual(v: int) -> list[str]:
        return ["--config.bn.statistics=virtual", f"--config.bn.virtual_batch_size={v}"]

    references = {"global": [], f"virtual {per_device}": virtual(per_device),
                  f"virtual {args.small_group}": virtual(args.small_group)}
    settings = [  # (statistics label, overrides, reference)
        ("global", [], "global"),
        ("per_device", ["--config.bn.statistics=per_device"], f"virtual {per_device}"),
        (f"virtual {per_device}", virtual(per_device), f"virtual {per_device}"),
        (f"virtual {args.small_group}", virtual(args.small_group), f"virtual {args.small_group}"),
    ]
    root = args.workdir or tempfile.mkdtemp(prefix="parallel_equivalence_")
    results = {}
    for name, overrides in references.items():
        workdir = os.path.join(root, f"1dev_{name.replace(' ', '')}")
        train(workdir, 1, common + overrides)
        results[("1 device", name)] = load(workdir)
    rows = []
    for label, overrides, reference in settings:
        for loop in ("jit", "pmap"):
            workdir = os.path.join(root, f"{args.devices}dev_{loop}_{label.replace(' ', '')}")
            train(workdir, args.devices, common + overrides + [f"--config.parallel={loop}"])
            variables, curve = load(workdir)
            ref_variables, ref_curve = results[("1 device", reference)]
            rows.append((loop, label, reference, curve[-1],
                         max(float(np.max(np.abs(a - b))) for a, b in zip(variables, ref_variables)),
                         max(abs(a - b) for a, b in zip(curve, ref_curve))))

    command = shlex.join(["python", "scripts/parallel_equivalence.py", *sys.argv[1:]])
    lines = [
        f"# Data-parallel equivalence: MNIST BN net, {args.devices} forced CPU devices vs one device",
        "",
        f"- command: `{command}`",
        f"- {args.num_steps} steps, global batch {args.batch_size} ({per_device} per device), evaluation every "
        f"{min(500, args.num_steps)} steps; differences are of the final model (parameters and Algorithm 2's population statistics) and of "
        "the test-accuracy curve",
        "",
        f"| loop | bn.statistics on {args.devices} devices | one-device reference | final test accuracy | "
        "max abs diff, parameters & statistics | max abs diff, test accuracy |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {loop} | {label} | {ref} | {acc:.4f} | {dv:.2e} | {da:.4f} |" for loop, label, ref, acc, dv, da in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
