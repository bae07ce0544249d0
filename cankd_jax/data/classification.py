"""Classification preprocessing in numpy: Inception-style random-resized crop + flip for training,
resize + centre crop for evaluation, ImageNet normalisation (torchvision/mmpretrain semantics).

Records: in `{'image': (H, W, 3) uint8 RGB, 'label': () int32}`,
out `{'image': (h, w, 3) float32 normalised, 'label': () int32}` with (h, w) = `crop_size`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from cankd_jax.data.image_ops import normalize, resize_bilinear


def random_resized_crop_box(hw: tuple[int, int], rng: np.random.Generator, scale: tuple[float, float],
                            ratio: tuple[float, float], max_tries: int = 10) -> tuple[int, int, int, int]:
    """(top, left, h, w) covering U(scale) of the area with log-uniform aspect ratio in `ratio`;
    after `max_tries` misses, the largest centred box within the ratio bounds."""
    height, width = hw
    area = height * width
    for _ in range(max_tries):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


@dataclasses.dataclass(frozen=True)
class ClsTrainAugment:
    """Random-resized crop to `crop_size` = (h, w), horizontal flip with `flip_prob`, normalise."""

    crop_size: tuple[int, int]
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5

    def __call__(self, record: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        top, left, h, w = random_resized_crop_box(record["image"].shape[:2], rng, self.scale, self.ratio)
        image = resize_bilinear(record["image"][top:top + h, left:left + w], self.crop_size)
        if rng.random() < self.flip_prob:
            image = image[:, ::-1]
        return {"image": normalize(image), "label": np.asarray(record["label"], np.int32)}


@dataclasses.dataclass(frozen=True)
class ClsEvalPreprocess:
    """Resize the short edge to `resize` (aspect kept), centre crop `crop_size` = (h, w), normalise."""

    crop_size: tuple[int, int]
    resize: int

    def __call__(self, record: dict) -> dict[str, np.ndarray]:
        image = record["image"]
        h, w = image.shape[:2]
        factor = self.resize / min(h, w)
        image = resize_bilinear(image, (max(int(h * factor), 1), max(int(w * factor), 1)))
        ch, cw = self.crop_size
        if image.shape[0] < ch or image.shape[1] < cw:
            raise ValueError(f"eval resize {self.resize} is smaller than crop_size {tuple(self.crop_size)}")
        top, left = round((image.shape[0] - ch) / 2), round((image.shape[1] - cw) / 2)
        image = image[top:top + ch, left:left + cw]
        return {"image": normalize(image), "label": np.asarray(record["label"], np.int32)}
