"""benchmarks/bench_input_pipeline.py on a tiny synthetic imagenet2012: written as TFDS's
builder would, read by the project's own open_split and batch streams, timed and reported."""

import json
import math
import sys

import numpy as np
import pytest

from bn_repro import classification_experiment, imagenet_data
from test_scripts import load_script, table

SIZES = {"train": 40, "validation": 24}  # validation: (warmup 1 x 1 worker + 2 x 1 batch) x 8, the eval stream
TARGET = 10_000.0


@pytest.fixture
def bench(monkeypatch):
    return load_script("benchmarks/bench_input_pipeline.py", monkeypatch)


def test_bench_input_pipeline_tiny(tmp_path, bench, capsys):
    """40 training JPEGs of 64x48, 32x32 crops, batch 8, 0 and 1 workers, 1 warm-up and 2 x 1 timed batches.
    The JPEGs are made in this process (spawning a pool of writers costs more than 64 tiny images)."""
    data_dir, output = str(tmp_path / "data"), tmp_path / "out" / "input_pipeline.md"
    argv = ["--data_dir", data_dir, "--num_images", "40", "--width", "64", "--height", "48", "--image_size", "32",
            "--batch_size", "8", "--workers", "0,1", "--warmup", "1", "--batches", "1", "--repeats", "2",
            "--target_images_per_sec", str(TARGET), "--write_processes", "1", "--output", str(output)]
    assert bench.main(argv) == 0
    assert "tensorflow" not in sys.modules  # written and read without TensorFlow

    # The dataset: the project's open_split reads it, as a training run would.
    for split, n in SIZES.items():
        source = classification_experiment.open_split(imagenet_data.NAME, split, data_dir)
        assert len(source) == n
        example = source[n - 1]
        assert example["image"].shape == (48, 64, 3) and example["image"].dtype == np.uint8
        assert example["image"].std() > 10  # not a flat colour
        assert 0 <= example["label"] < 1000 and example["file_name"].decode().startswith(f"synthetic_{split}_")

    text = output.read_text()
    assert text in capsys.readouterr().out
    record = json.loads(output.with_suffix(".json").read_text())
    rows = record["rows"]
    assert [(r["path"], r["workers"]) for r in rows] == [("train", 0), ("train", 1), ("eval", 0), ("eval", 1)]
    for r in rows:
        assert len(r["images_per_s_each"]) == 2
        assert r["images_per_s"] == pytest.approx(np.median(r["images_per_s_each"]))
        assert r["images_per_s"] > 0 and r["cpu_ms_per_image"] > 0
        assert r["batch_shape"] == [8, 32, 32, 3]
    assert rows[1]["images_per_s_per_worker"] == rows[1]["images_per_s"] and rows[0]["images_per_s_per_worker"] is None
    stats = record["dataset"]["train"]
    assert (stats["num_images"], stats["width"], stats["height"]) == (40, 64, 48) and 0 < stats["min_kb"]

    # Workers needed: from the 1-worker training row (the most workers within the cores).
    estimate = record["estimate"]
    assert estimate["from_workers"] == 1
    assert estimate["workers_needed"] == math.ceil(TARGET / rows[1]["images_per_s"]) >= 1
    assert f"**{estimate['workers_needed']} workers**" in text

    header, body = table(text)
    assert header[:4] == ["path", "workers", "reader threads/process", "images/s (min-max)"]
    assert [row[1] for row in body] == ["0", "1", "0", "1"]
    assert f"{stats['mean_kb']:.0f} KB each" in text

    # Run again on the same data dir: reused; with other sizes: refused.
    assert bench.write_dataset(data_dir, SIZES, 64, 48, 90) is None
    with pytest.raises(SystemExit, match="already holds"):
        bench.write_dataset(data_dir, {**SIZES, "train": 41}, 64, 48, 90)


def test_estimate_uses_the_most_workers_within_the_cores(bench):
    rows = [{"path": path, "workers": w, "images_per_s": rate, "cpu_ms_per_image": 20.0,
             "images_per_s_per_worker": rate / w if w else None}
            for path in ("train", "eval") for w, rate in ((0, 90.0), (1, 50.0), (2, 80.0), (4, 100.0))]
    e = bench.estimate(rows, 1000.0, cores=2)
    assert (e["from_workers"], e["images_per_s_per_worker"]) == (2, 40.0)
    assert (e["workers_needed"], e["cores_needed"]) == (25, 20)  # ceil(1000 / 40), 1000 x 20 ms
    assert bench.estimate(rows, 1000.0, cores=8)["workers_needed"] == 40  # 4 workers: 25 images/s each
    assert bench.estimate(rows, 120.0, cores=1)["workers_needed"] == 3  # ceil(120 / 50)
    assert bench.estimate(rows, None, cores=2) is None
