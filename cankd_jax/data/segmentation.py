"""mmsegmentation's training augmentation and test preprocessing, in numpy.

Training, in mmseg's order (its Cityscapes/ADE20K pipelines):
  RandomResize(scale, ratio_range, keep_ratio=True) -> RandomCrop(crop_size, cat_max_ratio)
  -> RandomFlip(0.5) -> PhotoMetricDistortion -> Normalize -> Pad(crop_size, 0, seg 255).
Padding comes after normalisation, as mmseg's data preprocessor does, so padded
pixels are 0 in the normalised image (the mean colour) and 255 in the label.

Conventions follow mmseg: `scale` is (w, h) but, with keep_ratio, only its long
and short edge matter; `crop_size` is (h, w). Every random draw comes from the
`np.random.Generator` passed in, so an output is a function of (record, generator).
Resize and crop are fused: only the cropped pixels are resized (the same
result as resizing the whole image first, several times faster on Cityscapes).

Records: in `{'image': (H, W, 3) uint8 RGB, 'label': (H, W) uint8}`,
out `{'image': (h, w, 3) float32 normalised, 'label': (h, w) int32 with 255 = ignore}`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np

from cankd_jax.data.image_ops import IGNORE, hsv_to_rgb, normalize, rescale_size, rgb_to_hsv
from cankd_jax.data.image_ops import resize_bilinear, resize_nearest


def resize_target(hw: tuple[int, int], rng: np.random.Generator, scale: tuple[int, int],
                  ratio_range: tuple[float, float]) -> tuple[int, int]:
    """mmseg RandomResize(keep_ratio=True): the (h, w) for target scale = scale * U(ratio_range)."""
    ratio = rng.uniform(ratio_range[0], ratio_range[1])
    return rescale_size(hw, (int(scale[0] * ratio), int(scale[1] * ratio)))


def random_resize(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, scale: tuple[int, int],
                  ratio_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """mmseg RandomResize(keep_ratio=True): image bilinear, label nearest, aspect kept."""
    size = resize_target(image.shape[:2], rng, scale, ratio_range)
    return resize_bilinear(image, size), resize_nearest(label, size)


def crop_box(shape: tuple[int, int], crop_size: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
    """Top-left (y, x) of a uniformly placed crop (mmseg `generate_crop_bbox`)."""
    margin_h, margin_w = max(shape[0] - crop_size[0], 0), max(shape[1] - crop_size[1], 0)
    return int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))


def _crop_window(shape: tuple[int, int], crop_size: tuple[int, int], rng: np.random.Generator,
                 label_window: Callable[[tuple[int, int, int, int]], np.ndarray], cat_max_ratio: float,
                 max_tries: int) -> tuple[tuple[int, int, int, int], int]:
    """mmseg RandomCrop's choice of window (top, left, h, w) in an image of `shape`, and the re-draw count.

    The crop is re-drawn (up to `max_tries` times) while one class covers
    >= `cat_max_ratio` of its labelled pixels or it holds fewer than two
    classes; as in mmseg the crop drawn after the last failed check is used unchecked.
    """
    def window(y: int, x: int) -> tuple[int, int, int, int]:
        return y, x, min(crop_size[0], shape[0] - y), min(crop_size[1], shape[1] - x)

    box = window(*crop_box(shape, crop_size, rng))
    redraws = 0
    if cat_max_ratio < 1.0:
        for _ in range(max_tries):
            counts = np.bincount(label_window(box).ravel(), minlength=256)[:IGNORE]
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = window(*crop_box(shape, crop_size, rng))
            redraws += 1
    return box, redraws


def random_crop(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, crop_size: tuple[int, int],
                cat_max_ratio: float = 0.75, max_tries: int = 10) -> tuple[np.ndarray, np.ndarray, int]:
    """mmseg RandomCrop of an (already resized) image and label: (image crop, label crop, re-draws)."""
    (y, x, h, w), redraws = _crop_window(image.shape[:2], crop_size, rng,
                                         lambda b: label[b[0]:b[0] + b[2], b[1]:b[1] + b[3]], cat_max_ratio, max_tries)
    return image[y:y + h, x:x + w], label[y:y + h, x:x + w], redraws


def random_resize_crop(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, scale: tuple[int, int],
                       ratio_range: tuple[float, float], crop_size: tuple[int, int], cat_max_ratio: float = 0.75,
                       max_tries: int = 10) -> tuple[np.ndarray, np.ndarray, int]:
    """`random_resize` then `random_crop` with the same draws and result, resizing only the crop.

    (A 2x-upscaled Cityscapes frame is 2048 x 4096; the crop is 512 x 1024.)
    """
    size = resize_target(image.shape[:2], rng, scale, ratio_range)
    box, redraws = _crop_window(size, crop_size, rng, lambda b: resize_nearest(label, size, b), cat_max_ratio,
                                max_tries)
    return resize_bilinear(image, size, box), resize_nearest(label, size, box), redraws


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    # mmseg's `convert`: scale/shift in float, clip to [0, 255], cast to uint8 (truncating).
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class PhotoMetricDistortion:
    """mmseg PhotoMetricDistortion: each step applied with probability 0.5, in mmseg's order:
    brightness, contrast (first or last, at random), saturation, hue. Works on uint8 (H, W, 3) RGB
    with OpenCV's 8-bit HSV (H in [0, 180)) like mmseg; the order of colour channels does not matter.
    """

    brightness_delta: int = 32
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: int = 18

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            image = _convert(image, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = bool(rng.integers(2))
        if contrast_first:
            image = self._contrast(image, rng)
        if rng.integers(2):
            hsv = _to_hsv_u8(image)
            hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*self.saturation_range))
            image = _from_hsv_u8(hsv)
        if rng.integers(2):
            hsv = _to_hsv_u8(image)
            shift = int(rng.integers(-self.hue_delta, self.hue_delta))
            hsv[..., 0] = (hsv[..., 0].astype(np.int32) + shift) % 180
            image = _from_hsv_u8(hsv)
        if not contrast_first:
            image = self._contrast(image, rng)
        return image

    def _contrast(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            return _convert(image, alpha=rng.uniform(*self.contrast_range))
        return image


def _to_hsv_u8(image: np.ndarray) -> np.ndarray:
    hsv = np.rint(rgb_to_hsv(image))
    hsv[..., 0] %= 180  # a hue that rounds up to 180 wraps to 0, as OpenCV's
    return hsv.astype(np.uint8)


def _from_hsv_u8(hsv: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(hsv_to_rgb(hsv)), 0, 255).astype(np.uint8)


def pad_to(image: np.ndarray, label: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pad bottom/right to at least `size` = (h, w): image with 0, label with 255 (ignored)."""
    ph, pw = max(size[0] - image.shape[0], 0), max(size[1] - image.shape[1], 0)
    if ph == 0 and pw == 0:
        return image, label
    image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=0)
    return image, np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE)


