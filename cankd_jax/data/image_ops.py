"""Pixel-level helpers in plain numpy: resizing, colour spaces, normalisation.

No OpenCV or PIL is needed. The resizers follow OpenCV's conventions (what
mmcv calls underneath), so sizes and sampling positions match mmsegmentation:
bilinear samples at half-pixel centres without anti-aliasing (cv2.INTER_LINEAR),
nearest takes source pixel floor(i * in / out) (cv2.INTER_NEAREST).

Images are (H, W, C) or (H, W); uint8 in gives uint8 out (rounded, as OpenCV).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

IGNORE = 255  # label value excluded from losses and metrics (mmseg's ignore_index)

# ImageNet statistics on the 0-255 scale, RGB order (mmseg's `img_norm_cfg`).
IMAGENET_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
IMAGENET_STD = np.array([58.395, 57.12, 57.375], np.float32)


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and weight of i1 for each of `n_out` half-pixel-centred samples."""
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0.0, n_in - 1)
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (pos - i0).astype(np.float32)


Window = Optional[tuple[int, int, int, int]]  # (top, left, height, width) in output pixels


def _window(size: tuple[int, int], window: Window) -> tuple[slice, slice]:
    if window is None:
        return slice(0, size[0]), slice(0, size[1])
    top, left, h, w = window
    if top < 0 or left < 0 or top + h > size[0] or left + w > size[1]:
        raise ValueError(f"window {window} outside the {size} output")
    return slice(top, top + h), slice(left, left + w)


def resize_bilinear(image: np.ndarray, size: tuple[int, int], window: Window = None) -> np.ndarray:
    """Bilinear resize of (H, W[, C]) to `size` = (h, w); keeps the dtype (uint8 is rounded and clipped).

    With `window` = (top, left, height, width) only that part of the output is
    computed (the same pixels as resizing everything and cropping, for a
    fraction of the work).
    """
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"resize target must be positive, got {size}")
    if image.shape[:2] == (h, w) and window is None:
        return image.copy()
    rows, cols = _window((h, w), window)
    y0, y1, wy = (t[rows] for t in _linear_taps(image.shape[0], h))
    x0, x1, wx = (t[cols] for t in _linear_taps(image.shape[1], w))
    img = image.astype(np.float32, copy=False)
    extra = (1,) * (img.ndim - 2)  # broadcast the weights over channels
    wy = wy.reshape((-1, 1) + extra)
    top = img[y0] * (1.0 - wy) + img[y1] * wy  # separable: rows first, then columns
    wx = wx.reshape((1, -1) + extra)
    out = top[:, x0] * (1.0 - wx) + top[:, x1] * wx
    return to_dtype(out, image.dtype)


def resize_nearest(image: np.ndarray, size: tuple[int, int], window: Window = None) -> np.ndarray:
    """Nearest-neighbour resize of (H, W[, C]) to `size` = (h, w) (label maps: no new values);
    `window` as in `resize_bilinear`."""
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"resize target must be positive, got {size}")
    rows, cols = _window((h, w), window)
    ys = np.minimum((np.arange(h)[rows] * image.shape[0]) // h, image.shape[0] - 1)
    xs = np.minimum((np.arange(w)[cols] * image.shape[1]) // w, image.shape[1] - 1)
    return image[ys[:, None], xs[None, :]]


def to_dtype(x: np.ndarray, dtype) -> np.ndarray:
    """float -> `dtype`; integer targets are rounded and clipped to their range (OpenCV's saturate_cast)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.rint(x), info.min, info.max).astype(dtype)
    return x.astype(dtype, copy=False)


def rescale_size(hw: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """Keep-ratio target size (h, w) of an (h, w) image for an mmcv-style `scale`.

    As `mmcv.imrescale`: the image is scaled by the largest factor with which
    its long edge fits max(scale) and its short edge fits min(scale); so the
    order of `scale` (mmseg writes (w, h)) does not matter.
    """
    h, w = hw
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return max(int(h * factor + 0.5), 1), max(int(w * factor + 0.5), 1)


def normalize(image: np.ndarray, mean: np.ndarray = IMAGENET_MEAN, std: np.ndarray = IMAGENET_STD) -> np.ndarray:
    """(..., 3) RGB on the 0-255 scale -> float32 (x - mean) / std."""
    return (image.astype(np.float32) - mean) / std


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) float RGB in [0, 255] -> HSV with OpenCV's 8-bit ranges: H in [0, 180), S and V in [0, 255]."""
    rgb = rgb.astype(np.float32, copy=False)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = np.maximum(np.maximum(r, g), b)  # pairwise: much faster than a reduction over a size-3 axis
    c = v - np.minimum(np.minimum(r, g), b)
    safe_c = np.where(c > 0, c, 1.0)
    s = np.where(v > 0, 255.0 * c / np.where(v > 0, v, 1.0), 0.0)
    # Hue in degrees from whichever channel is the maximum.
    h = np.where(v == r, (g - b) / safe_c, np.where(v == g, 2.0 + (b - r) / safe_c, 4.0 + (r - g) / safe_c))
    h = np.where(c > 0, (60.0 * h) % 360.0, 0.0)
    return np.stack([h / 2.0, s, v], -1).astype(np.float32)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of `rgb_to_hsv`: H in [0, 180), S and V in [0, 255] -> float32 RGB in [0, 255]."""
    h = (hsv[..., 0].astype(np.float32) * 2.0) % 360.0
    s = hsv[..., 1].astype(np.float32) / 255.0
    v = hsv[..., 2].astype(np.float32)
    # Standard formulation: each channel is v minus a clipped triangular wave of the hue.
    k = np.stack([(5.0 + h / 60.0) % 6.0, (3.0 + h / 60.0) % 6.0, (1.0 + h / 60.0) % 6.0], -1)
    wave = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return v[..., None] - v[..., None] * s[..., None] * wave
