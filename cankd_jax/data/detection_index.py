"""The per-split index of a detection data set: every record's size, id and objects, read once, cached.

Grouping by bucket, mmdet's training filter and the COCO ground truth need each
record's size and annotations but not its pixels. `DetectionIndex.build` reads
them once per split (`source.annotations(i)`), and `load_index` caches the result
in `index_cache`, so later starts cost nothing.

mmdet's `filter_empty_gt` leaves out of training the images without any
annotation (an image with only crowd boxes stays, with no targets: all negatives,
as in mmdet), and `min_size` those with a side under 32 pixels (`trainable`).
Boxes are padded to a fixed `G`: the largest count of training objects in the
split unless `max_boxes` says otherwise (`make_splits`). The ground truth of a
split in COCO's format (crowd boxes as `iscrowd=1`) comes from
`DetectionIndex.coco_ground_truth`, so COCOeval scores any split, the synthetic one
included.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
from typing import Any, Optional, Sequence

import numpy as np

from cankd_jax.data.detection import bucket_of, bucket_shapes, ceil_to, training_objects

log = logging.getLogger(__name__)


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


def _has_ground_truth(index: DetectionIndex) -> bool:
    """Whether any object of `index` is one COCOeval scores detections against: a box of positive width and height
    (what `coco_ground_truth` keeps) that is not a crowd box (crowd boxes only excuse detections)."""
    wide = (index.boxes[:, 2] > index.boxes[:, 0]) & (index.boxes[:, 3] > index.boxes[:, 1])
    return bool((wide & ~index.is_crowd).any())


def make_splits(train_source: Any, eval_source: Any, *, scale: Sequence[int], cache_dir: Optional[str],
                cache_key: str, max_boxes: int = 0, filter_empty: bool = True, min_size: int = 0) -> DetectionSplits:
    """Index both splits, choose the trained records and the box count `G` (0: the split's maximum, rounded up
    to a multiple of 8)."""
    def key(source: Any, split: str) -> str:
        # The files' fingerprint: a data set prepared again in the same place (same lengths) is indexed again.
        return "-".join(filter(None, (cache_key, f"{split}{len(source)}", getattr(source, "fingerprint", ""))))

    train_index = load_index(train_source, cache_dir, key(train_source, "train"))
    eval_index = load_index(eval_source, cache_dir, key(eval_source, "eval"))
    records = train_index.trainable(filter_empty=filter_empty, min_size=min_size)
    if not len(records):
        raise ValueError(f"no training image of {train_source!r} has an annotation and both sides >= {min_size}")
    counts = train_index.training_counts()[records]
    if not counts.any():  # mmdet's filter keeps them, but every target would be background
        raise ValueError(f"no training image of {train_source!r} has a box that trains: its "
                         f"{int(np.diff(train_index.offsets)[records].sum())} annotations are all crowd boxes or "
                         "under 1 pixel wide or tall")
    if not _has_ground_truth(eval_index):
        raise ValueError(f"the eval split {eval_source!r} holds no annotated object (a non-crowd box of positive "
                         "width and height): COCO's mAP is undefined there (-1); evaluate on a split with annotations")
    most = int(counts.max())
    if not max_boxes:
        max_boxes = max(8, ceil_to(most, 8))
    elif most > max_boxes:
        raise ValueError(f"a training image of {train_source!r} has {most} training boxes, more than "
                         f"data.max_boxes={max_boxes}; raise --config.data.max_boxes (0: the split's maximum)")
    log.info("detection data: %d of %d training images (filter_empty=%s, min_size=%d), up to %d boxes each; "
             "buckets %s", len(records), len(train_index), filter_empty, min_size, max_boxes,
             bucket_shapes(scale))
    return DetectionSplits(train_index, eval_index, records, bucket_shapes(scale), int(max_boxes))
