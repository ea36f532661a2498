"""Shared fixtures: small generated copies of the MNIST source (no network)."""

import gzip
import hashlib
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bn_repro import mnist_data

SIZES = {"train": 50, "valid": 10, "test": 20}


def make_source(directory: Path, seed: int = 0, scale: float = 256.0, sizes: dict[str, int] = SIZES):
    """Writes a fake wheel; returns it and the uint8 pixels/labels per part."""
    rng = np.random.default_rng(seed)
    parts = {}
    for name, n in sizes.items():
        pixels = rng.integers(0, 256, size=(n, 784), dtype=np.int64).astype(np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.int64)
        parts[name] = (pixels, labels)
    data = tuple((p.astype(np.float32) / np.float32(scale), y) for p, y in parts.values())
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / mnist_data.SOURCE_WHEEL
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("mnist/data/mnist.pkl.gz", gzip.compress(pickle.dumps(data, protocol=2)))
    return wheel, parts


def source_checksums(parts) -> mnist_data.Checksums:
    """Independent computation of what the prepared data must hash to."""
    splits = {
        "train": (
            np.concatenate([parts["train"][0], parts["valid"][0]]),
            np.concatenate([parts["train"][1], parts["valid"][1]]),
        ),
        "test": parts["test"],
    }

    def sha(b):
        return hashlib.sha256(b).hexdigest()

    return mnist_data.Checksums(
        label_counts={s: tuple(np.bincount(y, minlength=10).tolist()) for s, (_, y) in splits.items()},
        sha256={
            **{f"{s}_images": sha(x.tobytes()) for s, (x, _) in splits.items()},
            **{f"{s}_labels": sha(y.astype("<i4").tobytes()) for s, (_, y) in splits.items()},
        },
    )


# Enough for a few epochs of batch 60 in the training tests.
TRAINING_SIZES = {"train": 300, "valid": 60, "test": 100}


@pytest.fixture(scope="session")
def small_mnist_dir(tmp_path_factory) -> str:
    """A prepared TFDS data dir holding a small generated `mnist` (360 train, 100 test)."""
    data_dir = tmp_path_factory.mktemp("small_mnist")
    _, parts = make_source(data_dir / "downloads" / "manual", seed=3, sizes=TRAINING_SIZES)
    mnist_data.prepare_mnist(str(data_dir), expected=source_checksums(parts))
    return str(data_dir)
