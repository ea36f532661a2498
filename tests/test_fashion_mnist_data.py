"""Fashion-MNIST from its IDX files: format and checksum errors, preparation, reading as the experiment does."""

import gzip
import hashlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bn_repro import classification_experiment, fashion_mnist_data
from bn_repro.mnist_data import Checksums, MnistDataError

PER_CLASS = {"train": 3, "test": 1}


def write_idx(path, array: np.ndarray) -> None:
    magic = 2051 if array.ndim == 3 else 2049
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def synthetic_files(directory) -> tuple[dict, Checksums]:
    """A small IDX set (30 train, 10 test images) in `directory`, and its checksums."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    arrays, sha256 = {}, {}
    for split, per_class in PER_CLASS.items():
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), per_class))
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        arrays[split] = (images, labels)
        write_idx(directory / fashion_mnist_data.FILES[f"{split}_images"], images)
        write_idx(directory / fashion_mnist_data.FILES[f"{split}_labels"], labels)
        sha256[f"{split}_images"] = hashlib.sha256(images.tobytes()).hexdigest()
        sha256[f"{split}_labels"] = hashlib.sha256(labels.astype("<i4").tobytes()).hexdigest()
    counts = {split: (n,) * 10 for split, n in PER_CLASS.items()}
    return arrays, Checksums(label_counts=counts, sha256=sha256)


def test_prepared_from_the_manual_dir_and_read_as_the_experiment_reads_it(tmp_path):
    arrays, checksums = synthetic_files(tmp_path / "downloads" / "manual")
    assert fashion_mnist_data.find_source_dir(str(tmp_path)) == tmp_path / "downloads" / "manual"
    fashion_mnist_data.prepare_fashion_mnist(str(tmp_path), expected=checksums)
    for split, (images, labels) in arrays.items():
        source = classification_experiment.open_split("fashion_mnist", split, str(tmp_path))
        assert len(source) == len(labels)
        got = [source[i] for i in range(len(source))]  # In the files' order, one grey channel.
        np.testing.assert_array_equal(np.stack([e["image"] for e in got]), images[..., None])
        np.testing.assert_array_equal([e["label"] for e in got], labels)
    info = tfds.builder_from_directory(str(tmp_path / "fashion_mnist" / "3.0.1")).info
    assert info.features["label"].names == list(fashion_mnist_data.CLASS_NAMES)
    fashion_mnist_data.prepare_fashion_mnist(str(tmp_path), expected=checksums)  # Already there: kept.


def test_wrong_contents_are_refused_before_anything_is_written(tmp_path):
    arrays, checksums = synthetic_files(tmp_path / "downloads" / "manual")
    labels = arrays["test"][1].copy()
    labels[:2] = labels[1::-1] if labels[0] != labels[1] else (labels[0] + 1) % 10
    write_idx(tmp_path / "downloads" / "manual" / fashion_mnist_data.FILES["test_labels"], labels)
    with pytest.raises(MnistDataError, match=r"Fashion-MNIST source test labels in .*downloads/manual"):
        fashion_mnist_data.prepare_fashion_mnist(str(tmp_path), expected=checksums)
    assert not (tmp_path / "fashion_mnist" / "3.0.1").exists()
    with pytest.raises(MnistDataError, match=r"Fashion-MNIST source train images .* expected uint8 \(60000, 28, 28\)"):
        fashion_mnist_data.prepare_fashion_mnist(str(tmp_path))  # The real counts: 6,000 per class.


def test_a_file_that_is_not_idx_is_named(tmp_path):
    synthetic_files(tmp_path)
    path = tmp_path / fashion_mnist_data.FILES["train_images"]
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(100)))  # A labels magic number.
    with pytest.raises(MnistDataError, match=f"{path} is not an IDX file of Fashion-MNIST images"):
        fashion_mnist_data.read_source(tmp_path, expected=None)
    path.write_bytes(b"not gzip")
    with pytest.raises(MnistDataError, match=f"{path} is not a readable gzip file"):
        fashion_mnist_data.read_source(tmp_path, expected=None)


def test_missing_files_name_the_directory_and_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist_data, "DEBIAN_DIR", tmp_path / "not-installed")
    with pytest.raises(MnistDataError) as error:
        fashion_mnist_data.prepare_fashion_mnist(str(tmp_path))
    message = str(error.value)
    assert str(tmp_path / "downloads" / "manual") in message and "apt-get install dataset-fashion-mnist" in message
    assert "train-images-idx3-ubyte.gz" in message and not (tmp_path / "fashion_mnist").exists()


@pytest.mark.skipif(not fashion_mnist_data.DEBIAN_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_the_real_files_match_their_checksums():
    # .ci/run installs the Debian package, so this runs in CI.
    source = fashion_mnist_data.read_source(fashion_mnist_data.DEBIAN_DIR)
    assert [len(labels) for _, labels in source.values()] == [60_000, 10_000]


def test_a_damaged_dataset_info_is_named_with_what_to_do(tmp_path):
    _, checksums = synthetic_files(tmp_path / "downloads" / "manual")
    fashion_mnist_data.prepare_fashion_mnist(str(tmp_path), expected=checksums)
    info = tmp_path / "fashion_mnist" / "3.0.1" / "dataset_info.json"
    info.write_text(info.read_text()[:40])  # cut short
    with pytest.raises(MnistDataError, match=r"fashion_mnist/3.0.1 holds a prepared dataset that cannot be read.*"
                                             r"Delete .*fashion_mnist and re-run"):
        fashion_mnist_data.prepare_fashion_mnist(str(tmp_path), expected=checksums)
