"""Per-image ImageNet preprocessing on the host (Sec. 4.2; GoogLeNet's recipe).

Training: an Inception-style random crop (8%-100% of the image's area, aspect
ratio 3/4-4/3, log-uniform), resized to ``size`` x ``size``, a random
horizontal flip, and photometric distortions (brightness, contrast,
saturation) whose strength is a parameter: Sec. 4.2.1 item 7 "reduce the
photometric distortions" is ``distortion_strength < 1``.
Evaluation: resize the shorter side to ``size / crop_fraction`` (256 for 224)
and take the central ``size`` x ``size`` crop (the paper's single crop);
or GoogLeNet's 144 crops (``multicrop_images``, the paper's Sec. 4.2.3).

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


# ITU-R 601 luma: the grey value of an RGB pixel.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 HxWxC (C = 1 or 3) resized bilinearly, channels kept."""
    pil = PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    return np.asarray(pil.resize((width, height), PIL.Image.BILINEAR)).reshape(height, width, image.shape[-1])


def distort_colors(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Random brightness (+-32/255), contrast and saturation (x[0.5, 1.5]), each
    scaled by ``strength`` (0 = none), on a float image in [0, 1]; clipped to [0, 1].
    A grey (1-channel) image has no saturation: brightness and contrast only,
    what its 3-channel repetition gets (whose saturation change is the identity)."""
    if strength <= 0:
        return image
    image = image + rng.uniform(-32 / 255, 32 / 255) * strength
    mean = image.mean()
    image = (image - mean) * (1 + rng.uniform(-0.5, 0.5) * strength) + mean
    saturation = 1 + rng.uniform(-0.5, 0.5) * strength
    if image.shape[-1] == 3:
        grey = image @ np.array(LUMA_WEIGHTS, np.float32)
        image = (image - grey[..., None]) * saturation + grey[..., None]
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def train_image(
    image: np.ndarray, rng: np.random.Generator, size: int = 224, distortion_strength: float = 1.0
) -> np.ndarray:
    """uint8 HxWxC -> float32 size x size x C in [-1, 1]: random crop, flip, distortions."""
    top, left, h, w = sample_crop_box(image.shape[0], image.shape[1], rng)
    crop = _resize(np.ascontiguousarray(image[top : top + h, left : left + w]), size, size)
    if rng.uniform() < 0.5:
        crop = crop[:, ::-1]
    crop = distort_colors(crop.astype(np.float32) / 255.0, rng, distortion_strength)
    return crop * 2.0 - 1.0


def eval_image(image: np.ndarray, size: int = 224, crop_fraction: float = 0.875) -> np.ndarray:
    """uint8 HxWxC -> float32 size x size x C in [-1, 1]: resize the shorter
    side to size / crop_fraction, then the central size x size crop."""
    height, width = image.shape[:2]
    scale = size / crop_fraction / min(height, width)
    new_h, new_w = max(size, int(round(height * scale))), max(size, int(round(width * scale)))
    resized = _resize(image, new_h, new_w)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top : top + size, left : left + size].astype(np.float32) / 127.5 - 1.0


# GoogLeNet's multi-crop evaluation (arXiv:1409.4842 Sec. 7), used for the
# paper's Sec. 4.2.3 / Figure 4 results: shorter sides 256, 288, 320, 352.
MULTICROP_SCALES = (256, 288, 320, 352)
SQUARES = ("first", "center", "last")  # left/center/right, or top/center/bottom (portrait).
CROP_POSITIONS = ("top_left", "top_right", "bottom_left", "bottom_right", "center", "whole")


def scales_for(size: int) -> tuple[int, ...]:
    """GoogLeNet's four shorter sides scaled by ``size / 224`` (``size`` 224 -> 256..352)."""
    return tuple(max(size, round(s * size / 224)) for s in MULTICROP_SCALES)


def multicrop_images(image: np.ndarray, size: int = 224, scales: tuple[int, ...] | None = None) -> np.ndarray:
    """uint8 HxWxC -> float32 (len(scales) * 36, size, size, C) in [-1, 1]: GoogLeNet's 144 crops.

    For each scale S (default ``scales_for(size)``: 256, 288, 320, 352 for 224)
    the shorter side is resized to S; of the S x S squares at the left, center
    and right (top, center, bottom for a portrait image), the 4 corner and the
    center ``size`` x ``size`` crops and the whole square resized to ``size``;
    each followed by its mirror. Crop k is scale k // 36, square k // 12 % 3,
    crop ``CROP_POSITIONS[k // 2 % 6]``, mirrored if k is odd.
    """
    scales = scales_for(size) if scales is None else scales
    if min(scales) < size:
        raise ValueError(f"Every scale must be >= size {size}, got {scales}.")
    height, width = image.shape[:2]
    landscape = height <= width
    out = np.empty((len(scales) * len(SQUARES) * len(CROP_POSITIONS) * 2, size, size, image.shape[-1]), np.float32)
    k = 0
    for s in scales:
        long_side = max(s, round(max(height, width) * s / min(height, width)))
        resized = _resize(image, s, long_side) if landscape else _resize(image, long_side, s)
        for offset in (0, (long_side - s) // 2, long_side - s):
            square = resized[:, offset : offset + s] if landscape else resized[offset : offset + s]
            c, e = (s - size) // 2, s - size
            crops = [square[t : t + size, l : l + size] for t, l in ((0, 0), (0, e), (e, 0), (e, e), (c, c))]
            crops.append(_resize(np.ascontiguousarray(square), size, size))
            for crop in crops:
                out[k], out[k + 1] = crop, crop[:, ::-1]
                k += 2
    out /= 127.5
    out -= 1.0
    return out
