"""From the `data` section of a run config to train and eval iterators: what a trainer calls.

    data = make_data(config.data, task="segmentation")          # opens (or generates) the data
    it = data.train_iterator(global_batch, seed=config.seed, rows=(r0, r1), state=saved_or_None)
    batch = next(it)        # this process's rows: {'image': (r1-r0, h, w, 3) float32, 'label': (r1-r0, h, w) int32}
    saved = it.get_state()  # JSON-serialisable dict, valid on any topology: store it in the checkpoint
    for batch in data.eval_iterator(mesh): ...  # same keys + 'valid': (B,) bool; each example once

Config keys (all optional except `name`; `options.DATASET_DEFAULTS` fills per-dataset values, and
`options.data_section` writes a config's whole section):
  name            synthetic | synthetic_detection | cityscapes | scene_parse150 (ade20k) |
                  imagenet2012 (imagenet) | cifar10 | coco (coco/2017)
  data_dir        TFDS data directory ("" = TFDS's default)
  train_split, eval_split                      ("" = the dataset's usual ones)
  image_size, num_train, num_test, synthetic_seed    (synthetic sets only)
  crop_size (h, w), scale (w, h), ratio_range, cat_max_ratio, flip_prob, photometric   (training)
  eval_scale (w, h) or None, eval_keep_ratio, eval_pad_size (h, w) or None   (segmentation eval)
  crop_scale, eval_resize                      (classification: random-resized-crop area, eval short edge)
  scale (long, short), norm ('pytorch' | 'caffe'), max_boxes (0 = the split's most), filter_empty, min_size,
  augment ('resize_flip' | 'detr'), index_cache ("" = <data_dir>/cankd_jax_index, "none" = off)
                                               (detection, see `detection.py`)
  eval_batch_size (global), workers (Grain worker processes, 0 = in-process)

Detection data (`DetectionData`) yields batches of a few fixed shapes (one per
bucket) and says how many: `num_train_shapes(global_batch_size)`.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import grain.python as grain
import numpy as np

import tensorflow_datasets as tfds

from cankd_jax.data import detection, detection_index, pipeline
from cankd_jax.data.classification import ClsEvalPreprocess, ClsTrainAugment
from cankd_jax.data.segmentation import (
    PhotoMetricDistortion,
    SegEvalPreprocess,
    SegTrainAugment,
)
from cankd_jax.data.options import PAIRS, allowed_keys, dataset_key
from cankd_jax.data.sources import (
    DatasetSpec,
    MappedSource,
    dataset_spec,
    open_source,
)

NORMS = {"pytorch": detection.PYTORCH_NORM, "caffe": detection.CAFFE_NORM}
# data.augment -> the detection training augmentation at data.scale: mmdet's resize + flip (the CNN detectors) or
# its DETR multi-scale resize / resize-crop-resize (DINO)
DETECTION_AUGMENTS = {"resize_flip": detection.DetTrainAugment, "detr": detection.DetrTrainAugment.for_scale}


def _check_sizes(opts: Mapping[str, Any]) -> None:
    """Sizes that are set must be two positive numbers (a zero scale resizes every image to 1x1 and trains on
    padding; a zero batch or negative worker count fails deep in the pipeline), each named by its key."""
    for k in ("crop_size", "scale", "eval_scale", "eval_pad_size"):
        v = opts.get(k)
        if v is not None and not (len(v) == 2 and all(_positive(x) and float(x).is_integer() for x in v)):
            raise ValueError(f"data.{k} must be two positive whole numbers of pixels, got {v!r}")
    ranges = {"ratio_range": (float("inf"), "0 < low <= high"), "crop_scale": (1.0, "0 < low <= high <= 1")}
    for k, (top, rule) in ranges.items():
        v = opts.get(k)
        if v is not None and not (len(v) == 2 and all(_positive(x) for x in v) and v[0] <= v[1] <= top):
            raise ValueError(f"data.{k} must be (low, high) with {rule}, got {v!r}")
    ratio = opts.get("cat_max_ratio", 1.0)
    if not (_positive(ratio) and ratio <= 1):
        raise ValueError(f"data.cat_max_ratio must be in (0, 1] (1: no re-draws), got {ratio!r}")
    if not _positive(opts.get("eval_batch_size", 1)):
        raise ValueError(f"data.eval_batch_size must be a positive number of images, got {opts['eval_batch_size']!r}")
    workers = opts.get("workers", 0)
    if not (_positive(workers) or workers == 0):
        raise ValueError(f"data.workers must be >= 0 (0: in-process), got {workers!r}")
    flip = opts.get("flip_prob", 0.5)
    if not (isinstance(flip, numbers.Real) and 0 <= flip <= 1):
        raise ValueError(f"data.flip_prob must be a probability in [0, 1], got {flip!r}")
    if "min_size" in opts and not (_positive(opts["min_size"]) or opts["min_size"] == 0):
        raise ValueError(f"data.min_size must be >= 0 (pixels; 0: keep every image), got {opts['min_size']!r}")
    if "filter_empty" in opts and not isinstance(opts["filter_empty"], bool):  # 'no' would read as True
        raise ValueError(f"data.filter_empty must be True or False, got {opts['filter_empty']!r}")


def _positive(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and x > 0


def _resolve(cfg: Mapping[str, Any]) -> tuple[str, DatasetSpec, dict[str, Any]]:
    """Config mapping -> (dataset key, spec, full option dict), rejecting unknown keys."""
    if not cfg.get("name"):
        raise ValueError("data config needs a dataset name: set --config.data.name")
    key = dataset_key(cfg["name"])
    spec = dataset_spec(key)
    opts = allowed_keys(key)
    unknown = sorted(set(cfg) - set(opts))
    if unknown:
        raise ValueError(f"unknown data config key(s) {unknown} for dataset {key!r}; known: {', '.join(sorted(opts))}")
    opts.update(cfg)
    for k in PAIRS:
        if k in opts and opts[k] is not None:
            if isinstance(opts[k], (str, bytes)) or not hasattr(opts[k], "__len__"):
                raise ValueError(f"data.{k} must be a pair of numbers such as (512, 1024), got {opts[k]!r}")
            opts[k] = tuple(opts[k]) or None  # () means "none" too (ConfigDicts cannot always hold None)
    _check_sizes(opts)
    if key == "synthetic":
        side = (int(opts["image_size"]),) * 2
        opts["crop_size"] = opts["crop_size"] or side
        opts["scale"] = opts["scale"] or side
    if spec.task == "detection":
        if opts.get("crop_size") is not None:  # detection resizes to data.scale (DINO crops by its own rule)
            raise ValueError(f"dataset {key!r} does not crop to data.crop_size (detection resizes to data.scale); "
                             "drop data.crop_size")
        if key == "synthetic_detection" and not opts["scale"]:
            opts["scale"] = (int(opts["image_size"]),) * 2
        if not opts["scale"] or len(opts["scale"]) != 2:
            raise ValueError(f"dataset {key!r} needs --config.data.scale (long, short), e.g. (1333, 800)")
        if opts["norm"] not in NORMS:
            raise ValueError(f"unknown data.norm {opts['norm']!r}; choose one of {', '.join(NORMS)}")
        if opts["augment"] not in DETECTION_AUGMENTS:
            raise ValueError(f"unknown data.augment {opts['augment']!r}; choose one of {', '.join(DETECTION_AUGMENTS)}")
        return key, spec, opts
    if not opts["crop_size"] or (spec.task == "segmentation" and not opts["scale"]):
        raise ValueError(f"dataset {key!r} needs --config.data.crop_size (h, w)"
                         + (" and --config.data.scale (w, h)" if spec.task == "segmentation" else ""))
    return key, spec, opts


@dataclasses.dataclass
class Data:
    """Opened train and eval sources of one dataset plus their preprocessing."""

    name: str
    spec: DatasetSpec
    options: dict[str, Any]
    train_source: MappedSource
    eval_source: MappedSource
    train_transform: Any  # (record, np.random.Generator) -> record
    eval_transform: Any  # record -> record

    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def input_size(self) -> tuple[int, int]:
        """(h, w) of training images."""
        return tuple(int(x) for x in self.options["crop_size"])

    def _eval_batch_size(self, mesh: Any, batch_size: Optional[int],
                         shard_options: Optional[grain.ShardOptions]) -> int:
        if batch_size is not None:
            return batch_size
        global_batch = int(self.options["eval_batch_size"])
        if mesh is not None and global_batch % mesh.devices.size:
            raise ValueError(f"eval_batch_size={global_batch} is not divisible by the {mesh.devices.size} "
                             f"devices; set --config.data.eval_batch_size to a multiple of {mesh.devices.size}")
        return pipeline.per_process_batch_size(global_batch, shard_options.shard_count if shard_options else None)

    def check_eval_batch_size(self, mesh: Any) -> None:
        """Raise the eval iterator's `ValueError` for an `eval_batch_size` the devices or processes of `mesh`
        cannot split, now: a run's first evaluation can come after hours of training."""
        self._eval_batch_size(mesh, None, None)

    def train_iterator(self, global_batch_size: int, *, seed: int, rows: Optional[tuple[int, int]] = None,
                       state: Optional[Mapping[str, Any]] = None) -> pipeline.TrainIterator:
        """Endless augmented training batches: rows `[r0, r1)` (default: all) of each global batch."""
        return pipeline.make_train_iterator(
            self.train_source, self.train_transform, global_batch_size=global_batch_size, seed=seed, rows=rows,
            worker_count=int(self.options["workers"]), state=state, dataset=self.identity)

    @property
    def identity(self) -> str:
        """Which records train: the set, its training split and a synthetic set's options (not its location)."""
        o = self.options
        synthetic = {k: o[k] for k in ("image_size", "num_train", "synthetic_seed") if k in o}
        return f"{self.name}:{o.get('train_split') or self.spec.train_split}" + (
            "(" + ",".join(f"{k}={v}" for k, v in synthetic.items()) + ")" if synthetic else "")

    def eval_iterator(self, mesh: Any = None, *, batch_size: Optional[int] = None,
                      shard_options: Optional[grain.ShardOptions] = None) -> Iterator[dict]:
        """One pass over the eval split; `batch_size` (per process) defaults to eval_batch_size / processes.

        With a `mesh`, the global eval batch must split evenly over its devices.
        """
        batch_size = self._eval_batch_size(mesh, batch_size, shard_options)
        return pipeline.make_eval_iterator(self.eval_source, self.eval_transform, batch_size=batch_size,
                                           worker_count=int(self.options["workers"]), shard_options=shard_options)


