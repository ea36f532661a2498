"""Evaluates one classification network (ImageNet) on 144 crops or the central crop (Sec. 4.2.3, Figure 4).

    python scripts/evaluate_multicrop.py --workdir=runs/bn_x30 [--crops=144] [--output=multicrop.json]
    python scripts/evaluate_multicrop.py --workdir=runs/bn_x30 --step=100000 --crops=1

By default the run's final model (for BN, Algorithm 2's population statistics);
with --step, that training checkpoint (BN's moving averages). Prints one line
per metric (top-1/top-5 accuracy and error, loss) and, with --output, writes
them as JSON with the command and the workdir.
"""

import argparse
import shlex
import sys

from bn_repro import ensemble, image_data


def add_evaluation_flags(parser: argparse.ArgumentParser) -> None:
    """The flags both evaluation scripts take besides the workdirs."""
    parser.add_argument("--crops", type=int, choices=image_data.EVAL_CROPS, default=144,
                        help="144: GoogLeNet's multi-crop; 1: the central crop, as training evaluates.")
    parser.add_argument("--data_dir", help="TFDS data dir (default: the run's config.data.data_dir).")
    parser.add_argument("--split", default="validation", help="TFDS split of the run's dataset.")
    parser.add_argument("--num_workers", type=int, help="grain worker processes (default: the run's config).")
    parser.add_argument("--batch_size", type=int, help="Images a batch (default: eval_batch_size // crops).")
    parser.add_argument("--output", help="Write the results here as JSON.")


def report(args: argparse.Namespace, results: dict) -> None:
    print(ensemble.format_results(results))
    if args.output:
        ensemble.write_results(args.output, results, shlex.join(["python", *sys.argv]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="The run's workdir (bn_repro.main --workdir).")
    parser.add_argument("--step", type=int, help="A training checkpoint's step instead of the final model.")
    add_evaluation_flags(parser)
    args = parser.parse_args()
    run = ensemble.load_trained_model(args.workdir, args.step)
    report(args, ensemble.evaluate([run], crops=args.crops, data_dir=args.data_dir, split=args.split,
                                   num_workers=args.num_workers, batch_size=args.batch_size))


if __name__ == "__main__":  # grain spawns its workers: guard the main module.
    main()
