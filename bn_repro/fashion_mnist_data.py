"""Fashion-MNIST as a TFDS dataset (array_record, read with `data_source`, no TensorFlow).

The stand-in for ImageNet in the small-scale Sec. 4.2 comparisons: 60,000
training and 10,000 test 28x28 grey images of 10 balanced clothing classes
(Xiao et al. 2017), read by the classification experiment exactly as
``imagenet2012`` is (``data.dataset='fashion_mnist'``).

Source: the four original IDX files (the ones TFDS's own ``fashion_mnist``
downloads), taken from ``<data_dir>/downloads/manual/`` or, if not there, from
where Debian's ``dataset-fashion-mnist`` package installs them. `FashionMnist`
writes them, in the files' order, as the TFDS dataset ``fashion_mnist`` 3.0.1
(TFDS's features). The files' contents are checked by sha256 and label counts
before anything is written, and the prepared dataset again after.
"""

import gzip
import os
from pathlib import Path

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from bn_repro.image_data import default_data_dir
from bn_repro.mnist_data import Checksums, MnistDataError, build_once, read_arrays, redo_advice, verify_arrays

NAME = "fashion_mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# sha256 of the decompressed contents as arrays (uint8 (N, 28, 28) images, labels
# as little-endian int32), not of the .gz files: Debian's gzip headers differ
# from the original download's (24 bytes smaller each) while the contents agree.
REAL_FASHION_MNIST = Checksums(
    label_counts={"train": (6000,) * 10, "test": (1000,) * 10},
    sha256={
        "train_images": "2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012",
        "train_labels": "d69b1d6e0b8064974aa5aecc2786f961b8b2be829ee3a39dd8989efee46cad5a",
        "test_images": "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
        "test_labels": "53fdd09ed9cbcd893df0e3b0af7802f2d62457de11c87273d4b4186f4992a40c",
    },
)
_MAGIC = {"images": 2051, "labels": 2049}  # IDX: unsigned bytes, 3 or 1 dimensions.


def _how_to_get(manual: Path) -> str:
    return (
        f"Either install Debian's package (`sudo apt-get install dataset-fashion-mnist`, which puts them in "
        f"{DEBIAN_DIR}), or copy the four files TFDS's own fashion_mnist downloads ({', '.join(FILES.values())}, "
        "from http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/) into " + str(manual) + "."
    )


def find_source_dir(data_dir: str) -> Path:
    """`<data_dir>/downloads/manual/` if it holds the four files, else DEBIAN_DIR if it does."""
    manual = Path(data_dir) / "downloads" / "manual"
    for directory in (manual, DEBIAN_DIR):
        if all((directory / name).is_file() for name in FILES.values()):
            return directory
    missing = [name for name in FILES.values() if not (manual / name).is_file()]
    raise MnistDataError(
        f"Fashion-MNIST's original files are in neither {manual} (missing {', '.join(missing)}) nor {DEBIAN_DIR}. "
        + _how_to_get(manual)
    )


def read_idx(path: str | os.PathLike, kind: str) -> np.ndarray:
    """A gzipped IDX file of `kind` 'images' (uint8 (N, 28, 28)) or 'labels' (uint8 (N,)).

    Raises MnistDataError naming the file if it is not such an IDX file.
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise MnistDataError(f"{path} is not a readable gzip file ({e}); replace it.") from e
    ndim = 3 if kind == "images" else 1
    header = 4 + 4 * ndim
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)) if len(raw) >= header else ()
    if magic != _MAGIC[kind] or len(raw) != header + int(np.prod(shape)) or (kind == "images" and shape[1:] != (28, 28)):
        raise MnistDataError(
            f"{path} is not an IDX file of Fashion-MNIST {kind} (magic {magic}, shape {shape}, "
            f"{len(raw)} bytes); replace it."
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def read_source(directory: str | os.PathLike, expected: Checksums | None = REAL_FASHION_MNIST) -> dict:
    """{'train': (images, labels), 'test': ...} from the four files in `directory`,
    checked against `expected` (None: only their format)."""
    directory = Path(directory)
    arrays = {key: read_idx(directory / name, key.split("_")[1]) for key, name in FILES.items()}
    if expected is not None:
        verify_arrays(arrays, expected, "Fashion-MNIST source", str(directory),
                      f"Replace the files in {directory}. " + _how_to_get(directory))
    return {split: (arrays[f"{split}_images"], arrays[f"{split}_labels"]) for split in ("train", "test")}


class FashionMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder `fashion_mnist` 3.0.1 from the four IDX files in `source_dir`.

    Not registered, so TFDS's own `fashion_mnist` stays importable; what it
    writes is read back by `tfds.data_source('fashion_mnist', ...)` as any
    prepared TFDS dataset.
    """

    VERSION = tfds.core.Version("3.0.1")
    MANUAL_DOWNLOAD_INSTRUCTIONS = _how_to_get(Path("<data_dir>/downloads/manual"))

    def __init__(self, *, source_dir: str | os.PathLike | None = None,
                 expected: Checksums | None = REAL_FASHION_MNIST, **kwargs):
        self._source_dir, self._expected = source_dir, expected
        super().__init__(**kwargs)
        self._original_state.update(source_dir=source_dir, expected=expected)  # For pickling.

    def _info(self) -> tfds.core.DatasetInfo:
        image, label = tfds.features.Image(shape=(28, 28, 1)), tfds.features.ClassLabel(names=CLASS_NAMES)
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST (Xiao et al. 2017), from the original IDX files, in their order.",
            features=tfds.features.FeaturesDict({"image": image, "label": label}),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # Keep the files' order (TFDS shuffles by key otherwise).
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        )

    def _split_generators(self, dl_manager):
        source = read_source(self._source_dir, self._expected)
        return {split: self._generate_examples(x, y) for split, (x, y) in source.items()}

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": PIL.Image.fromarray(image, mode="L"), "label": int(label)}


def prepare_fashion_mnist(data_dir: str | None = None, source_dir: str | os.PathLike | None = None,
                          expected: Checksums | None = REAL_FASHION_MNIST) -> str:
    """Builds `<data_dir>/fashion_mnist/3.0.1` (array_record) unless it is there; returns the data dir.

    The source is `source_dir`, else `find_source_dir(data_dir)`. The files are
    checked before anything is written, and the written dataset after.
    `expected=None` skips the checks (synthetic files of other sizes).
    """
    data_dir = os.fspath(data_dir or default_data_dir())
    def source() -> dict:
        return {"source_dir": Path(source_dir or find_source_dir(data_dir)), "expected": expected}

    if build_once(FashionMnist, data_dir, source) and expected is not None:
        redo = redo_advice(data_dir, NAME)
        verify_arrays(read_arrays(FashionMnist(data_dir=data_dir), "Fashion-MNIST", redo),
                      expected, "Fashion-MNIST", f"data dir {data_dir}", redo)
    return data_dir
