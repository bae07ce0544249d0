"""Detection data: mmdetection's training augmentation and test preprocessing, static shapes, grouped batches.

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
epoch) only), and evaluation runs each bucket's images as their own batches.

Targets follow mmdet's `CocoDataset.parse_data_info`: an object takes part in
training unless it is a crowd box (`is_crowd`; the RetinaNet/FCOS configs'
`ignore_iof_thr=-1` gives crowd boxes no role at all), narrower or lower than one
pixel, or outside the image. Boxes are padded to a fixed `G` (the largest count in
the split unless `max_boxes` says otherwise) with a validity mask. mmdet's
`filter_empty_gt` leaves out of training the images without any annotation (an
image with only crowd boxes stays, with no targets: all negatives, as in mmdet),
and `min_size` those with a side under 32 pixels.

Evaluation: every image once, resized and padded the same way, with its image id,
resized shape and scale factor (w_scale, h_scale) = resized / original, so
detections are clipped to the resized image and mapped back to the original one;
the ground truth of the split in COCO's format (crowd boxes as `iscrowd=1`) comes
from `DetectionIndex.coco_ground_truth`, so COCOeval scores any split, the synthetic
one included.

Every record's size and objects are read once per split without decoding pixels
(`DetectionIndex`, cached in `index_cache`), so the buckets, the filter and the
ground truth cost nothing at later starts.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any, Optional, Sequence

import numpy as np

from cankd_jax.data import pipeline
from cankd_jax.data.image_ops import IMAGENET_MEAN, IMAGENET_STD, rescale_size, resize_bilinear

log = logging.getLogger(__name__)

# mmdet's data preprocessors: pytorch-style ResNets (RetinaNet, FCOS X101, GFL) take RGB with ImageNet's statistics;
# caffe-style ones (FCOS R50/R101 caffe) take BGR minus the caffe mean, std 1 (`bgr_to_rgb=False` on BGR-loaded images).
PYTORCH_NORM = dict(mean=tuple(IMAGENET_MEAN.tolist()), std=tuple(IMAGENET_STD.tolist()), to_bgr=False)
CAFFE_NORM = dict(mean=(102.9801, 115.9465, 122.7717), std=(1.0, 1.0, 1.0), to_bgr=True)
PAD_DIVISOR = 32


def _ceil_to(x: int, divisor: int) -> int:
    return int(math.ceil(x / divisor) * divisor)


def bucket_shapes(scale: Sequence[int], divisor: int = PAD_DIVISOR) -> tuple[tuple[int, int], ...]:
    """The padded (h, w) shapes for keep-ratio resizing to `scale`: landscape, then portrait (one if they coincide)."""
    long, short = max(scale), min(scale)
    landscape = (_ceil_to(short, divisor), _ceil_to(long, divisor))
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
        image, (sx, sy) = _resize(record["image"], self.scale)
        nh, nw = image.shape[:2]
        keep = training_objects(record["boxes"], record["is_crowd"], size)
        boxes = record["boxes"][keep] * np.array([sx, sy, sx, sy], np.float32)
        labels = record["labels"][keep]
        boxes = np.clip(boxes, 0.0, np.array([nw, nh, nw, nh], np.float32))  # mmdet clips to the resized image
        if rng.random() < self.flip_prob:
            image = image[:, ::-1]
            boxes = np.stack([nw - boxes[:, 2], boxes[:, 1], nw - boxes[:, 0], boxes[:, 3]], axis=-1)
        n = len(boxes)
        if n > self.max_boxes:
            raise ValueError(f"image {int(record['image_id'])} has {n} training boxes, more than "
                             f"data.max_boxes={self.max_boxes}; raise --config.data.max_boxes (0: the split's maximum)")
        bucket = buckets[bucket_of(size, buckets)]
        label = empty_train_label(bucket, self.max_boxes)
        label["boxes"][:n] = boxes
        label["labels"][:n] = labels
        label["valid"][:n] = True
        label["img_shape"][:] = (nh, nw)
        label["pad_shape"][:] = (_ceil_to(nh, self.pad_divisor), _ceil_to(nw, self.pad_divisor))
        return {"image": _pad(_normalize(image, self.mean, self.std, self.to_bgr), bucket), "label": label}


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


# --- the per-split index ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DetectionIndex:
    """Every record's size, id and objects, without the pixels: what grouping, filtering and COCO ground truth need.

    sizes `(N, 2)` int32 (h, w); image_ids `(N,)` int64 (unique: the data set's ids, or the
    record indices if those repeat); offsets `(N + 1,)`: record i's objects are rows
    `offsets[i]:offsets[i + 1]` of boxes `(M, 4)` float32 x1y1x2y2, labels `(M,)` int32,
    is_crowd `(M,)` bool, areas `(M,)` float32.
    """

    sizes: np.ndarray
    image_ids: np.ndarray
    offsets: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    is_crowd: np.ndarray
    areas: np.ndarray

    def __len__(self) -> int:
        return len(self.sizes)

    def objects(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    @classmethod
    def build(cls, source: Any) -> DetectionIndex:
        """Read every record's annotations (`source.annotations(i)`, no pixels where the source can avoid them)."""
        n = len(source)
        sizes, ids, counts, parts = np.zeros((n, 2), np.int32), np.zeros((n,), np.int64), np.zeros((n,), np.int64), []
        for i in range(n):
            a = source.annotations(i)
            sizes[i], ids[i], counts[i] = a["size"], a["image_id"], len(a["boxes"])
            parts.append((a["boxes"], a["labels"], a["is_crowd"], a["area"]))
            if (i + 1) % 20000 == 0:
                log.info("indexed %d of %d records of %r", i + 1, n, source)
        if len(np.unique(ids)) != n or (n and (ids.min() < 0 or ids.max() >= 2**31)):
            log.warning("%r: image ids are not unique non-negative int32s; using record indices as image ids", source)
            ids = np.arange(n, dtype=np.int64)
        cat = lambda j, shape, dtype: (np.concatenate([p[j] for p in parts]).astype(dtype)  # noqa: E731
                                       if parts else np.zeros(shape, dtype))
        return cls(sizes, ids, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                   cat(0, (0, 4), np.float32).reshape(-1, 4), cat(1, (0,), np.int32), cat(2, (0,), bool),
                   cat(3, (0,), np.float32))

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, **dataclasses.asdict(self))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> DetectionIndex:
        with np.load(path) as z:
            return cls(**{f.name: z[f.name] for f in dataclasses.fields(cls)})

    def training_counts(self) -> np.ndarray:
        """`(N,)` objects per record that take part in training (`training_objects`)."""
        counts = np.diff(self.offsets)
        owner = np.repeat(np.arange(len(self)), counts)
        keep = training_objects(self.boxes, self.is_crowd, self.sizes[owner])
        return np.bincount(owner, weights=keep, minlength=len(self)).astype(np.int64)

    def trainable(self, *, filter_empty: bool = True, min_size: int = 0) -> np.ndarray:
        """Record indices mmdet trains on: with any annotation (crowd included) and both sides >= `min_size`."""
        keep = self.sizes.min(axis=1) >= min_size
        if filter_empty:
            keep &= np.diff(self.offsets) > 0
        return np.flatnonzero(keep)

    def coco_ground_truth(self, category_ids: Sequence[int], indices: Optional[np.ndarray] = None) -> dict:
        """The split (or `indices` of it) as a COCO-format ground truth dict (`pycocotools.coco.COCO.dataset`).

        Boxes `[x, y, w, h]` in original pixels, `area` the data set's, crowd boxes `iscrowd=1`; boxes
        without width or height (only synthetic mock data has them) are left out.
        """
        indices = np.arange(len(self)) if indices is None else np.asarray(indices)
        images, annotations = [], []
        for i in indices:
            image_id = int(self.image_ids[i])
            images.append({"id": image_id, "height": int(self.sizes[i, 0]), "width": int(self.sizes[i, 1])})
            rows = self.objects(i)
            for box, label, crowd, area in zip(self.boxes[rows], self.labels[rows], self.is_crowd[rows],
                                               self.areas[rows]):
                w, h = float(box[2] - box[0]), float(box[3] - box[1])
                if w <= 0 or h <= 0 or not 0 <= label < len(category_ids):
                    continue
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": int(category_ids[label]),
                                    "bbox": [float(box[0]), float(box[1]), w, h], "area": float(area),
                                    "iscrowd": int(crowd)})
        return {"images": images, "annotations": annotations, "categories": [{"id": int(c)} for c in category_ids]}


