"""Reproduces the paper's MNIST experiment (Sec. 4.1, Figure 1).

Trains the 784-100-100-100-10 sigmoid MLP without and with BN (configs/mnist.py
variants ``baseline`` and ``bn``) through ``python -m bn_repro.main``, then
writes ``figure1.png``, ``summary.json`` and both runs' ``metrics_*.jsonl``
into ``--results``.

With two or more CPU cores the two runs go side by side, each pinned to its own
core with single-threaded XLA (faster on CPU than one after the other on all
cores for a net this small). Extra ``--config.FIELD=VALUE`` arguments go to
both runs. Re-running resumes interrupted runs from their checkpoints.

    python scripts/reproduce_figure1.py
    python scripts/reproduce_figure1.py --config.num_steps=2000 --results=/tmp/fig1 \
        --config.data.data_dir=/data/tfds
"""

import argparse
import json
import os
import shlex
import shutil
import sys
import time

from bn_repro import metrics as metrics_lib
from bn_repro import mnist_data, plots, run_records
from bn_repro.sweep import available_cores, launch
from bn_repro.main import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = ("baseline", "bn")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/figure1", help="Parent of the two runs' workdirs.")
    parser.add_argument("--results", default="results/mnist", help="Where figure1.png and summary.json go.")
    parser.add_argument(
        "--sequential", action="store_true", help="Run the two nets one after the other on all cores."
    )
    args, overrides = parser.parse_known_args(argv)
    for override in overrides:
        if not override.startswith("--config."):
            parser.error(f"unrecognised argument {override!r}: only --config.FIELD=VALUE overrides pass through")
    return args, overrides


def config_spec(variant: str) -> str:
    return f"{os.path.relpath(os.path.join(REPO, 'configs', 'mnist.py'))}:{variant}"


def run_command(variant: str, workdir: str, overrides: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "bn_repro.main",
        f"--config={config_spec(variant)}", f"--workdir={os.path.join(workdir, variant)}", *overrides,
    ]


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    # Check the overrides, and prepare (or verify) the data once, before two
    # processes read it.
    configs = {v: load_config(config_spec(v), overrides) for v in VARIANTS}
    data = configs["bn"].data
    mnist_data.prepare_mnist(
        data.data_dir or mnist_data.default_data_dir(),
        expected=mnist_data.REAL_MNIST if data.verify_checksums else None,
    )

    cores = available_cores()
    side_by_side = len(cores) >= 2 and not args.sequential
    start = time.perf_counter()
    commands = {v: run_command(v, args.workdir, overrides) for v in VARIANTS}
    if side_by_side:
        processes = {v: launch(commands[v], cores[i]) for i, v in enumerate(VARIANTS)}
        codes = {v: p.wait() for v, p in processes.items()}
    else:
        codes = {v: launch(commands[v], None).wait() for v in VARIANTS}
    training_wall_time = time.perf_counter() - start
    failed = [v for v, code in codes.items() if code]
    if failed:
        print(f"Training failed for {failed}; see the log above. Re-run to resume.", file=sys.stderr)
        return 1

    os.makedirs(args.results, exist_ok=True)
    records, summaries = {}, {}
    for variant in VARIANTS:
        run_dir = os.path.join(args.workdir, variant)
        records[variant] = run_records.read_metrics(os.path.join(run_dir, "metrics.jsonl"))
        with open(os.path.join(run_dir, "summary.json")) as f:
            summaries[variant] = json.load(f)
        shutil.copyfile(os.path.join(run_dir, "metrics.jsonl"), os.path.join(args.results, f"metrics_{variant}.jsonl"))
    plots.plot_figure1(records["baseline"], records["bn"], os.path.join(args.results, "figure1.png"))

    summary = {
        "experiment": "MNIST, Ioffe & Szegedy 2015, Sec. 4.1 / Figure 1",
        "command": shlex.join(["python", "scripts/reproduce_figure1.py", *argv]),
        "runs_side_by_side_one_core_each": side_by_side,
        "training_wall_time_s": training_wall_time,
        "checks": figure1_checks(records["baseline"], records["bn"], summaries["bn"]),
        "sigmoid_input_percentiles": {v: percentile_drift(records[v]) for v in VARIANTS},
        "nets": summaries,
    }
    run_records.write_json(os.path.join(args.results, "summary.json"), summary)
    print(f"Wrote {args.results}/figure1.png and summary.json ({training_wall_time:.1f} s of training).")
    for name, ok in summary["checks"].items():
        print(f"  {name}: {ok}")
    return 0


def percentile_drift(records: list[dict]) -> dict:
    """How much the tracked sigmoid input's distribution moves (Figure 1(b, c)).

    The 15th/50th/85th percentiles at the first evaluation, at 1k steps and at
    the end, and the range (max - min) of the median from 1k steps on;
    empty for a run without any evaluation.
    """
    evals = [r for r in records if "sigmoid_input_p50" in r]
    if not evals:  # e.g. diverged before its first evaluation
        return {}
    keys = plots.PERCENTILE_KEYS
    at = lambda r: {k.rsplit("_", 1)[1]: r[k] for k in keys}  # noqa: E731
    later = [r["sigmoid_input_p50"] for r in evals if r["step"] >= 1000]
    after_1k = next((r for r in evals if r["step"] >= 1000), evals[-1])
    return {
        "first_evaluation": {"step": evals[0]["step"], **at(evals[0])},
        "at_1k_steps": {"step": after_1k["step"], **at(after_1k)},
        "final": {"step": evals[-1]["step"], **at(evals[-1])},
        "median_range_from_1k_steps": max(later, default=0.0) - min(later, default=0.0),
    }


def figure1_checks(baseline: list[dict], bn: list[dict], bn_summary: dict) -> dict:
    """The paper's qualitative claims about Figure 1, checked on these runs."""
    base_curve = dict(metrics_lib.accuracy_curve(baseline))
    bn_curve = dict(metrics_lib.accuracy_curve(bn))
    common = [s for s in sorted(bn_curve) if s >= 1000 and s in base_curve]
    return {
        "bn_above_baseline_at_every_evaluation_from_1k_steps": bool(common)
        and all(bn_curve[s] > base_curve[s] for s in common),
        "bn_final_test_accuracy_at_least_0.98": bn_summary.get("final_test_accuracy", 0.0) >= 0.98,
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
