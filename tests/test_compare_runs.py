"""scripts/compare_runs.py and bn_repro.compare on real small MNIST runs, and the run record's environment."""

import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import pytest

from bn_repro import compare, train
from bn_repro import run_records
from bn_repro.main import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "compare_runs.py")


def small_config(data_dir: str, **overrides):
    """configs/mnist.py:bn, 100 steps, evaluated every 50, on the generated MNIST (as tests/test_train.py)."""
    fields = {
        "num_steps": 100, "eval_every": 50, "checkpoint_every": 100, "bn.population_batches": 20,
        "data.data_dir": data_dir, "data.verify_checksums": False, **overrides,
    }
    spec = f"{os.path.join(REPO, 'configs', 'mnist.py')}:bn"
    return load_config(spec, [f"--config.{k}={v}" for k, v in fields.items()])


@pytest.fixture(scope="module")
def runs(small_mnist_dir, tmp_path_factory) -> dict[str, str]:
    """Three real runs: ``a``; ``b`` with another learning rate; ``a_again``, a's config again."""
    root = tmp_path_factory.mktemp("runs")
    configs = {"a": small_config(small_mnist_dir), "b": small_config(small_mnist_dir, learning_rate=0.1)}
    configs["a_again"] = configs["a"]
    for name, config in configs.items():
        train.train_and_evaluate(config, str(root / name))
    return {name: str(root / name) for name in configs}


