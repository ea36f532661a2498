"""ImageNet pipeline: error messages, epoch orders, batch schedule, determinism, eval coverage."""

import importlib.util
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bn_repro import image_data
from bn_repro import imagenet_data as data

SIZE = 16  # Output images; small to keep the tests fast.
TRAIN = dict(
    seed=3, image_size=SIZE, distortion_strength=1.0, shuffle="global", shuffle_window=8, num_workers=0
)


def indexed_source(n: int, seed: int = 0) -> list[dict]:
    """Examples whose label is their index; random sizes, some greyscale (HxW, HxWx1)."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        h, w = rng.integers(8, 40, size=2)
        shape = [(h, w, 3), (h, w), (h, w, 1)][i % 3]
        examples.append({"image": rng.integers(0, 256, shape, dtype=np.uint8), "label": np.int64(i)})
    return examples


def collect(batches) -> list[dict]:
    """Plain-ndarray copies (with workers grain yields shared-memory arrays)."""
    return [{k: np.array(v) for k, v in b.items()} for b in batches]


def assert_streams_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture(scope="module")
def mock_imagenet():
    """`open_split` served by TFDS's mock (USE_CODE: the real features, random images)."""
    with tfds.testing.mock_data(num_examples=43, policy=tfds.testing.MockPolicy.USE_CODE):
        yield {split: data.open_split(split, "/nonexistent/data_dir") for split in ("train", "validation")}


# Errors: missing tars, not prepared, wrong format.


def make_tar(directory, name, size=None):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "wb") as f:
        f.truncate(data.TAR_BYTES[name] if size is None else size)  # Sparse: no disk used.


def test_check_manual_dir_names_every_missing_tar(tmp_path):
    manual = str(tmp_path / "manual")
    with pytest.raises(data.ImagenetDataError) as e:
        data.check_manual_dir(manual)
    for name in (data.TRAIN_TAR, data.VAL_TAR):
        assert f"missing: {os.path.join(manual, name)}" in str(e.value)
    assert f"put them in {manual}" in str(e.value)

    make_tar(manual, data.TRAIN_TAR)
    with pytest.raises(data.ImagenetDataError) as e:
        data.check_manual_dir(manual)
    assert os.path.join(manual, data.VAL_TAR) in str(e.value)
    assert os.path.join(manual, data.TRAIN_TAR) not in str(e.value)

    make_tar(manual, data.VAL_TAR, size=1000)
    with pytest.raises(data.ImagenetDataError) as e:
        data.check_manual_dir(manual)
    assert "incomplete" in str(e.value) and "1000 bytes" in str(e.value) and "6744924160" in str(e.value)
    assert "missing" not in str(e.value)

    make_tar(manual, data.VAL_TAR)
    data.check_manual_dir(manual)


def test_open_split_explains_what_is_missing(tmp_path):
    data_dir = str(tmp_path)
    manual = data.manual_dir(data_dir)
    assert manual == os.path.join(data_dir, "downloads", "manual")
    with pytest.raises(data.ImagenetDataError) as e:
        data.open_split("train", data_dir)
    assert os.path.join(manual, data.TRAIN_TAR) in str(e.value)
    assert os.path.join(manual, data.VAL_TAR) in str(e.value)

    make_tar(manual, data.TRAIN_TAR)
    make_tar(manual, data.VAL_TAR)
    with pytest.raises(data.ImagenetDataError, match=r"not prepared.*prepare_imagenet\.py --data_dir="):
        data.open_split("validation", data_dir)


def test_open_split_rejects_tfrecord_preparation(tmp_path):
    builder = tfds.builder("imagenet2012", data_dir=str(tmp_path))  # Default format: tfrecord.
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)  # Looks prepared to TFDS.
    with pytest.raises(data.ImagenetDataError, match="tfrecord.*array_record"):
        data.open_split("train", str(tmp_path))


def test_prepare_without_tensorflow_says_how_to_install(tmp_path):
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed")
    manual = data.manual_dir(str(tmp_path))
    with pytest.raises(data.ImagenetDataError, match="missing"):
        data.prepare_imagenet(str(tmp_path))
    make_tar(manual, data.TRAIN_TAR)
    make_tar(manual, data.VAL_TAR)
    with pytest.raises(data.ImagenetDataError, match=r"TensorFlow.*pip install '\.\[prepare\]'"):
        data.prepare_imagenet(str(tmp_path))


# Epoch orders (Sec. 4.2.1 item 6).


def test_global_order_is_a_fresh_permutation_each_epoch():
    a, b = (image_data.epoch_order(1000, 0, epoch, "global", 0) for epoch in (0, 1))
    np.testing.assert_array_equal(np.sort(a), np.arange(1000))
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, image_data.epoch_order(1000, 0, 0, "global", 0))
    assert not np.array_equal(a, image_data.epoch_order(1000, 1, 0, "global", 0))


