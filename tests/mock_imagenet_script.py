"""Runs a script on TFDS's mock ``imagenet2012`` (as mock_imagenet_main.py runs the entry point).

    python tests/mock_imagenet_script.py NUM_EXAMPLES scripts/evaluate_multicrop.py --workdir=...

Mock examples are a function of the split and index, so the script sees the
data a run made by mock_imagenet_main.py with the same NUM_EXAMPLES saw.
"""

import os
import runpy
import sys

import tensorflow_datasets as tfds

if __name__ == "__main__":
    num_examples, script = int(sys.argv[1]), sys.argv[2]
    sys.argv = [script, *sys.argv[3:]]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script` has it
    with tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE):
        runpy.run_path(script, run_name="__main__")
