"""Per-image ImageNet preprocessing on the host (Sec. 4.2; GoogLeNet's recipe).

Training: an Inception-style random crop (8%-100% of the image's area, aspect
ratio 3/4-4/3, log-uniform), resized to ``size`` x ``size``, a random
horizontal flip, and photometric distortions (brightness, contrast,
saturation) whose strength is a parameter: Sec. 4.2.1 item 7 "reduce the
photometric distortions" is ``distortion_strength < 1``.
Evaluation: resize the shorter side to ``size / crop_fraction`` (256 for 224)
and take the central ``size`` x ``size`` crop (the paper's single crop).

All randomness comes from the ``numpy.random.Generator`` passed in, so a
loader that seeds it per example (e.g. from the seed, epoch and index) is
deterministic. Outputs are float32 in [-1, 1].
"""

import math

import numpy as np
import PIL.Image

AREA_RANGE = (0.08, 1.0)
ASPECT_RANGE = (3 / 4, 4 / 3)


def sample_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    area_range: tuple[float, float] = AREA_RANGE,
    aspect_range: tuple[float, float] = ASPECT_RANGE,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) of a random crop.

    Area is uniform in ``area_range`` times the image's, aspect (w/h)
    log-uniform in ``aspect_range``; after ``attempts`` misses, the largest
    central crop whose aspect is within the range.
    """
    area = height * width
    log_aspect = (math.log(aspect_range[0]), math.log(aspect_range[1]))
    for _ in range(attempts):
        target = area * rng.uniform(*area_range)
        aspect = math.exp(rng.uniform(*log_aspect))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = width / height
    if aspect < aspect_range[0]:
        w, h = width, int(round(width / aspect_range[0]))
    elif aspect > aspect_range[1]:
        w, h = int(round(height * aspect_range[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(PIL.Image.fromarray(image).resize((width, height), PIL.Image.BILINEAR))


def distort_colors(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Random brightness (+-32/255), contrast and saturation (x[0.5, 1.5]), each
    scaled by ``strength`` (0 = none), on a float image in [0, 1]; clipped to [0, 1]."""
    if strength <= 0:
        return image
    image = image + rng.uniform(-32 / 255, 32 / 255) * strength
    mean = image.mean()
    image = (image - mean) * (1 + rng.uniform(-0.5, 0.5) * strength) + mean
    grey = image @ np.array([0.299, 0.587, 0.114], np.float32)
    image = (image - grey[..., None]) * (1 + rng.uniform(-0.5, 0.5) * strength) + grey[..., None]
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def train_image(
    image: np.ndarray, rng: np.random.Generator, size: int = 224, distortion_strength: float = 1.0
) -> np.ndarray:
    """uint8 HxWx3 -> float32 size x size x 3 in [-1, 1]: random crop, flip, distortions."""
    top, left, h, w = sample_crop_box(image.shape[0], image.shape[1], rng)
    crop = _resize(np.ascontiguousarray(image[top : top + h, left : left + w]), size, size)
    if rng.uniform() < 0.5:
        crop = crop[:, ::-1]
    crop = distort_colors(crop.astype(np.float32) / 255.0, rng, distortion_strength)
    return crop * 2.0 - 1.0


def eval_image(image: np.ndarray, size: int = 224, crop_fraction: float = 0.875) -> np.ndarray:
    """uint8 HxWx3 -> float32 size x size x 3 in [-1, 1]: resize the shorter
    side to size / crop_fraction, then the central size x size crop."""
    height, width = image.shape[:2]
    scale = size / crop_fraction / min(height, width)
    new_h, new_w = max(size, int(round(height * scale))), max(size, int(round(width * scale)))
    resized = _resize(image, new_h, new_w)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top : top + size, left : left + size].astype(np.float32) / 127.5 - 1.0