def evaluations(run_dir: str) -> list[tuple[int, float, float]]:
    """(step, test accuracy, train loss) of each evaluation during training, read directly."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [(r["step"], r["test_accuracy"], r["train_loss"]) for r in records if "test_accuracy" in r]


def line_of(text: str, run: str) -> str:
    return next(line for line in text.splitlines() if line.split() and line.split()[0] == run)


def test_runs_table_curves_and_config_differences(runs):
    a, b = evaluations(runs["a"]), evaluations(runs["b"])
    target = max(acc for _, acc, _ in a)  # reached by a, at its best evaluation
    comparison = compare.compare([runs["a"], runs["b"]], target=target)
    text = compare.render(comparison)

    for row, run, curve in zip(comparison.rows, ("a", "b"), (a, b)):
        assert row["run"] == run and row["status"] == "finished"
        assert row["final_accuracy"] == curve[-1][1] and row["best_accuracy"] == max(x for _, x, _ in curve)
        assert row["steps_to_target"] == next((s for s, acc, _ in curve if acc >= target), None)
        assert (row["device_kind"], row["device_count"], row["process_count"]) == (jax.devices()[0].device_kind, 1, 1)
        assert row["precision"] == "float32" and row["global_batch_size"] == 60
        assert f"{curve[-1][1]:.4f}" in line_of(text, run)
    assert comparison.rows[0]["steps_to_target"] is not None

    (curves,) = comparison.curves
    assert curves["common_evaluations"] == 2
    assert curves["max_accuracy_diff"] == max(abs(x[1] - y[1]) for x, y in zip(a, b))
    assert curves["max_loss_diff"] == max(abs(x[2] - y[2]) for x, y in zip(a, b)) > 0
    assert curves["first_step_over_tolerance"] == 50

    (diffs,) = comparison.configs
    assert diffs == {"config.learning_rate": (0.5, 0.1)}
    assert "config.learning_rate" in line_of(text.split("Config differences")[1], "b")

    # The default target (0.97) is out of reach of these runs.
    default = compare.compare([runs["a"]])
    assert default.rows[0]["target"] == 0.97 and default.rows[0]["steps_to_target"] is None
    assert "never" in line_of(compare.render(default), "a")


def test_identical_configs_give_identical_curves(runs):
    comparison = compare.compare([runs["a"], runs["a_again"]])
    assert comparison.configs == [{}]
    (curves,) = comparison.curves
    assert curves["max_accuracy_diff"] == curves["max_loss_diff"] == 0.0  # bitwise on CPU
    assert curves["first_step_over_tolerance"] is None
    assert "The configs are identical" in compare.render(comparison)


def test_script_writes_markdown_and_csv(runs, tmp_path):
    markdown, table = tmp_path / "c.md", tmp_path / "c.csv"
    result = subprocess.run(
        [sys.executable, SCRIPT, runs["a"], runs["b"], "--markdown", str(markdown), "--csv", str(table)],
        capture_output=True, text=True, check=True,
    )
    assert "config.learning_rate" in result.stdout

    rows = [[cell.strip() for cell in line.strip("|").split(" | ")]
            for line in markdown.read_text().splitlines() if line.startswith("|")]
    runs_rows = [r for r in rows if r[0] in ("a", "b") and len(r) == len(rows[0])]
    assert [r[0] for r in runs_rows] == ["a", "b"]
    assert [r[6] for r in runs_rows] == [f"{evaluations(runs[n])[-1][1]:.4f}" for n in ("a", "b")]
    assert ["b", "config.learning_rate", "0.5", "0.1"] in rows

    with open(table, newline="") as f:
        records = list(csv.DictReader(f))
    assert [r["run"] for r in records] == ["a", "b"]
    assert [float(r["final_accuracy"]) for r in records] == [evaluations(runs[n])[-1][1] for n in ("a", "b")]
    assert records[0]["steps_to_target"] == ""  # never reaches 0.97


def test_unfinished_and_diverged_runs(runs, tmp_path):
    unfinished, diverged = tmp_path / "unfinished", tmp_path / "diverged"
    for run_dir in (unfinished, diverged):
        run_dir.mkdir()
        shutil.copy(os.path.join(runs["a"], "config.json"), run_dir)
    with open(os.path.join(runs["a"], "metrics.jsonl")) as f:
        (unfinished / "metrics.jsonl").write_text(f.readline())  # interrupted after the first evaluation
    (diverged / "metrics.jsonl").write_text(json.dumps({"step": 7, "diverged": True}) + "\n")
    (diverged / "summary.json").write_text(json.dumps({"variant": "bn", "diverged": True, "wall_time_s": 1.5}))

    comparison = compare.compare([runs["a"], str(unfinished), str(diverged)])
    rows = {r["run"]: r for r in comparison.rows}
    assert rows["unfinished"]["status"] == "unfinished"
    assert rows["unfinished"]["final_accuracy"] == evaluations(runs["a"])[0][1]
    assert rows["unfinished"]["device_kind"] is None and rows["unfinished"]["wall_time_s"] is not None
    assert rows["diverged"]["status"] == "diverged at step 7"
    assert rows["diverged"]["final_accuracy"] is None and rows["diverged"]["wall_time_s"] == 1.5
    assert [c["common_evaluations"] for c in comparison.curves] == [1, 0]
    text = compare.render(comparison)
    assert "not yet" in line_of(text, "unfinished") and "diverged at step 7" in text


def test_same_config_on_more_devices_reports_what_changes(runs, tmp_path):
    """bn.statistics='per_device' on 2 devices normalises over half the batch; other jax versions are shown."""
    copies = []
    for name, devices, jax_version in (("one", 1, "0.10.2"), ("two", 2, "0.10.3")):
        shutil.copytree(runs["a"], tmp_path / name)
        for file, edit in (("config.json", lambda c: c["bn"].update(statistics="per_device")),
                           ("summary.json", lambda s: s["environment"].update(device_count=devices, jax=jax_version))):
            with open(tmp_path / name / file) as f:
                content = json.load(f)
            edit(content)
            (tmp_path / name / file).write_text(json.dumps(content))
        copies.append(str(tmp_path / name))
    comparison = compare.compare(copies)
    assert comparison.configs == [{"environment.jax": ("0.10.2", "0.10.3"), "BN batch": (60, 30)}]
    assert "cpu x 2" in line_of(compare.render(comparison), "two")


def test_missing_files_give_errors_naming_the_directory(runs, tmp_path):
    shutil.copy(os.path.join(runs["a"], "config.json"), tmp_path)
    with pytest.raises(compare.RunDirError, match=f"{tmp_path}: no metrics.jsonl"):
        compare.compare([runs["a"], str(tmp_path)])
    os.remove(tmp_path / "config.json")
    with pytest.raises(compare.RunDirError, match=f"{tmp_path}: no config.json"):
        compare.compare([str(tmp_path)])
    result = subprocess.run([sys.executable, SCRIPT, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and f"error: {tmp_path}: no config.json" in result.stderr


def test_the_run_records_its_environment(runs, monkeypatch):
    with open(os.path.join(runs["a"], "summary.json")) as f:
        env = json.load(f)["environment"]
    assert env["local_device_count"] == jax.local_device_count()
    assert env["xla_flags"] == os.environ["XLA_FLAGS"]  # with what `import bn_repro` added
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout
        assert env["git_commit"] == head.stdout.strip() and isinstance(env["git_dirty"], bool)

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert run_records.git_state() == (None, None)
    assert run_records.environment_info("cmd")["git_commit"] is None


@pytest.mark.parametrize("flags, expected", [
    ({"fma", "avx2"}, "AVX2, no AVX-512"),
    ({"avx2", "avx512f", "avx512_bf16", "amx_tile"}, "AVX-512, AVX512-BF16, AMX"),
    ({"avx2", "avx512f"}, "AVX-512"),
    ({"sse4_2"}, "no AVX2"),
])
def test_the_run_record_names_the_cpus_vector_instructions(flags, expected):
    """A virtual machine's CPU name ("AMD EPYC") does not say whether it has AVX-512, which sets the matmul rates
    that benchmarks on two such machines are compared by."""
    assert run_records.vector_instructions(flags) == expected
