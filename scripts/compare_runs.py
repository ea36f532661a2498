"""Compares runs, e.g. the same config on two accelerators (bn_repro/compare.py).

    python scripts/compare_runs.py runs/mnist_bn runs/mnist_bn_gpu [--target 0.97] \
        [--tolerance 1e-6] [--markdown compare.md] [--csv compare.csv]

Prints one row per run (device, processes, precision, global batch, final and
best accuracy, steps and wall time to the target, wall time, steps/s, images/s),
the curve differences of each run from the first, and the config fields in
which they differ. The accuracy is test_accuracy (MNIST) or val_top1
(classification, e.g. ImageNet); the default target is each run's
config.target_accuracy: 0.97 (MNIST) or 0.722 (ImageNet, Figure 3).
"""

import argparse
import sys

from bn_repro import compare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="Workdirs of runs; the first is the reference.")
    parser.add_argument("--target", type=float, help="Target accuracy (default: the runs' config.target_accuracy).")
    parser.add_argument("--tolerance", type=float, default=1e-6,
                        help="Curves differ at a step where accuracy or train loss differ by more (default 1e-6).")
    parser.add_argument("--markdown", help="Also write the tables as Markdown to this file.")
    parser.add_argument("--csv", help="Also write the runs table as CSV to this file.")
    args = parser.parse_args(argv)
    try:
        comparison = compare.compare(args.run_dirs, target=args.target, tolerance=args.tolerance)
    except compare.RunDirError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(compare.render(comparison), end="")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(compare.render(comparison, markdown=True))
    if args.csv:
        compare.write_csv(args.csv, comparison)
    return 0


if __name__ == "__main__":
    sys.exit(main())
