"""ImageNet preprocessing: crop ranges, determinism, evaluation crop."""

import numpy as np
import pytest

from bn_repro import imagenet_preprocessing as prep


@pytest.mark.parametrize("height, width", [(375, 500), (500, 333), (224, 224), (120, 900)])
def test_crop_boxes_within_the_stated_ranges(height, width):
    rng = np.random.default_rng(0)
    fallbacks = 0
    for _ in range(2000):
        top, left, h, w = prep.sample_crop_box(height, width, rng)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
        area, aspect = h * w / (height * width), w / h
        # Rounding to whole pixels moves area and aspect by a little.
        in_range = 0.08 * 0.97 <= area <= 1.0 and 0.75 * 0.97 <= aspect <= 4 / 3 * 1.03
        fallbacks += not in_range
        if not in_range:  # the fallback: a central crop as large as the aspect range allows
            assert (top, left) == ((height - h) // 2, (width - w) // 2)
            assert 0.75 * 0.99 <= aspect <= 4 / 3 * 1.01
    assert fallbacks < 200


def test_crop_areas_cover_the_range():
    rng = np.random.default_rng(1)
    areas = [h * w / (500 * 500) for _, _, h, w in (prep.sample_crop_box(500, 500, rng) for _ in range(3000))]
    assert min(areas) < 0.1 and max(areas) > 0.9


def test_training_images_are_deterministic_for_a_seed():
    image = np.random.default_rng(2).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    a = prep.train_image(image, np.random.default_rng(7), size=64)
    b = prep.train_image(image, np.random.default_rng(7), size=64)
    c = prep.train_image(image, np.random.default_rng(8), size=64)
    assert a.shape == (64, 64, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= -1.0 and a.max() <= 1.0


def test_zero_distortion_strength_changes_no_colour():
    image = np.random.default_rng(3).uniform(0, 1, (8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(prep.distort_colors(image, np.random.default_rng(0), 0.0), image)
    distorted = prep.distort_colors(image, np.random.default_rng(0), 1.0)
    assert not np.allclose(distorted, image) and distorted.min() >= 0 and distorted.max() <= 1


def test_eval_image_is_the_central_crop_after_resizing_the_shorter_side():
    # A 512x640 image whose columns encode their x position: after resizing the
    # shorter side to 256 (640 -> 320), the central 224 columns are 48..271 of 320.
    x = np.tile(np.linspace(0, 255, 640).astype(np.uint8)[None, :, None], (512, 1, 3))
    out = prep.eval_image(x)
    assert out.shape == (224, 224, 3)
    centre_column = (out[112, 112, 0] + 1.0) * 127.5
    assert abs(centre_column - 127.5) < 2.0
    np.testing.assert_allclose(out, prep.eval_image(x))