INDEX_VERSION = 1


def load_index(source: Any, cache_dir: Optional[str], key: str) -> DetectionIndex:
    """The `DetectionIndex` of `source`, from `cache_dir/<key>.npz` when there, else built (and saved there).

    Processes sharing the directory build it once (a file lock); an unwritable directory
    only costs the rebuild at every start.
    """
    if not cache_dir:
        return DetectionIndex.build(source)
    path = os.path.join(cache_dir, f"{key}-v{INDEX_VERSION}.npz")
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with open(os.path.join(cache_dir, ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if os.path.exists(path):
                    return DetectionIndex.load(path)
                log.info("indexing %r (sizes and objects, once; cached in %s)", source, path)
                index = DetectionIndex.build(source)
                index.save(path)
                return index
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    except OSError as e:
        log.warning("detection index cache %s unusable (%s); indexing %r without it", cache_dir, e, source)
        return DetectionIndex.build(source)


class IndexedRecords:
    """Records `indices` of a source (all when None), each given its image id from the index (Grain logs the repr)."""

    def __init__(self, source: Any, indices: Optional[np.ndarray], image_ids: np.ndarray):
        self._source, self._ids = source, image_ids
        self._indices = np.arange(len(source)) if indices is None else np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, key: int) -> dict:
        i = int(self._indices[int(key)])
        return {**self._source[i], "image_id": np.asarray(self._ids[i], np.int64)}

    def __repr__(self) -> str:
        return f"IndexedRecords({self._source!r}, len={len(self)})"


def split_groups(index: DetectionIndex, indices: np.ndarray, buckets: Sequence[tuple[int, int]]) -> np.ndarray:
    """The bucket of each of `indices` (from the index's sizes, no image read)."""
    return np.array([bucket_of(index.sizes[i], buckets) for i in indices], np.int32).reshape(-1)


@dataclasses.dataclass
class DetectionSplits:
    """What `dataset.DetectionData` holds beyond a `Data`: the indices, the trained records, the buckets."""

    train_index: DetectionIndex
    eval_index: DetectionIndex
    train_records: np.ndarray
    buckets: tuple[tuple[int, int], ...]
    max_boxes: int

    @property
    def train_groups(self) -> np.ndarray:
        return split_groups(self.train_index, self.train_records, self.buckets)

    def eval_parts(self) -> list[np.ndarray]:
        """The eval split's record indices per bucket, in split order (each bucket evaluates as its own batches)."""
        groups = split_groups(self.eval_index, np.arange(len(self.eval_index)), self.buckets)
        return [np.flatnonzero(groups == b) for b in range(len(self.buckets))]


def make_splits(train_source: Any, eval_source: Any, *, scale: Sequence[int], cache_dir: Optional[str],
                cache_key: str, max_boxes: int = 0, filter_empty: bool = True, min_size: int = 0) -> DetectionSplits:
    """Index both splits, choose the trained records and the box count `G` (0: the split's maximum, rounded up
    to a multiple of 8)."""
    train_index = load_index(train_source, cache_dir, f"{cache_key}-train{len(train_source)}")
    eval_index = load_index(eval_source, cache_dir, f"{cache_key}-eval{len(eval_source)}")
    records = train_index.trainable(filter_empty=filter_empty, min_size=min_size)
    if not len(records):
        raise ValueError(f"no training image of {train_source!r} has an annotation and both sides >= {min_size}")
    most = int(train_index.training_counts()[records].max())
    if not max_boxes:
        max_boxes = max(8, _ceil_to(most, 8))
    elif most > max_boxes:
        raise ValueError(f"a training image of {train_source!r} has {most} training boxes, more than "
                         f"data.max_boxes={max_boxes}; raise --config.data.max_boxes (0: the split's maximum)")
    log.info("detection data: %d of %d training images (filter_empty=%s, min_size=%d), up to %d boxes each; "
             "buckets %s", len(records), len(train_index), filter_empty, min_size, max_boxes,
             bucket_shapes(scale))
    return DetectionSplits(train_index, eval_index, records, bucket_shapes(scale), int(max_boxes))


def grouped_eval_batches(source: Any, preprocess: Any, parts: Sequence[np.ndarray], image_ids: np.ndarray, *,
                         batch_size: int, worker_count: int, shard_options: Any) -> Iterator[dict]:
    """One pass over `source`: each bucket's records (`parts`) in their own batches of one shape, split across
    processes as `pipeline.make_eval_iterator` splits a source (every process yields the same batch count)."""
    for indices in parts:
        if len(indices):
            yield from pipeline.make_eval_iterator(IndexedRecords(source, indices, image_ids), preprocess,
                                                   batch_size=batch_size, worker_count=worker_count,
                                                   shard_options=shard_options)
