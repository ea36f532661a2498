"""Several runs of the entry point's training, one after the other in one process, on TFDS's mock ``imagenet2012``.

    python tests/mock_imagenet_runs.py NUM_EXAMPLES JOBS.json

``JOBS.json`` is a list of ``[workdir, config_spec, [override, ...]]``. Each job
does what ``python -m bn_repro.main --config=config_spec --workdir=workdir
override...`` does after flag parsing (``main.load_config`` checks and applies
the overrides as main does, then ``train.train_and_evaluate``), so the runs
share this process's compiled programs and start-up. A failed job writes its
traceback to ``<workdir>/error.txt`` and the others still run; the exit status
is the number of failed jobs.
"""

import json
import os
import shlex
import sys
import traceback

import tensorflow_datasets as tfds

from bn_repro import main, train

if __name__ == "__main__":  # grain spawns its workers: guard the main module.
    num_examples, jobs_path = int(sys.argv[1]), sys.argv[2]
    with open(jobs_path) as f:
        jobs = json.load(f)
    failed = 0
    with tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE):
        for workdir, spec, overrides in jobs:
            command = shlex.join(["python", "-m", "bn_repro.main", f"--config={spec}", f"--workdir={workdir}", *overrides])
            try:
                train.train_and_evaluate(main.load_config(spec, overrides), workdir, command=command)
            except Exception:  # noqa: BLE001  reported to the test through the workdir
                failed += 1
                os.makedirs(workdir, exist_ok=True)
                with open(os.path.join(workdir, "error.txt"), "w") as f:
                    f.write(traceback.format_exc())
    sys.exit(failed)
