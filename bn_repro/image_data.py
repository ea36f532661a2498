"""Image classification datasets from TFDS through grain: array_record, no TensorFlow.

Any TFDS image dataset prepared as array_record (``imagenet2012``, the
paper's Sec. 4.2, is one) is read with ``tfds.data_source`` and mapped with
grain: training batches of augmented crops (``imagenet_preprocessing``), and
evaluation batches covering every example once. Images are given
``channels`` channels: 3 (a grey image repeated) or 1 (a colour image turned grey).

Batches are a pure function of (seed, step): global batch k holds positions
[p*G, (p+1)*G) of `epoch_order(epoch=k // spe)`, p = k % spe, and every example
draws its augmentation from its own generator seeded by (seed, k, slot). So the
stream is the same for any number of workers or processes, and a run resumed
at step k sees exactly the batches an uninterrupted run would.
"""

import os
from collections.abc import Iterator, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from bn_repro import imagenet_preprocessing as prep

SHUFFLES = ("global", "window")
CHANNELS = (1, 3)


class ImageDataError(Exception):
    """A dataset is missing, or prepared in a format we cannot read."""


def default_data_dir() -> str:
    """`$TFDS_DATA_DIR`, else `~/tensorflow_datasets` (as TFDS itself)."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def open_split(name: str, split: str, data_dir: str | None) -> Sequence[dict]:
    """TFDS dataset ``name``'s ``split`` as a random-access sequence of
    {'image': uint8 HxWxC, 'label', ...}; ImageDataError naming the dataset and
    the data dir if it cannot be read (not prepared, or not as array_record)."""
    data_dir = data_dir or default_data_dir()
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as error:  # NotImplementedError, AssertionError, DatasetNotFoundError, ...
        raise ImageDataError(
            f"Cannot read split {split!r} of TFDS dataset {name!r} from data dir {data_dir}: {error}. "
            "It must be prepared there in the array_record format "
            "(tfds.builder(name, data_dir=..., file_format='array_record').download_and_prepare())."
        ) from error


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full batches per epoch; the remainder of each epoch is skipped."""
    return num_examples // global_batch_size


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: str, shuffle_window: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the examples (int64 indices).

    "global": a fresh permutation of all examples each epoch (Sec. 4.2.1 item 6,
    "Shuffle training examples more thoroughly").
    "window": the paper's baseline, which shuffled less: the stored order is cut
    into windows ("shards") of `shuffle_window` consecutive examples, each put
    once in a fixed random order that every epoch repeats; only the order of the
    windows changes from epoch to epoch. A short last window stays last, so with
    `shuffle_window` a multiple of the global batch every mini-batch holds the
    same examples in every epoch (only the batches' order changes).
    """
    if shuffle == "global":
        return np.random.default_rng([seed, 0, epoch]).permutation(num_examples)  # Tag 0: epoch orders.
    if shuffle == "window":
        if shuffle_window < 1:
            raise ValueError(f"shuffle_window must be >= 1, got {shuffle_window}.")
        fixed = np.random.default_rng([seed, 2])  # Tag 2: the order inside each window, every epoch.
        within = np.lexsort((fixed.random(num_examples), np.arange(num_examples) // shuffle_window))
        full = num_examples // shuffle_window
        windows = within[: full * shuffle_window].reshape(full, shuffle_window)
        shuffled = windows[np.random.default_rng([seed, 0, epoch]).permutation(full)]
        return np.concatenate([shuffled.ravel(), within[full * shuffle_window :]])
    raise ValueError(f"shuffle must be one of {SHUFFLES}, got {shuffle!r}.")


def with_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """uint8 HxW, HxWx1 or HxWx3 -> HxWx`channels`: grey repeated, or colour to grey (ITU-R 601 luma)."""
    image = np.asarray(image, np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    if channels == 3:
        return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
    if image.shape[-1] == 1:
        return image
    return np.rint(image @ np.array(prep.LUMA_WEIGHTS)).astype(np.uint8)[..., None]


def _per_process(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(f"Global batch {global_batch_size} is not divisible by {process_count} processes.")
    return global_batch_size // process_count


class _TrainSchedule(Sequence):
    """Element j of this process's stream -> (step k, slot in the global batch, example index)."""

    def __init__(self, num_examples, seed, global_batch_size, local_batch_size, process_index,
                 shuffle, shuffle_window, start_step, num_steps):
        self.n, self.seed, self.G, self.b = num_examples, seed, global_batch_size, local_batch_size
        self.offset, self.shuffle, self.window = process_index * local_batch_size, shuffle, shuffle_window
        self.start, self.num_steps = start_step, num_steps
        self.spe = steps_per_epoch(num_examples, global_batch_size)
        self._orders: dict[int, np.ndarray] = {}  # Orders of epochs near the current one.
        epoch_order(1, seed, 0, shuffle, shuffle_window)  # Fail early on a bad config.

    def __len__(self) -> int:
        return self.num_steps * self.b

    def _order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:  # Replaced, never mutated: safe under grain's reader threads.
            order = epoch_order(self.n, self.seed, epoch, self.shuffle, self.window)
            self._orders = {e: o for e, o in self._orders.items() if abs(e - epoch) <= 1} | {epoch: order}
        return order

    def __getitem__(self, j: int) -> tuple[int, int, int]:
        if not 0 <= j < len(self):
            raise IndexError(j)
        k, slot = self.start + j // self.b, self.offset + j % self.b
        epoch, p = divmod(k, self.spe)
        return k, slot, int(self._order(epoch)[p * self.G + slot])


class _TrainExample:
    """(k, slot, index) -> {'image', 'label'}: reads and augments (Sec. 4.2) one example."""

    def __init__(self, source, seed: int, image_size: int, distortion_strength: float, channels: int):
        self.source, self.seed, self.size, self.strength = source, seed, image_size, distortion_strength
        self.channels = channels

    def __call__(self, item: tuple[int, int, int]) -> dict[str, np.ndarray]:
        k, slot, index = item
        example = self.source[index]
        rng = np.random.default_rng([self.seed, 1, k, slot])
        image = prep.train_image(with_channels(example["image"], self.channels), rng, self.size, self.strength)
        return {"image": image, "label": np.int32(example["label"])}


def _read_options(num_workers: int) -> grain.ReadOptions:
    """Per process: threads, each mapping a whole batch (PIL and numpy release the GIL),
    and as many batches in flight (the buffer bounds the concurrency)."""
    threads = 2 if num_workers > 0 else max(2, min(8, os.cpu_count() or 2))
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)


