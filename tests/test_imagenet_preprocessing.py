"""ImageNet preprocessing: crop ranges, determinism, evaluation crop."""

import numpy as np
import PIL.Image
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


def brightness_and_contrast(before: np.ndarray, after: np.ndarray) -> tuple[float, float]:
    """For a grey image (saturation changes nothing): the brightness shift is the
    change of the mean, the contrast factor the ratio of standard deviations."""
    return float(after.mean() - before.mean()), float(after.std() / before.std())


GREY_WEIGHTS = np.array([0.299, 0.587, 0.114])


def saturation(before: np.ndarray, after: np.ndarray) -> float:
    """The saturation factor: the colour's distance from grey grows by contrast x
    saturation, the grey level's spread by contrast alone."""
    grey_b, grey_a = before @ GREY_WEIGHTS, after @ GREY_WEIGHTS
    chroma = np.linalg.norm(after - grey_a[..., None]) / np.linalg.norm(before - grey_b[..., None])
    return float(chroma / (grey_a.std() / grey_b.std()))


@pytest.mark.parametrize("seed", range(8))
def test_distortion_strength_scales_brightness_contrast_and_saturation(seed):
    """Sec. 4.2.1 item 7 ("reduce the photometric distortions"): with the same
    random draws, strength s gives s times strength 1's brightness shift and
    contrast and saturation changes (factor 1 + s * (factor_1 - 1)); 0 gives none."""
    rng = np.random.default_rng(100 + seed)
    grey = np.repeat(rng.uniform(0.4, 0.6, (16, 16, 1)), 3, axis=-1).astype(np.float32)
    colour = rng.uniform(0.4, 0.6, (16, 16, 3)).astype(np.float32)
    strengths = (0.25, 0.5, 1.0)
    grey_out = {s: prep.distort_colors(grey, np.random.default_rng(seed), s) for s in strengths}
    colour_out = {s: prep.distort_colors(colour, np.random.default_rng(seed), s) for s in strengths}
    for out in (*grey_out.values(), *colour_out.values()):
        assert 0.0 < out.min() and out.max() < 1.0  # nothing clipped: the factors are exact
    b1, c1 = brightness_and_contrast(grey, grey_out[1.0])
    s1 = saturation(colour, colour_out[1.0])
    assert abs(b1) <= 32 / 255 + 1e-6 and 0.5 - 1e-4 <= c1 <= 1.5 + 1e-4 and 0.5 - 1e-4 <= s1 <= 1.5 + 1e-4
    for s in strengths[:-1]:
        b, c = brightness_and_contrast(grey, grey_out[s])
        assert b == pytest.approx(s * b1, abs=2e-6)
        assert c - 1 == pytest.approx(s * (c1 - 1), abs=2e-5)
        assert saturation(colour, colour_out[s]) - 1 == pytest.approx(s * (s1 - 1), abs=2e-4)
    changes = [np.abs(colour_out[s] - colour).mean() for s in strengths]
    assert 0 < changes[0] <= changes[1] <= changes[2]


def test_training_crop_is_flipped_half_of_the_time():
    """GoogLeNet's recipe: a random horizontal flip with probability 1/2. Red
    grows from left to right in the image, so it does in every unflipped crop."""
    image = gradient_image(64, 64)
    draws = 400
    flipped = 0
    for seed in range(draws):
        crop = prep.train_image(image, np.random.default_rng(seed), size=8, distortion_strength=0.0)
        left, right = crop[:, 0, 0].mean(), crop[:, -1, 0].mean()
        assert left != right
        flipped += bool(left > right)
    # Binomial(400, 1/2): sd 10; never or always flipping is 20 sd away.
    assert 160 <= flipped <= 240


@pytest.mark.parametrize(
    "height, width, size, crop_fraction, resized",
    [
        (512, 640, 224, 0.875, (256, 320)),  # shorter side 224 / 0.875 = 256
        (375, 500, 224, 0.875, (256, 341)),
        (600, 300, 224, 0.875, (512, 256)),  # portrait
        (224, 224, 224, 0.875, (256, 256)),  # upsampled
        (60, 90, 32, 0.8, (40, 60)),
        (90, 60, 32, 1.0, (48, 32)),  # crop_fraction 1: the whole shorter side
    ],
)
def test_eval_image_is_the_central_crop_after_resizing_the_shorter_side(height, width, size, crop_fraction, resized):
    """Sec. 4.2's single crop: the shorter side resized to size / crop_fraction,
    then the central size x size crop; against PIL's resize and slicing."""
    image = gradient_image(height, width, seed=height + width)
    out = prep.eval_image(image, size=size, crop_fraction=crop_fraction)
    assert out.shape == (size, size, 3) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    h, w = resized
    top, left = (h - size) // 2, (w - size) // 2
    expected = pil_resize(image, h, w)[top : top + size, left : left + size]
    np.testing.assert_array_equal(as_uint8(out), expected)


# GoogLeNet's 144 crops (Sec. 4.2.3). Crop k: scale k // 36, square k // 12 % 3,
# crop k // 2 % 6 (4 corners, center, whole square), mirrored if k is odd.


