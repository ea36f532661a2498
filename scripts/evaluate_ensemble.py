"""Evaluates an ensemble of ImageNet networks (Sec. 4.2.3, Figure 4's "BN-Inception ensemble").

    python scripts/evaluate_ensemble.py --workdir=runs/m1 --workdir=runs/m2 ... [--output=ens.json]

The prediction is the mean over the networks (their final models) of each
one's class probabilities averaged over the crops: 144 (GoogLeNet's) or the
central one. Prints one line per metric and, with --output, writes them as
JSON with the command and the workdirs. The other flags are those of
evaluate_multicrop.py.
"""

import argparse

import evaluate_multicrop as multicrop  # Its flags (this script's directory is on sys.path).
from bn_repro import ensemble


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", action="append", required=True, help="A member's workdir; repeat per member.")
    multicrop.add_evaluation_flags(parser)
    args = parser.parse_args()
    multicrop.report(args, ensemble.evaluate(args.workdir, crops=args.crops, data_dir=args.data_dir,
                                             split=args.split, num_workers=args.num_workers,
                                             batch_size=args.batch_size))


if __name__ == "__main__":  # grain spawns its workers: guard the main module.
    main()