@dataclasses.dataclass
class DetectionData(Data):
    """Detection data: batches of one bucket shape each (`detection.py`), the split's COCO ground truth.

    `train_source` holds only the trained records (`filter_empty`, `min_size`);
    `splits` the per-split indices, buckets and box count.
    """

    splits: detection_index.DetectionSplits = None

    @property
    def input_size(self) -> tuple[int, int]:
        """(h, w) of the first (landscape) bucket."""
        return self.splits.buckets[0]

    @property
    def category_ids(self) -> tuple[int, ...]:
        """Contiguous label -> the data set's category id."""
        return self.spec.category_ids

    def epoch_plan(self, global_batch_size: int, seed: int) -> Any:
        """Batches of one bucket each: grouped by the images' own orientation, or, where the augmentation's draw
        decides the bucket (`bucket(size, rng)`: DETR's crops), by that draw, epoch by epoch."""
        draw = getattr(self.train_transform, "bucket", None)
        if draw is not None:
            sizes = self.splits.train_index.sizes[self.splits.train_records]
            return pipeline.DrawnGroupEpochs(sizes, draw, len(self.splits.buckets), global_batch_size, seed)
        return pipeline.GroupedEpochs(self.splits.train_groups, global_batch_size, seed)

    def num_train_shapes(self, global_batch_size: int) -> int:
        """How many batch shapes training yields (buckets holding at least one whole global batch)."""
        return self.epoch_plan(global_batch_size, 0).num_groups

    def train_iterator(self, global_batch_size: int, *, seed: int, rows: Optional[tuple[int, int]] = None,
                       state: Optional[Mapping[str, Any]] = None) -> pipeline.TrainIterator:
        return pipeline.make_train_iterator(
            self.train_source, self.train_transform, global_batch_size=global_batch_size, seed=seed, rows=rows,
            worker_count=int(self.options["workers"]), epoch_plan=self.epoch_plan(global_batch_size, seed),
            state=state, dataset=self.identity)

    def eval_iterator(self, mesh: Any = None, *, batch_size: Optional[int] = None,
                      shard_options: Optional[grain.ShardOptions] = None) -> Iterator[dict]:
        """One pass over the eval split, landscape images first, then portrait ones; each batch one shape."""
        batch_size = self._eval_batch_size(mesh, batch_size, shard_options)
        if shard_options is None:
            import jax  # see pipeline.per_process_batch_size

            shard_options = grain.ShardOptions(jax.process_index(), jax.process_count())
        return pipeline.grouped_eval_batches(self.eval_source, self.eval_transform, self.splits.eval_parts(),
                                              self.splits.eval_index.image_ids, batch_size=batch_size,
                                              worker_count=int(self.options["workers"]), shard_options=shard_options)

    def coco_ground_truth(self) -> dict:
        """The eval split as a COCO-format ground truth (what `COCOeval` compares detections with)."""
        return self.splits.eval_index.coco_ground_truth(self.category_ids)