def gradient_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Red encodes x, green y (0..255 across the image); blue is noise, so crops at
    different positions never coincide."""
    x = np.broadcast_to(np.linspace(0, 255, width)[None, :], (height, width))
    y = np.broadcast_to(np.linspace(0, 255, height)[:, None], (height, width))
    noise = np.random.default_rng(seed).integers(0, 256, (height, width))
    return np.stack([x, y, noise], axis=-1).round().astype(np.uint8)


def pil_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(PIL.Image.fromarray(np.ascontiguousarray(image)).resize((width, height), PIL.Image.BILINEAR))


def as_uint8(crop: np.ndarray) -> np.ndarray:
    return np.round((crop + 1.0) * 127.5).astype(np.uint8)


def test_multicrop_count_dtype_range_and_scales():
    assert prep.scales_for(224) == (256, 288, 320, 352)
    assert prep.scales_for(32) == (37, 41, 46, 50)
    crops = prep.multicrop_images(gradient_image(60, 90), size=32)
    assert crops.shape == (144, 32, 32, 3) and crops.dtype == np.float32
    assert crops.min() >= -1.0 and crops.max() <= 1.0 and crops.min() < -0.9 and crops.max() > 0.9
    assert prep.multicrop_images(gradient_image(30, 40), size=16, scales=(20, 24)).shape == (72, 16, 16, 3)
    with pytest.raises(ValueError, match="size"):
        prep.multicrop_images(gradient_image(30, 40), size=32, scales=(30,))


@pytest.mark.parametrize(
    "k, scale, square, crop, mirrored",
    [(0, 0, 0, "top_left", False), (63, 1, 2, "top_right", True), (42, 1, 0, "bottom_right", False),
     (22, 0, 1, "whole", False), (57, 1, 1, "center", True), (28, 0, 2, "bottom_left", False)],
)
def test_multicrop_crop_k_is_the_expected_region(k, scale, square, crop, mirrored):
    # 300x400 (landscape); scales 40 and 48, size 32. Scale 40: 40x53, squares at
    # columns 0, 6, 13. Scale 48: 48x64, squares at columns 0, 8, 16.
    image = gradient_image(300, 400)
    resized = pil_resize(image, 40, 53) if scale == 0 else pil_resize(image, 48, 64)
    s = resized.shape[0]
    offset = [[0, 6, 13], [0, 8, 16]][scale][square]
    sq = resized[:, offset : offset + s]
    e, c = s - 32, (s - 32) // 2
    region = {
        "top_left": sq[:32, :32], "top_right": sq[:32, e:], "bottom_left": sq[e:, :32],
        "bottom_right": sq[e:, e:], "center": sq[c : c + 32, c : c + 32], "whole": pil_resize(sq, 32, 32),
    }[crop]
    expected = region[:, ::-1] if mirrored else region
    np.testing.assert_array_equal(as_uint8(prep.multicrop_images(image, 32, (40, 48))[k]), expected)


def test_multicrop_odd_crops_mirror_the_even_ones():
    crops = prep.multicrop_images(gradient_image(50, 70), size=24, scales=(30, 36))
    np.testing.assert_array_equal(crops[1::2], crops[0::2, :, ::-1])
    assert not np.array_equal(crops[0], crops[1])


@pytest.mark.parametrize("height, width", [(60, 150), (150, 60)])
def test_multicrop_squares_run_along_the_longer_side(height, width):
    """Landscape: left, center, right squares (x, red, grows; y, green, spans the
    height in each). Portrait: top, center, bottom."""
    crops = prep.multicrop_images(gradient_image(height, width), size=32, scales=(40,))
    whole = crops[10::12]  # Unmirrored whole squares of the 3 positions, resized.
    along, across = (0, 1) if width > height else (1, 0)  # Channel growing along the longer side.
    means = whole[..., along].mean(axis=(1, 2))
    assert means[0] < means[1] < means[2] and means[0] < -0.5 and means[2] > 0.5
    np.testing.assert_allclose(whole[..., across].mean(axis=(1, 2)), whole[0, ..., across].mean(), atol=0.02)
    assert whole[0, ..., across].min() < -0.9 and whole[0, ..., across].max() > 0.9
    # Crop 20, the center square's central crop, is the central crop of the image resized to 40x100.
    resized = pil_resize(gradient_image(height, width), *((40, 100) if width > height else (100, 40)))
    top, left = (resized.shape[0] - 32) // 2, (resized.shape[1] - 32) // 2
    np.testing.assert_array_equal(as_uint8(crops[20]), resized[top : top + 32, left : left + 32])


def test_multicrop_of_a_square_image_repeats_one_square():
    crops = prep.multicrop_images(gradient_image(64, 64), size=32, scales=(40, 48))
    for scale in range(2):
        np.testing.assert_array_equal(crops[36 * scale : 36 * scale + 12], crops[36 * scale + 24 : 36 * scale + 36])


def test_a_grey_image_is_processed_as_its_three_channel_repetition():
    # One channel (data.channels=1) gets exactly what each channel of the repeated image gets:
    # the same crop, flip, brightness and contrast; saturation leaves a grey image unchanged.
    grey = np.random.default_rng(5).integers(0, 256, (37, 50, 1), dtype=np.uint8)
    rgb = np.repeat(grey, 3, axis=-1)
    for seed in range(4):
        one = prep.train_image(grey, np.random.default_rng(seed), 16, 1.0)
        three = prep.train_image(rgb, np.random.default_rng(seed), 16, 1.0)
        assert one.shape == (16, 16, 1)
        np.testing.assert_allclose(np.repeat(one, 3, axis=-1), three, atol=1e-6)
    np.testing.assert_array_equal(np.repeat(prep.eval_image(grey, 16), 3, axis=-1), prep.eval_image(rgb, 16))
    np.testing.assert_array_equal(np.repeat(prep.multicrop_images(grey, 16), 3, axis=-1),
                                  prep.multicrop_images(rgb, 16))