def _iterate(schedule: Sequence, fn, batch_size: int, num_workers: int) -> Iterator[dict]:
    ds = grain.MapDataset.source(schedule).map(fn).batch(batch_size, drop_remainder=True)
    ds = ds.to_iter_dataset(_read_options(num_workers))
    if num_workers > 0:  # Workers take whole batches round-robin; the order is kept.
        if not flags.FLAGS.is_parsed():  # grain reads its absl flags (google/grain#1355).
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(ds)


def train_batches(source, *, seed: int, global_batch_size: int, image_size: int, distortion_strength: float,
                  shuffle: str, shuffle_window: int, start_step: int, num_steps: int, num_workers: int,
                  process_index: int = 0, process_count: int = 1, channels: int = 3) -> Iterator[dict]:
    """Batches for steps start_step .. start_step + num_steps - 1 of this process.

    Each is {'image': float32 (b, S, S, channels) in [-1, 1], 'label': int32 (b,)},
    b = global_batch_size // process_count: process i's slice [i*b, (i+1)*b)
    of the global batch (see the module docstring). With `num_workers` > 0
    (spawned processes: guard the main module) the arrays are grain
    SharedMemoryArrays (np.ndarray subclasses), freed from /dev/shm when dropped.
    """
    b = _per_process(global_batch_size, process_count)
    if steps_per_epoch(len(source), global_batch_size) < 1:
        raise ValueError(f"{len(source)} examples are fewer than one global batch of {global_batch_size}.")
    schedule = _TrainSchedule(len(source), seed, global_batch_size, b, process_index,
                              shuffle, shuffle_window, start_step, num_steps)
    return _iterate(schedule, _TrainExample(source, seed, image_size, distortion_strength, channels), b, num_workers)


def num_eval_batches(num_examples: int, global_batch_size: int, process_count: int = 1) -> int:
    """Batches each process yields so that its (largest) shard is covered."""
    b = _per_process(global_batch_size, process_count)
    largest_shard = -(-num_examples // process_count)  # Ceiling divisions.
    return -(-largest_shard // b)


class _EvalSchedule(Sequence):
    """Element j -> example index of this process's shard, or -1 for padding."""

    def __init__(self, start: int, stop: int, length: int):
        self.start, self.stop, self.length = start, stop, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, j: int) -> int:
        if not 0 <= j < self.length:
            raise IndexError(j)
        return self.start + j if self.start + j < self.stop else -1


class _EvalExample:
    """Index -> {'image', 'label', 'mask'}: the paper's single central crop, or
    GoogLeNet's 144 crops stacked (crops=144); -1 (padding) -> masked zeros."""

    def __init__(self, source, image_size: int, crop_fraction: float, crops: int, channels: int):
        self.source, self.size, self.crop_fraction, self.crops = source, image_size, crop_fraction, crops
        self.channels = channels

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        if index < 0:
            shape = (self.size, self.size, self.channels)
            shape = shape if self.crops == 1 else (self.crops, *shape)
            image, label = np.zeros(shape, np.float32), 0
        else:
            example = self.source[index]
            pixels = with_channels(example["image"], self.channels)
            if self.crops == 1:
                image = prep.eval_image(pixels, self.size, self.crop_fraction)
            else:
                image = prep.multicrop_images(pixels, self.size)
            label = example["label"]
        return {"image": image, "label": np.int32(label), "mask": np.float32(index >= 0)}


EVAL_CROPS = (1, 144)


def eval_batches(source, *, global_batch_size: int, image_size: int, crop_fraction: float, num_workers: int,
                 process_index: int = 0, process_count: int = 1, crops: int = 1,
                 channels: int = 3) -> Iterator[dict]:
    """Every example once across processes: process i reads [i*n//P, (i+1)*n//P).

    Each process yields `num_eval_batches` batches {'image', 'label', 'mask'}
    of b = global_batch_size // process_count; padding has zero images and mask 0.
    `crops=1`: the central crop (b, S, S, C); `crops=144`: GoogLeNet's crops of
    each image (b, 144, S, S, C), for Sec. 4.2.3's multi-crop evaluation (C = `channels`).
    """
    if crops not in EVAL_CROPS:
        raise ValueError(f"crops must be one of {EVAL_CROPS}, got {crops}")
    n = len(source)
    b = _per_process(global_batch_size, process_count)
    length = num_eval_batches(n, global_batch_size, process_count) * b
    start, stop = process_index * n // process_count, (process_index + 1) * n // process_count
    schedule = _EvalSchedule(start, stop, length)
    return _iterate(schedule, _EvalExample(source, image_size, crop_fraction, crops, channels), b, num_workers)
