"""The suite's training runs on TFDS's mock ``imagenet2012``, shared by
``test_imagenet_train.py`` and ``test_ensemble.py`` (the session fixture
``imagenet_runs`` in ``conftest.py``).

As a script it is one process running several jobs one after the other:

    python tests/mock_imagenet_runs.py NUM_EXAMPLES JOBS.json

``JOBS.json`` is a list of ``[workdir, config_spec, [override, ...]]``. Each job
does what ``python -m bn_repro.main --config=config_spec --workdir=workdir
override...`` does after flag parsing (``main.load_config`` checks and applies
the overrides as main does, then ``train.train_and_evaluate``), so the jobs
share the process's start-up and compiled programs. A failed job writes its
traceback to ``<workdir>/error.txt`` and the others still run; the exit status
is the number of failed jobs.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "imagenet.py")
MOCK_MAIN = str(REPO / "tests" / "mock_imagenet_main.py")
NUM_EXAMPLES = 20  # per split; 20 validation examples in batches of 8: the last is padded.
NO_DATA_DIR = "--config.data.data_dir=/nonexistent/tfds"  # the mock serves every read
# A tiny net makes small steps: it needs a larger base rate (x5 -> 5.0) to reach
# machine infinity within a few steps, as the full-size net does at 0.0075.
DIVERGING = ("--config.learning_rate=1.0", "--config.num_steps=20", "--config.eval_every=10",
             "--config.checkpoint_every=20")
# Checkpoints at steps 2 and 4 (the ':small' runs train 4 steps, evaluating at 2 and 4).
EVERY_2 = "--config.checkpoint_every=2"

# {name: (variant, *overrides)} per group; a group is one process, the two
# groups run side by side. Between them they cover: BN with dropout, LRN and
# window shuffling (bn_baseline), BN with all of Sec. 4.2.1's changes and
# global shuffling (bn_x5), no BN (inception), divergence, and GoogLeNet with
# its auxiliary classifiers. Every variant's network is checked without
# training in test_models.py; grain's worker processes give the same batches
# as none in test_imagenet_data.py.
GROUPS = (
    {"bn_baseline": ("bn_baseline", EVERY_2), "googlenet": ("googlenet", "--config.model.aux_heads=True")},
    {"bn_x5": ("bn_x5", EVERY_2), "inception": ("inception",), "diverging": ("inception_x5", *DIVERGING)},
)
# bn_baseline again, as if it had crashed just before its step-4 checkpoint was
# written, rerun with the same command through the entry point.
RESUMED, RESUMED_FROM, CHECKPOINT_DROPPED = "resumed", "bn_baseline", 4


def env() -> dict[str, str]:
    from conftest import subprocess_env

    return subprocess_env()


def run_group(root: Path, jobs: dict[str, tuple[str, ...]]) -> None:
    spec = [[str(root / name), f"{CONFIG}:{variant}:small", [NO_DATA_DIR, *overrides]]
            for name, (variant, *overrides) in jobs.items()]
    jobs_path = root / f"jobs_{next(iter(jobs))}.json"
    jobs_path.write_text(json.dumps(spec))
    subprocess.run([sys.executable, __file__, str(NUM_EXAMPLES), str(jobs_path)], capture_output=True, text=True,
                   env=env(), cwd=REPO)


def run_main(workdir: str, variant: str, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m bn_repro.main`` (flag parsing and all) under the mock."""
    command = [sys.executable, MOCK_MAIN, str(NUM_EXAMPLES), f"--config={CONFIG}:{variant}:small",
               f"--workdir={workdir}", NO_DATA_DIR, *overrides]
    result = subprocess.run(command, capture_output=True, text=True, env=env(), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def interrupt_and_resume(root: Path) -> None:
    """Copies the finished run and drops what a crash before its last checkpoint
    would not have written (that checkpoint, the summary, the final model; the
    metrics are kept, as ``metrics_before_resume.jsonl`` too), then reruns it."""
    workdir = root / RESUMED
    shutil.copytree(root / RESUMED_FROM, workdir)
    shutil.rmtree(workdir / "checkpoints" / str(CHECKPOINT_DROPPED))
    for name in ("summary.json", "final_model"):
        path = workdir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.copy(workdir / "metrics.jsonl", workdir / "metrics_before_resume.jsonl")
    _, *overrides = GROUPS[0][RESUMED_FROM]
    run_main(str(workdir), RESUMED_FROM, *overrides)


def train_all(root: Path) -> dict[str, Exception | None]:
    """Runs every group (and the resumption) under ``root``; returns each run's error or None."""
    def first_group_then_resume():
        run_group(root, GROUPS[0])
        interrupt_and_resume(root)

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(first_group_then_resume), pool.submit(run_group, root, GROUPS[1])]
        errors = {RESUMED: futures[0].exception()}
        futures[1].result()
    for name in (n for group in GROUPS for n in group):
        error = root / name / "error.txt"
        errors[name] = AssertionError(error.read_text()) if error.exists() else None
        if not (root / name / "summary.json").exists() and errors[name] is None:
            errors[name] = AssertionError(f"run {name} wrote no summary.json (its group's process died?)")
    return errors


if __name__ == "__main__":  # grain spawns its workers: guard the main module.
    import tensorflow_datasets as tfds

    from bn_repro import main, train

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
