"""The paper's ImageNet variants train through the real training path and pipeline.

Each variant trains at the ``:small`` size on TFDS's mock imagenet2012. To
share start-up and compiled programs, the runs go in two groups, each one
process (``tests/mock_imagenet_runs.py``: the entry point's training, after
its flag parsing) on its own core; the resume test then reruns a copy of the
bn_x5 run through the entry point itself (``tests/mock_imagenet_main.py``).
They start when the first test needs them.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bn_repro import run_records
from conftest import subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "imagenet.py")
MOCK_MAIN = os.path.join(REPO, "tests", "mock_imagenet_main.py")
NUM_EXAMPLES = 20  # per split; 20 validation examples in batches of 8: the last is padded.
VARIANTS = (
    "inception", "bn_baseline", "bn_x5", "bn_x30", "bn_x5_sigmoid", "inception_x5", "inception_sigmoid", "googlenet",
)
# A tiny net makes small steps: it needs a larger base rate (x5 -> 5.0) to reach
# machine infinity within a few steps, as the full-size net does at 0.0075.
DIVERGING = ["--config.learning_rate=1.0", "--config.num_steps=20", "--config.eval_every=10",
             "--config.checkpoint_every=20"]
# XLA's CPU compile time dominates these tiny runs: conftest.py lowers XLA's
# optimisation level and shares a compilation cache with the subprocesses.
ENV = subprocess_env()


MOCK_RUNS = os.path.join(REPO, "tests", "mock_imagenet_runs.py")


def run_group(root, jobs: dict[str, tuple[str, ...]]) -> None:
    """Runs ``{name: (variant, *overrides)}`` one after the other in one process,
    each in ``root/name``; a failed run leaves ``root/name/error.txt``."""
    spec = [[str(root / name), f"{CONFIG}:{variant}:small", ["--config.data.data_dir=/nonexistent/tfds", *overrides]]
            for name, (variant, *overrides) in jobs.items()]
    jobs_path = root / f"jobs_{next(iter(jobs))}.json"
    jobs_path.write_text(json.dumps(spec))
    subprocess.run([sys.executable, MOCK_RUNS, str(NUM_EXAMPLES), str(jobs_path)], capture_output=True, text=True,
                   env=ENV, cwd=REPO)


def run_main(workdir: str, variant: str, *overrides: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, MOCK_MAIN, str(NUM_EXAMPLES), f"--config={CONFIG}:{variant}:small",
        f"--workdir={workdir}", "--config.data.data_dir=/nonexistent/tfds", *overrides,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def resumed_run(root) -> None:
    """The bn_x5 run (4 steps, checkpoints at 2 and 4) again, as if it had crashed just
    before the checkpoint at step 4 was written: a copy without that checkpoint, run
    again with the same command through the entry point."""
    workdir = str(root / "resumed")
    shutil.copytree(root / "bn_x5", workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    run_main(workdir, "bn_x5", *RESUMABLE)


def group_then_resume(root, group: dict) -> None:
    run_group(root, group)
    resumed_run(root)


# bn_x5 checkpoints at steps 2 and 4, so that the resume test can start from 2.
RESUMABLE = ("--config.checkpoint_every=2",)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet_runs")
    groups = [  # about equal work each; same-width nets in a group share compiled programs
        {"bn_x5": ("bn_x5", *RESUMABLE), "bn_x30": ("bn_x30", "--config.data.num_workers=2"),
         "bfloat16": ("bn_x5", "--config.model.dtype=bfloat16")},
        {"inception": ("inception",), "inception_sigmoid": ("inception_sigmoid",), "diverging": ("inception_x5", *DIVERGING),
         "inception_x5": ("inception_x5",), "googlenet": ("googlenet",), "bn_x5_sigmoid": ("bn_x5_sigmoid",),
         "bn_baseline": ("bn_baseline",)},
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(group_then_resume, root, groups[0]), pool.submit(run_group, root, groups[1])]
        errors = {"resumed": futures[0].exception()}
    for name in (n for group in groups for n in group):
        error = root / name / "error.txt"
        errors[name] = AssertionError(error.read_text()) if error.exists() else None
        if not (root / name / "summary.json").exists() and errors[name] is None:
            errors[name] = AssertionError(f"run {name} wrote no summary.json (its group's process died?)")
    return {"root": root, "errors": errors}


def load_run(runs, name: str) -> tuple[list[dict], dict, dict]:
    if runs["errors"][name] is not None:
        raise runs["errors"][name]
    workdir = runs["root"] / name
    with open(workdir / "summary.json") as f:
        summary = json.load(f)
    with open(workdir / "config.json") as f:
        config = json.load(f)
    return run_records.read_metrics(str(workdir / "metrics.jsonl")), summary, config


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_with_finite_loss(runs, variant):
    records, summary, config = load_run(runs, variant)
    evaluations = [r for r in records if "val_top1" in r]
    assert [r["step"] for r in evaluations] == [2, 4]
    for r in evaluations:
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"])
        assert 0.0 <= r["val_top1"] <= r["val_top5"] <= 1.0
        # Every one of the 20 validation examples counted once (the padded
        # slots of the last batch of 8 are not): accuracies are k/20.
        assert r["val_top5"] * NUM_EXAMPLES == pytest.approx(round(r["val_top5"] * NUM_EXAMPLES))
    assert "diverged" not in summary
    assert summary["final_val_top1"] == evaluations[-1]["val_top1"]
    assert summary["environment"]["command"].startswith("python -m bn_repro.main")
    assert config["variant"] == f"{variant}:small"
    final_model = runs["root"] / variant / "final_model"
    assert final_model.is_dir()
    after = [r for r in records if r.get(run_records.AFTER_TRAINING)]
    if config["model"]["use_bn"]:  # Algorithm 2 before the final evaluation.
        assert len(after) == 1 and math.isfinite(after[0]["val_loss_population_stats"])
        assert summary["final_val_top1_population_stats"] == after[0]["val_top1_population_stats"]
    else:
        assert after == []


def test_inception_x5_diverges_and_is_recorded(runs):
    records, summary, _ = load_run(runs, "diverging")
    assert records[-1]["diverged"] is True
    assert summary["diverged"] is True and summary["diverged_at_step"] == records[-1]["step"] <= 20
    assert not (runs["root"] / "diverging" / "final_model").exists()


def test_worker_processes_train(runs):  # the bn_x30 run decodes in 2 grain worker processes
    records, summary, config = load_run(runs, "bn_x30")
    assert config["data"]["num_workers"] == 2
    assert summary["final_step"] == 4 and all(math.isfinite(r.get("train_loss", 0.0)) for r in records)


def test_resume_gives_identical_metrics(runs):
    load_run(runs, "resumed")
    resumed = run_records.read_metrics(str(runs["root"] / "resumed" / "metrics.jsonl"))
    uninterrupted = run_records.read_metrics(str(runs["root"] / "bn_x5" / "metrics.jsonl"))

    def deterministic(records):
        return [{k: v for k, v in r.items() if k not in run_records.TIMING_KEYS} for r in records]

    assert [r["step"] for r in resumed if "val_top1" in r] == [2, 4]
    assert deterministic(resumed) == deterministic(uninterrupted)



def test_bfloat16_computation_keeps_float32_parameters_and_statistics(runs):
    records, summary, _ = load_run(runs, "bfloat16")
    assert summary["final_step"] == 4 and math.isfinite(records[-2]["train_loss"])
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(runs["root"] / "bfloat16" / "final_model")
    leaves = jax.tree.leaves(variables)
    assert leaves and all(np.asarray(x).dtype == np.float32 for x in leaves)