def test_window_order_repeats_each_window_and_shuffles_only_their_order():
    n, w = 1003, 100  # The short last window (3 examples) stays last.
    orders = [image_data.epoch_order(n, 0, epoch, "window", w) for epoch in range(4)]
    windows = orders[0][:1000].reshape(10, w)
    assert {tuple(np.unique(row // w)) for row in windows} == {(i,) for i in range(10)}  # One stored window each.
    assert np.mean(windows != np.sort(windows, axis=1)) > 0.9  # Put in a random order inside.
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(n))
        np.testing.assert_array_equal(order[1000:], orders[0][1000:])
        rows = order[:1000].reshape(10, w)
        # The same rows (each in the same inner order) in a permuted order.
        np.testing.assert_array_equal(rows, windows[np.argsort(windows[:, 0])][rows[:, 0] // w])
    assert len({tuple(order[::w] // w) for order in orders}) == 4  # The windows' order changes every epoch.


def co_batched_pairs(order: np.ndarray, batch: int) -> set[tuple[int, int]]:
    pairs = set()
    for start in range(0, len(order) - batch + 1, batch):
        members = np.sort(order[start : start + batch])
        pairs.update(zip(*(members[i] for i in np.triu_indices(batch, 1))))
    return pairs


def test_co_batched_pairs_recur_every_epoch_with_window_and_rarely_with_global():
    n, batch, epochs = 6400, 32, 4  # 20 windows of 320 = 10 batches.
    for shuffle, window in (("window", 320), ("global", 0)):
        pairs = [co_batched_pairs(image_data.epoch_order(n, 0, e, shuffle, window), batch) for e in range(epochs)]
        recurring = [len(pairs[0] & p) / len(pairs[0]) for p in pairs[1:]]
        if shuffle == "window":
            assert recurring == [1.0] * (epochs - 1)
        else:  # Expected (batch - 1) / (n - 1) = 0.5%.
            assert max(recurring) < 0.01


def test_window_shuffle_repeats_the_same_batches_every_epoch():
    source = indexed_source(48)  # 3 windows of 16 = 2 batches of 8; 6 steps per epoch.
    kw = {**TRAIN, "shuffle": "window", "shuffle_window": 16}
    batches = collect(image_data.train_batches(source, global_batch_size=8, start_step=0, num_steps=24, **kw))
    epochs = [[tuple(b["label"]) for b in batches[e * 6 : (e + 1) * 6]] for e in range(4)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(epochs[0])  # The same mini-batches, in the same inner order.
        for first, second in zip(epoch[::2], epoch[1::2]):  # A window's two batches stay adjacent.
            assert {i // 16 for i in first + second} == {first[0] // 16}
    assert len({tuple(epoch) for epoch in epochs}) > 1  # Only their order changes.


def test_unknown_shuffle_is_rejected():
    with pytest.raises(ValueError, match="shuffle must be one of"):
        image_data.epoch_order(10, 0, 0, "none", 4)
    with pytest.raises(ValueError, match="shuffle must be one of"):
        image_data.train_batches(indexed_source(16), global_batch_size=8, start_step=0, num_steps=1,
                           **{**TRAIN, "shuffle": "sorted"})


# Training batches.


def test_train_batches_follow_the_epoch_orders():
    source, G = indexed_source(43), 8  # 5 steps per epoch; 3 examples skipped each epoch.
    assert image_data.steps_per_epoch(43, G) == 5
    batches = collect(image_data.train_batches(source, global_batch_size=G, start_step=0, num_steps=12, **TRAIN))
    assert len(batches) == 12
    for k, batch in enumerate(batches):
        epoch, p = divmod(k, 5)
        order = image_data.epoch_order(43, TRAIN["seed"], epoch, "global", 0)
        np.testing.assert_array_equal(batch["label"], order[p * G : (p + 1) * G])
        assert batch["image"].shape == (G, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert len(set(np.concatenate([b["label"] for b in batches[:5]]))) == 40  # No repeats within an epoch.


def test_one_channel_batches_are_grey():
    source = indexed_source(16)  # Colour, HxW and HxWx1 images.
    kw = {**TRAIN, "channels": 1}
    for batch in collect(image_data.train_batches(source, global_batch_size=8, start_step=0, num_steps=2, **kw)):
        assert batch["image"].shape == (8, SIZE, SIZE, 1)
    batches = collect(image_data.eval_batches(source, global_batch_size=6, image_size=SIZE, crop_fraction=0.875,
                                              num_workers=0, channels=1))
    assert [b["image"].shape for b in batches] == [(6, SIZE, SIZE, 1)] * 3  # The last one padded.
    colour = source[0]["image"]
    expected = np.rint(colour.astype(np.float64) @ [0.299, 0.587, 0.114])
    np.testing.assert_array_equal(image_data.with_channels(colour, 1)[..., 0], expected)
    np.testing.assert_array_equal(image_data.with_channels(source[1]["image"], 3)[..., 2], source[1]["image"])


def test_mock_imagenet_batches(mock_imagenet):
    source = mock_imagenet["train"]
    batches = collect(image_data.train_batches(source, global_batch_size=8, start_step=0, num_steps=3, **TRAIN))
    order = image_data.epoch_order(len(source), TRAIN["seed"], 0, "global", 0)
    for p, batch in enumerate(batches):
        assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0 and batch["image"].std() > 0.1
        labels = [int(source[int(i)]["label"]) for i in order[p * 8 : (p + 1) * 8]]
        np.testing.assert_array_equal(batch["label"], labels)


def test_train_batches_are_deterministic_and_resumable(mock_imagenet):
    source = mock_imagenet["train"]
    run = dict(global_batch_size=8, **TRAIN)
    full = collect(image_data.train_batches(source, start_step=0, num_steps=12, **run))
    assert_streams_equal(full, collect(image_data.train_batches(source, start_step=0, num_steps=12, **run)))
    assert_streams_equal(full[7:], collect(image_data.train_batches(source, start_step=7, num_steps=5, **run)))
    other = collect(image_data.train_batches(source, start_step=0, num_steps=1, **{**run, "seed": 4}))
    assert not np.array_equal(other[0]["image"], full[0]["image"])


def test_processes_split_the_global_batch():
    source = indexed_source(43)
    single = collect(image_data.train_batches(source, global_batch_size=8, start_step=3, num_steps=6, **TRAIN))
    parts = [
        collect(image_data.train_batches(source, global_batch_size=8, start_step=3, num_steps=6,
                                   process_index=i, process_count=2, **TRAIN))
        for i in range(2)
    ]
    for k, batch in enumerate(single):
        assert parts[0][k]["label"].shape == (4,)
        for key in batch:
            np.testing.assert_array_equal(batch[key], np.concatenate([parts[0][k][key], parts[1][k][key]]))
    with pytest.raises(ValueError, match="divisible"):
        image_data.train_batches(source, global_batch_size=8, start_step=0, num_steps=1, process_count=3, **TRAIN)


def test_worker_processes_give_identical_batches(mock_imagenet):
    run = dict(global_batch_size=8, start_step=2, num_steps=7, **{**TRAIN, "distortion_strength": 0.5})
    serial = collect(image_data.train_batches(mock_imagenet["train"], **run))
    parallel = collect(image_data.train_batches(mock_imagenet["train"], **{**run, "num_workers": 2}))
    assert_streams_equal(serial, parallel)
    kw = dict(global_batch_size=4, image_size=SIZE, crop_fraction=0.875)
    assert_streams_equal(collect(image_data.eval_batches(mock_imagenet["validation"], num_workers=0, **kw)),
                         collect(image_data.eval_batches(mock_imagenet["validation"], num_workers=2, **kw)))


# Evaluation batches.


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_sees_every_example_once(process_count):
    n, G = 13, 4
    source = indexed_source(n)
    seen, real = [], 0
    per_process = image_data.num_eval_batches(n, G, process_count)
    for i in range(process_count):
        batches = collect(image_data.eval_batches(source, global_batch_size=G, image_size=SIZE, crop_fraction=0.875,
                                            num_workers=0, process_index=i, process_count=process_count))
        assert len(batches) == per_process
        for b in batches:
            assert b["image"].shape == (G // process_count, SIZE, SIZE, 3) and b["mask"].dtype == np.float32
            real += int(b["mask"].sum())
            seen.extend(b["label"][b["mask"] == 1.0])
            assert np.all(b["image"][b["mask"] == 0.0] == 0.0)
            assert np.all(b["image"][b["mask"] == 1.0].std(axis=(1, 2, 3)) > 0)
    assert real == n and sorted(seen) == list(range(n))
    assert per_process == {1: 4, 2: 4}[process_count]  # ceil(13 / 4); ceil(ceil(13 / 2) / 2).


def test_mock_imagenet_eval_labels(mock_imagenet):
    source = mock_imagenet["validation"]
    batches = collect(image_data.eval_batches(source, global_batch_size=8, image_size=SIZE, crop_fraction=0.875,
                                        num_workers=0))
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])[mask == 1.0]
    assert mask.shape == (48,) and mask.sum() == len(source) == 43
    np.testing.assert_array_equal(labels, [int(source[i]["label"]) for i in range(len(source))])