@dataclasses.dataclass(frozen=True)
class SegTrainAugment:
    """The training pipeline; `__call__(record, rng)` -> normalised (crop_size, 3) float32 and (crop_size) int32."""

    scale: tuple[int, int]
    crop_size: tuple[int, int]
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: Optional[PhotoMetricDistortion] = PhotoMetricDistortion()

    def __post_init__(self):
        if len(self.crop_size) != 2 or min(self.crop_size) <= 0:
            raise ValueError(f"crop_size must be (h, w) > 0, got {self.crop_size}")
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"ratio_range must be 0 < low <= high, got {self.ratio_range}")

    def __call__(self, record: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        image, label, _ = random_resize_crop(record["image"], record["label"], rng, self.scale, self.ratio_range,
                                             self.crop_size, self.cat_max_ratio)
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric is not None:
            image = self.photometric(image, rng)
        image, label = pad_to(normalize(image), label, self.crop_size)
        return {"image": image, "label": label.astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class SegEvalPreprocess:
    """Test preprocessing: optional resize to `scale` = (w, h) (None: native size; keep_ratio as
    mmseg's Resize, else exactly h x w), normalise, optional pad to `pad_size` = (h, w) so images
    of different sizes batch together (label 255 there)."""

    scale: Optional[tuple[int, int]] = None
    keep_ratio: bool = True
    pad_size: Optional[tuple[int, int]] = None

    def __call__(self, record: dict) -> dict[str, np.ndarray]:
        image, label = record["image"], record["label"]
        if self.scale is not None:
            size = rescale_size(image.shape[:2], self.scale) if self.keep_ratio else (self.scale[1], self.scale[0])
            image, label = resize_bilinear(image, size), resize_nearest(label, size)
        image = normalize(image)
        if self.pad_size is not None:
            if image.shape[0] > self.pad_size[0] or image.shape[1] > self.pad_size[1]:
                raise ValueError(f"eval image of size {image.shape[:2]} exceeds eval_pad_size {tuple(self.pad_size)}; "
                                 "raise --config.data.eval_pad_size or lower --config.data.eval_scale")
            image, label = pad_to(image, label, self.pad_size)
        return {"image": image, "label": label.astype(np.int32)}