def train_example_layouts(cfg: Mapping[str, Any], *, max_boxes: int = 0) -> list[dict[str, Any]]:
    """One zero-filled training example per batch shape a `data` config yields, known without opening the data.

    Segmentation: `{'image': (h, w, 3) float32, 'label': (h, w) int32}` at `crop_size`; classification: a scalar
    label; detection: one example per bucket (landscape, then portrait), padded to `data.max_boxes` objects, or
    to `max_boxes` where the config leaves it to the split (0): the split's maximum is known only once the data
    is indexed. What ahead-of-time compilation (memory estimates, the pod rehearsal) needs.
    """
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    _, spec, o = _resolve(cfg)
    if spec.task == "detection":
        boxes = int(o["max_boxes"]) or int(max_boxes)
        if boxes <= 0:
            raise ValueError("data.max_boxes=0 pads to the split's most objects, known only from the data; "
                             "give the count to assume (COCO train2017: 93)")
        return [detection.empty_train_example(shape, boxes) for shape in detection.bucket_shapes(o["scale"])]
    h, w = (int(x) for x in o["crop_size"])
    label = np.zeros((h, w) if spec.task == "segmentation" else (), np.int32)
    return [{"image": np.zeros((h, w, 3), np.float32), "label": label}]


def make_data(cfg: Mapping[str, Any], task: Optional[str] = None) -> Data:
    """Open the dataset a `data` config names (generating the synthetic set if needed).

    `cfg`: a dict or ml_collections.ConfigDict with the keys in this module's
    docstring. `task` (if given) must match the dataset's task.
    """
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    if task is not None and cfg.get("name") and dataset_spec(cfg["name"]).task != task:
        # Before the keys: a data section written for another task holds keys this data set does not take.
        raise ValueError(f"dataset {cfg['name']!r} is for {dataset_spec(cfg['name']).task}, but task.name is "
                         f"{task!r}; use a {dataset_spec(cfg['name']).task} config (see configs/)")
    key, spec, o = _resolve(cfg)
    data_dir = o["data_dir"] or None
    if data_dir and os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise ValueError(f"data.data_dir {data_dir!r} is a file, not a directory")
    synthetic_options = None
    if key in ("synthetic", "synthetic_detection"):
        synthetic_options = dict(image_size=o["image_size"], num_train=o["num_train"], num_test=o["num_test"],
                                 seed=o["synthetic_seed"])
    train_split, eval_split = o["train_split"] or spec.train_split, o["eval_split"] or spec.eval_split
    train = open_source(key, train_split, data_dir, synthetic_options=synthetic_options)
    evaluation = open_source(key, eval_split, data_dir, synthetic_options=synthetic_options)
    if spec.task == "detection":
        return _detection_data(key, spec, o, train, evaluation, train_split, eval_split, synthetic_options)
    if spec.task == "segmentation":
        train_t = SegTrainAugment(scale=o["scale"], crop_size=o["crop_size"], ratio_range=o["ratio_range"],
                                  cat_max_ratio=o["cat_max_ratio"], flip_prob=o["flip_prob"],
                                  photometric=PhotoMetricDistortion() if o["photometric"] else None)
        eval_t = SegEvalPreprocess(scale=o["eval_scale"], keep_ratio=bool(o["eval_keep_ratio"]),
                                   pad_size=o["eval_pad_size"])
    else:
        resize = o["eval_resize"] or round(max(o["crop_size"]) / 0.875)  # the usual 224 / 256
        if not (_positive(resize) and resize >= max(o["crop_size"])):
            raise ValueError(f"data.eval_resize={resize!r} must be a short edge >= crop_size {o['crop_size']} "
                             "(evaluation resizes, then centre-crops)")
        train_t = ClsTrainAugment(crop_size=o["crop_size"], scale=o["crop_scale"], flip_prob=o["flip_prob"])
        eval_t = ClsEvalPreprocess(crop_size=o["crop_size"], resize=int(resize))
    return Data(key, spec, o, train, evaluation, train_t, eval_t)


