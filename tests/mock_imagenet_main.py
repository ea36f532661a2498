"""The entry point ``python -m bn_repro.main``, run on TFDS's mock ``imagenet2012``.

    python tests/mock_imagenet_main.py NUM_EXAMPLES --config=configs/imagenet.py:bn_x5:small --workdir=...

Everything but the data is the real path: flag parsing, the grain pipeline over
``tfds.data_source``, training, evaluation, checkpoints. The mock examples are
random images of random sizes with random labels (``NUM_EXAMPLES`` per split).
"""

import sys

import tensorflow_datasets as tfds
from absl import app

from bn_repro import main

if __name__ == "__main__":
    num_examples = int(sys.argv.pop(1))
    with tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE):
        app.run(main.main, flags_parser=main.parse_flags)
