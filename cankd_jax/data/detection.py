"""Detection examples: mmdetection's training augmentation and test preprocessing, on static shapes.

Records in (`sources.to_detection_record`): `image (H, W, 3) uint8 RGB`, `image_id`,
`boxes (N, 4)` x1y1x2y2 pixels, `labels (N,)` contiguous, `is_crowd (N,)`, `area (N,)`.

Training (mmdet's RetinaNet / FCOS COCO pipeline): keep-ratio resize to `scale`
(1333 x 800: the long edge fits 1333 and the short one 800), horizontal flip with
probability 0.5, normalise (per detector: RGB with ImageNet's mean/std for
pytorch-style ResNets, BGR minus the caffe mean with std 1 for FCOS's caffe
ResNet), pad bottom/right with zeros (after normalising, as mmdet's data
preprocessor pads) to the record's *bucket*. Out:

    {'image': (Hb, Wb, 3) float32,
     'label': {'boxes': (G, 4) float32 pixels of the resized image, 'labels': (G,) int32,
               'valid': (G,) bool, 'img_shape': (2,) float32 resized (h, w),
               'pad_shape': (2,) float32 that shape rounded up to 32 (mmdet's per-image pad_shape,
                            which RetinaNet's anchor valid flags read)}}

Buckets: with `scale` = (long, short) there are two padded shapes, landscape
`(ceil32(short), ceil32(long))` (h <= w) and portrait (its transpose); a resized
image always fits its orientation's bucket. So the step compiles at most twice
(once when the scale is square: the two buckets coincide). A global batch must be
one shape, so training batches are grouped by bucket with an epoch plan
(`pipeline.GroupedEpochs`: mmdet's aspect-ratio grouping, a function of (seed,
epoch) only), and evaluation runs each bucket's images as their own batches
(`pipeline.grouped_eval_batches`).

Targets follow mmdet's `CocoDataset.parse_data_info` (`training_objects`): an
object takes part in training unless it is a crowd box (`is_crowd`; the
RetinaNet/FCOS configs' `ignore_iof_thr=-1` gives crowd boxes no role at all),
narrower or lower than one pixel, or outside the image. Boxes are padded to a
fixed `G` with a validity mask.

Evaluation: every image once, resized and padded the same way, with its image id,
resized shape and scale factor (w_scale, h_scale) = resized / original, so
detections are clipped to the resized image and mapped back to the original one.

Which records train, `G`, the buckets of a split and its COCO ground truth come
from the split's index (`detection_index.py`). This module needs NumPy alone (no
loader), so the layout (`bucket_shapes`, `empty_train_example`) serves benchmarks
and memory estimates on machines without the input pipeline's packages.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import numpy as np

from cankd_jax.data.image_ops import IMAGENET_MEAN, IMAGENET_STD, rescale_size, resize_bilinear

# mmdet's data preprocessors: pytorch-style ResNets (RetinaNet, FCOS X101, GFL) take RGB with ImageNet's statistics;
# caffe-style ones (FCOS R50/R101 caffe) take BGR minus the caffe mean, std 1 (`bgr_to_rgb=False` on BGR-loaded images).
PYTORCH_NORM = dict(mean=tuple(IMAGENET_MEAN.tolist()), std=tuple(IMAGENET_STD.tolist()), to_bgr=False)
CAFFE_NORM = dict(mean=(102.9801, 115.9465, 122.7717), std=(1.0, 1.0, 1.0), to_bgr=True)
PAD_DIVISOR = 32


def ceil_to(x: int, divisor: int) -> int:
    return int(math.ceil(x / divisor) * divisor)


def bucket_shapes(scale: Sequence[int], divisor: int = PAD_DIVISOR) -> tuple[tuple[int, int], ...]:
    """The padded (h, w) shapes for keep-ratio resizing to `scale`: landscape, then portrait (one if they coincide)."""
    long, short = max(scale), min(scale)
    landscape = (ceil_to(short, divisor), ceil_to(long, divisor))
    portrait = landscape[::-1]
    return (landscape,) if portrait == landscape else (landscape, portrait)


def bucket_of(size: Sequence[int], buckets: Sequence[tuple[int, int]]) -> int:
    """The bucket of an image of original (h, w) = `size`: 0 (landscape, h <= w) or 1 (portrait)."""
    return 0 if len(buckets) == 1 or size[0] <= size[1] else 1


def training_objects(boxes: np.ndarray, is_crowd: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """`(N,)` bool: the objects mmdet trains on (`parse_data_info`, then crowd boxes ignored with iof -1).

    Not a crowd box, at least 1 pixel wide and high, and overlapping the (h, w) image.
    `size` is one (h, w) or one per box, `(N, 2)`.
    """
    size = np.asarray(size)
    h, w = size[..., 0], size[..., 1]
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    inter_w = np.maximum(0.0, np.minimum(boxes[:, 2], w) - np.maximum(boxes[:, 0], 0.0))
    inter_h = np.maximum(0.0, np.minimum(boxes[:, 3], h) - np.maximum(boxes[:, 1], 0.0))
    return ~np.asarray(is_crowd, bool) & (bw >= 1) & (bh >= 1) & (inter_w * inter_h > 0)


def _normalize(image: np.ndarray, mean, std, to_bgr: bool) -> np.ndarray:
    if to_bgr:
        image = image[..., ::-1]
    return (image.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _resize(image: np.ndarray, scale: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """mmdet Resize(keep_ratio=True): the resized image and (w_scale, h_scale) = new / old."""
    h, w = image.shape[:2]
    nh, nw = rescale_size((h, w), tuple(scale))
    resized = resize_bilinear(image, (nh, nw))
    return resized, np.array([nw / w, nh / h], np.float32)


def _pad(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    ph, pw = shape[0] - image.shape[0], shape[1] - image.shape[1]
    if ph < 0 or pw < 0:
        raise ValueError(f"resized image {image.shape[:2]} does not fit its bucket {shape}")
    return np.pad(image, ((0, ph), (0, pw), (0, 0)))


def empty_train_label(shape: Sequence[int], max_boxes: int) -> dict[str, Any]:
    """The label of a training example with no objects in an image padded to `shape = (Hb, Wb)`: `max_boxes`
    zero boxes, none valid (the layout in the module docstring)."""
    h, w = (int(x) for x in shape)
    return {"boxes": np.zeros((max_boxes, 4), np.float32), "labels": np.zeros((max_boxes,), np.int32),
            "valid": np.zeros((max_boxes,), bool), "img_shape": np.array([h, w], np.float32),
            "pad_shape": np.array([h, w], np.float32)}


def empty_train_example(shape: Sequence[int], max_boxes: int) -> dict[str, Any]:
    """A training example with no objects, padded to `shape = (Hb, Wb)` and `max_boxes`: the layout every
    detection training example has, zero-filled.

    `DetTrainAugment` fills the label part for every record; code that needs the layout without data (abstract
    shapes for memory estimates, random batches for timing) builds it from here so there is one definition of it.
    """
    h, w = (int(x) for x in shape)
    return {"image": np.zeros((h, w, 3), np.float32), "label": empty_train_label(shape, max_boxes)}


@dataclasses.dataclass(frozen=True)
class DetTrainAugment:
    """mmdet's training pipeline (`__call__(record, rng)`): resize, flip, normalise, pad to the bucket; targets
    padded to `max_boxes`. The only random draw is the flip's, so the output is a function of (record, rng)."""

    scale: tuple[int, int] = (1333, 800)
    max_boxes: int = 100
    flip_prob: float = 0.5
    mean: tuple[float, float, float] = PYTORCH_NORM["mean"]
    std: tuple[float, float, float] = PYTORCH_NORM["std"]
    to_bgr: bool = False
    pad_divisor: int = PAD_DIVISOR

    def __call__(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        size = record["image"].shape[:2]
        buckets = bucket_shapes(self.scale, self.pad_divisor)
        image, _ = _resize(record["image"], self.scale)
        nh, nw = image.shape[:2]
        keep = training_objects(record["boxes"], record["is_crowd"], size)
        boxes, labels = _rescale_boxes(record["boxes"][keep], size, (nh, nw)), record["labels"][keep]
        if rng.random() < self.flip_prob:
            image = image[:, ::-1]
            boxes = np.stack([nw - boxes[:, 2], boxes[:, 1], nw - boxes[:, 0], boxes[:, 3]], axis=-1)
        return _train_example(self, record, image, boxes, labels, buckets[bucket_of(size, buckets)])


def _train_example(augment: Any, record: Mapping[str, Any], image: np.ndarray, boxes: np.ndarray,
                   labels: np.ndarray, bucket: tuple[int, int]) -> dict[str, Any]:
    """The training example of an augmented `image` (h, w, 3) uint8 and its `boxes` (n, 4): normalised with
    `augment`'s statistics, padded to `bucket`, targets padded to `augment.max_boxes`."""
    nh, nw = image.shape[:2]
    n = len(boxes)
    if n > augment.max_boxes:
        raise ValueError(f"image {int(record['image_id'])} has {n} training boxes, more than "
                         f"data.max_boxes={augment.max_boxes}; raise --config.data.max_boxes (0: the split's maximum)")
    label = empty_train_label(bucket, augment.max_boxes)
    label["boxes"][:n] = boxes
    label["labels"][:n] = labels
    label["valid"][:n] = True
    label["img_shape"][:] = (nh, nw)
    label["pad_shape"][:] = (ceil_to(nh, augment.pad_divisor), ceil_to(nw, augment.pad_divisor))
    return {"image": _pad(_normalize(image, augment.mean, augment.std, augment.to_bgr), bucket), "label": label}


# mmdet's DETR-family training augmentation (`dino-4scale_r50_8xb2-12e_coco.py`, from Deformable DETR) at scale
# (1333, 800): short edges 480..800 in steps of 32 (long edge <= 1333); or a resize to a short edge of 400, 500
# or 600 (long edge <= 4200: no limit on COCO), a crop of 384..600 pixels a side, then one of those short edges.
DETR_SHORT_EDGES = tuple(range(480, 801, 32))
DETR_CROP_SHORT_EDGES = (400, 500, 600)
DETR_CROP_RANGE = (384, 600)
DETR_CROP_LONG_EDGE = 4200


@dataclasses.dataclass(frozen=True)
class DetrGeometry:
    """One draw of `DetrTrainAugment`: sizes are (h, w) pixels.

    flip: mirror the original image first; resized: its size after the first resize; crop: `(top, left, h, w)`
    of the resized image, or None (the multi-scale branch: no crop, no second resize); size: the final size.
    """

    flip: bool
    resized: tuple[int, int]
    crop: Optional[tuple[int, int, int, int]]
    size: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class DetrTrainAugment:
    """mmdet's DETR / DINO training pipeline (`__call__(record, rng)`), on the buckets of `scale`.

    RandomFlip(0.5), then RandomChoice of [RandomChoiceResize(short edges, long <= max(scale))] and
    [RandomChoiceResize(crop short edges, long <= crop_long_edge), RandomCrop('absolute_range', crop_range,
    allow_negative_crop=True), RandomChoiceResize(short edges)]: keep-ratio resizes as mmcv's `imrescale`,
    boxes rescaled and clipped after every resize, translated and clipped by the crop, which drops the boxes
    it leaves (mmdet's `is_inside`). Then normalise and pad as `DetTrainAugment`.

    A crop's orientation is random, so unlike `DetTrainAugment` the padded shape is decided by the draw:
    `bucket(size, rng)` says which one before any pixel is read, and an epoch plan that groups by it
    (`pipeline.DrawnGroupEpochs`) hands the augmentation the same generator, so every image lands in the
    bucket of its batch. The draws come in mmdet's order (`geometry`).

    `for_scale(scale, ...)` gives mmdet's values at (1333, 800) and the same proportions at any other scale.
    """

    scale: tuple[int, int] = (1333, 800)
    max_boxes: int = 100
    flip_prob: float = 0.5
    short_edges: tuple[int, ...] = DETR_SHORT_EDGES
    crop_short_edges: tuple[int, ...] = DETR_CROP_SHORT_EDGES
    crop_range: tuple[int, int] = DETR_CROP_RANGE
    crop_long_edge: int = DETR_CROP_LONG_EDGE
    mean: tuple[float, float, float] = PYTORCH_NORM["mean"]
    std: tuple[float, float, float] = PYTORCH_NORM["std"]
    to_bgr: bool = False
    pad_divisor: int = PAD_DIVISOR

    def __post_init__(self):
        if max(self.short_edges) > min(self.scale) or min(self.crop_range) < 1 or \
                self.crop_range[0] > self.crop_range[1]:
            raise ValueError(f"DetrTrainAugment: short edges {self.short_edges} must fit the scale {self.scale} "
                             f"and the crop range {self.crop_range} be 1 <= lo <= hi")

    @classmethod
    def for_scale(cls, scale: Sequence[int], **kwargs: Any) -> DetrTrainAugment:
        """mmdet's sizes scaled by min(scale) / 800 (exactly mmdet's at (1333, 800)), rounded to pixels."""
        f = min(scale) / 800
        px = lambda values: tuple(max(1, int(round(v * f))) for v in values)  # noqa: E731
        return cls(scale=tuple(int(x) for x in scale), short_edges=px(DETR_SHORT_EDGES),
                   crop_short_edges=px(DETR_CROP_SHORT_EDGES), crop_range=px(DETR_CROP_RANGE),
                   crop_long_edge=px((DETR_CROP_LONG_EDGE,))[0], **kwargs)

    def geometry(self, size: Sequence[int], rng: np.random.Generator) -> DetrGeometry:
        """The draw for an original (h, w) = `size`, in mmdet's order: flip, branch, scale [, crop h, crop w,
        top, left, scale]."""
        flip = bool(rng.random() < self.flip_prob)
        long = max(self.scale)
        if rng.integers(2) == 0:
            resized = rescale_size(tuple(size), (long, self.short_edges[rng.integers(len(self.short_edges))]))
            return DetrGeometry(flip, resized, None, resized)
        short = self.crop_short_edges[rng.integers(len(self.crop_short_edges))]
        h, w = resized = rescale_size(tuple(size), (self.crop_long_edge, short))
        lo, hi = self.crop_range
        ch = int(rng.integers(min(h, lo), min(h, hi) + 1))
        cw = int(rng.integers(min(w, lo), min(w, hi) + 1))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        final = rescale_size((ch, cw), (long, self.short_edges[rng.integers(len(self.short_edges))]))
        return DetrGeometry(flip, resized, (top, left, ch, cw), final)

    def bucket(self, size: Sequence[int], rng: np.random.Generator) -> int:
        """The bucket index an image of original (h, w) = `size` lands in with the draws of `rng`."""
        return bucket_of(self.geometry(size, rng).size, bucket_shapes(self.scale, self.pad_divisor))

    def __call__(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = record["image"]
        h, w = image.shape[:2]
        g = self.geometry((h, w), rng)
        keep = training_objects(record["boxes"], record["is_crowd"], (h, w))
        boxes, labels = record["boxes"][keep].astype(np.float32), record["labels"][keep]
        if g.flip:
            image = image[:, ::-1]
            boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=-1)
        boxes = _rescale_boxes(boxes, (h, w), g.resized)
        if g.crop is None:
            image = resize_bilinear(image, g.resized)
        else:
            top, left, ch, cw = g.crop
            # resizing only the crop's window gives the pixels of resizing everything and cropping
            image = resize_bilinear(image, g.resized, window=g.crop)
            boxes = np.clip(boxes - np.array([left, top, left, top], np.float32), 0.0,
                            np.array([cw, ch, cw, ch], np.float32))
            inside = (boxes[:, 0] < cw) & (boxes[:, 1] < ch) & (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
            boxes, labels = boxes[inside], labels[inside]
            image = resize_bilinear(image, g.size)
            boxes = _rescale_boxes(boxes, (ch, cw), g.size)
        buckets = bucket_shapes(self.scale, self.pad_divisor)
        return _train_example(self, record, image, boxes, labels, buckets[bucket_of(g.size, buckets)])


def _rescale_boxes(boxes: np.ndarray, old: Sequence[int], new: Sequence[int]) -> np.ndarray:
    """(n, 4) x1y1x2y2 boxes of an (h, w) = `old` image on its keep-ratio resize to `new`, clipped to it (mmdet's
    Resize: `rescale_` by (new_w / w, new_h / h), then `clip_`)."""
    (h, w), (nh, nw) = old, new
    boxes = boxes * np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
    return np.clip(boxes, 0.0, np.array([nw, nh, nw, nh], np.float32))


@dataclasses.dataclass(frozen=True)
class DetEvalPreprocess:
    """mmdet's test pipeline: resize (keep ratio), normalise, pad to the bucket; keeps what maps detections back.

    Out: `image`, `image_id` () int32, `img_shape` (2,) float32 resized (h, w),
    `scale_factor` (2,) float32 (w_scale, h_scale).
    """

    scale: tuple[int, int] = (1333, 800)
    mean: tuple[float, float, float] = PYTORCH_NORM["mean"]
    std: tuple[float, float, float] = PYTORCH_NORM["std"]
    to_bgr: bool = False
    pad_divisor: int = PAD_DIVISOR

    def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        size = record["image"].shape[:2]
        buckets = bucket_shapes(self.scale, self.pad_divisor)
        image, factor = _resize(record["image"], self.scale)
        return {"image": _pad(_normalize(image, self.mean, self.std, self.to_bgr), buckets[bucket_of(size, buckets)]),
                "image_id": np.asarray(record["image_id"], np.int32),
                "img_shape": np.asarray(image.shape[:2], np.float32), "scale_factor": factor}