def _detection_data(key: str, spec: DatasetSpec, o: dict[str, Any], train: MappedSource, evaluation: MappedSource,
                    train_split: str, eval_split: str, synthetic_options: Optional[dict]) -> DetectionData:
    cache = o["index_cache"]
    if cache == "none":
        cache = None
    elif not cache:
        cache = os.path.join(os.path.expanduser(o["data_dir"] or tfds.core.constants.DATA_DIR), "cankd_jax_index")
    variant = "-".join(f"{k}{v}" for k, v in sorted((synthetic_options or {}).items()))
    splits = detection_index.make_splits(
        train, evaluation, scale=o["scale"], cache_dir=cache,
        cache_key="-".join(filter(None, (key, variant, f"{train_split}.{eval_split}"))),
        max_boxes=int(o["max_boxes"]), filter_empty=bool(o["filter_empty"]), min_size=int(o["min_size"]))
    norm = NORMS[o["norm"]]
    scale = tuple(int(x) for x in o["scale"])
    train_t = DETECTION_AUGMENTS[o["augment"]](scale, max_boxes=splits.max_boxes, flip_prob=float(o["flip_prob"]),
                                               **norm)
    eval_t = detection.DetEvalPreprocess(scale=scale, **norm)
    records = detection_index.IndexedRecords(train, splits.train_records, splits.train_index.image_ids)
    return DetectionData(key, spec, o, records, evaluation, train_t, eval_t, splits=splits)
