"""Parameter counts and forward FLOPs per 224x224 image of the ImageNet networks.

FLOPs are XLA's cost analysis of one jitted forward pass (inference mode,
batch 1, float32); they count every operation, not only multiply-adds.

    python scripts/model_stats.py --output results/models/model_stats.md
"""

import argparse
import os
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bn_repro.models.bn_inception import BNInception
from bn_repro.models.googlenet import GoogLeNet

VARIANTS = {
    "BN-Inception (Figure 5, pool proj 96 in 4c/4d, separable stem)": BNInception(),
    "BN-Inception, pool proj 128 in 4c/4d (as printed)": BNInception(pool_proj_4cd=128),
    "BN-Inception, plain 7x7 stem": BNInception(separable_stem=False),
    "Inception baseline (Figure 5 without BN, with biases, LRN)": BNInception(norm=None, use_lrn=True, dropout_rate=0.4),
    "GoogLeNet (2014), no auxiliary heads": GoogLeNet(),
    "GoogLeNet (2014), with auxiliary heads": GoogLeNet(aux_heads=True),
}


def stats(model) -> tuple[int, int, float]:
    """(parameters, BN statistics, forward GFLOPs per image)."""
    image = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), image)
    count = lambda tree: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))  # noqa: E731
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, image).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return count(variables["params"]), count(variables.get("batch_stats", {})), cost["flops"] / 1e9


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", help="Also write the Markdown table here.")
    args = parser.parse_args(argv)
    lines = [
        "| network | parameters | BN statistics (not trained) | forward GFLOPs / 224x224 image (XLA) |",
        "|---|---|---|---|",
    ]
    for name, model in VARIANTS.items():
        params, batch_stats, gflops = stats(model)
        lines.append(f"| {name} | {params:,} | {batch_stats:,} | {gflops:.2f} |")
    command = shlex.join(["python", "scripts/model_stats.py", *argv])
    text = "\n".join([f"Command: `{command}` (jax {jax.__version__})", "", *lines]) + "\n"
    print(text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
