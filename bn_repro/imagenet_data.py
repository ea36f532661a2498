"""ImageNet (TFDS `imagenet2012`): finding, preparing and opening it.

The paper trains Inception with BN on the ILSVRC2012 training set (1.28M
images, 1000 classes) and reports single-crop accuracy on the 50,000
validation images (Sec. 4.2). Preparing the array_record files once from the
official tars needs TensorFlow (`scripts/prepare_imagenet.py`); reading them
(`bn_repro.image_data`, grain, PIL) does not. This module says precisely what
is missing when they cannot be read.
"""

import os
from collections.abc import Sequence

import tensorflow_datasets as tfds

from bn_repro import image_data
from bn_repro.image_data import ImageDataError, default_data_dir

NAME = "imagenet2012"
TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
TAR_BYTES = {TRAIN_TAR: 147897477120, VAL_TAR: 6744924160}
PREPARE_COMMAND = "python scripts/prepare_imagenet.py --data_dir={}"


class ImagenetDataError(ImageDataError):
    """ImageNet is missing, incomplete, or prepared in a format we cannot read."""


def manual_dir(data_dir: str | None) -> str:
    """`<data_dir>/downloads/manual`, where TFDS looks for the tars by default."""
    return os.path.join(data_dir or default_data_dir(), "downloads", "manual")


_default_manual_dir = manual_dir  # prepare_imagenet's argument shadows the name.


def check_manual_dir(manual_dir: str) -> None:
    """Raises ImagenetDataError naming every missing or incomplete tar in `manual_dir`."""
    problems = []
    for name, expected in TAR_BYTES.items():
        path = os.path.join(manual_dir, name)
        if not os.path.isfile(path):
            problems.append(f"missing: {path}")
        elif (size := os.path.getsize(path)) != expected:
            problems.append(f"incomplete: {path} has {size} bytes, the official file {expected}")
    if problems:
        raise ImagenetDataError(
            "ImageNet (ILSVRC2012) tars are not in place:\n  " + "\n  ".join(problems) + "\n"
            f"Download {TRAIN_TAR} and {VAL_TAR} from https://image-net.org/download-images "
            f"(registration required) and put them in {manual_dir}."
        )


def open_split(split: str, data_dir: str | None) -> Sequence[dict]:
    """The prepared split as a random-access sequence of {'image': uint8 HxWx3, 'label', ...}.

    On failure, says why: prepared as tfrecord (unreadable without TensorFlow),
    tars missing, or tars present but not yet prepared.
    """
    data_dir = data_dir or default_data_dir()
    try:  # Not gated on is_prepared(): tfds.testing.mock_data serves unprepared datasets.
        return image_data.open_split(NAME, split, data_dir)
    except ImageDataError as error:
        builder = tfds.builder(NAME, data_dir=data_dir)
        if builder.is_prepared():
            fmt = builder.info.file_format
            if fmt != tfds.core.FileFormat.ARRAY_RECORD:
                raise ImagenetDataError(
                    f"{builder.data_dir} is prepared in the {fmt.value} format, which cannot be read "
                    f"without TensorFlow. Delete it and re-prepare with array_record "
                    f"(`{PREPARE_COMMAND.format(data_dir)}`), or use another data dir."
                ) from error
            raise ImagenetDataError(f"Cannot read {split!r} from {builder.data_dir}: {error.__cause__}") from error
        check_manual_dir(manual_dir(data_dir))
        raise ImagenetDataError(
            f"ImageNet is not prepared in data dir {data_dir} (the tars are in place). Run "
            f"`{PREPARE_COMMAND.format(data_dir)}` once; it needs TensorFlow "
            "(`pip install '.[prepare]'`)."
        ) from error


def prepare_imagenet(data_dir: str | None, manual_dir: str | None = None) -> None:
    """Builds `<data_dir>/imagenet2012/<version>` as array_record from the tars (needs TensorFlow)."""
    data_dir = data_dir or default_data_dir()
    manual = manual_dir or _default_manual_dir(data_dir)
    check_manual_dir(manual)
    try:
        import tensorflow  # noqa: F401  The official builder reads the tars with tf.io.gfile.
    except ImportError as error:
        raise ImagenetDataError(
            "Preparing ImageNet needs TensorFlow (once; training reads it without). "
            "Run `pip install '.[prepare]'` (tensorflow-cpu) and retry."
        ) from error
    builder = tfds.builder(NAME, data_dir=data_dir, file_format="array_record")
    if builder.is_prepared() and builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ImagenetDataError(
            f"{builder.data_dir} is already prepared as {builder.info.file_format.value}; "
            "delete it or use another data dir."
        )
    config = tfds.download.DownloadConfig(manual_dir=manual)
    builder.download_and_prepare(file_format="array_record", download_config=config)
