"""Where examples come from: TFDS random-access sources mapped to one common record.

Every source yields `{'image': (H, W, 3) uint8 RGB, 'label': ...}` where the
label is an (H, W) uint8 class map (255 = ignore) for segmentation or an int32
class id for classification. The per-dataset differences (feature names, label
encodings, splits, how to obtain the data) live in the `DATASETS` table.

Reading goes through `tfds.data_source` (ArrayRecord, random access, no
TensorFlow). Catalogue image features are PNG/JPEG inside the records, and TFDS
decodes them with OpenCV or Pillow, so reading real Cityscapes/ADE20K/ImageNet
needs one of those installed; the synthetic set stores raw tensors and needs
neither.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import tensorflow_datasets as tfds

from cankd_jax.data import image_ops, synthetic
from cankd_jax.data.image_ops import IGNORE
from cankd_jax.data.scenes import NUM_CLASSES as SYNTHETIC_CLASSES


def _lut(pairs: dict[int, int]) -> np.ndarray:
    """A 256-entry uint8 lookup table: listed values map as given, all others to IGNORE."""
    table = np.full(256, IGNORE, np.uint8)
    for src, dst in pairs.items():
        table[src] = dst
    return table


# Cityscapes gtFine labelIds -> the 19 training ids (cityscapesScripts' `labels.py`; the rest are ignored).
CITYSCAPES_TRAIN_IDS = _lut({7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                             24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18})
# mmseg's `reduce_zero_label`: 0 (unlabelled) -> ignore, k -> k - 1.
REDUCE_ZERO = _lut({k: k - 1 for k in range(1, 256)})


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How one catalogue dataset maps onto the common record."""

    tfds_name: str
    task: str  # "segmentation" | "classification"
    num_classes: int
    image_key: str
    label_key: str
    train_split: str
    eval_split: str
    how_to_get: str  # the fix named in the "not found" error
    label_lut: Optional[np.ndarray] = None  # uint8 -> uint8 remapping of segmentation labels


_TFDS_CATALOG = "https://www.tensorflow.org/datasets/catalog/"
DATASETS: dict[str, DatasetSpec] = {
    "synthetic": DatasetSpec(
        synthetic.NAME, "segmentation", SYNTHETIC_CLASSES, "image", "mask", "train", "test",
        "it is generated on first use by cankd_jax.data.prepare_synthetic"),
    "cityscapes": DatasetSpec(
        "cityscapes/semantic_segmentation", "segmentation", 19, "image_left", "segmentation_label",
        "train", "validation",
        f"Cityscapes needs a manual download: see {_TFDS_CATALOG}cityscapes, prepare it with "
        "file_format=array_record, then pass --config.data.data_dir",
        label_lut=CITYSCAPES_TRAIN_IDS),
    # TFDS's scene_parse150 ships the 2017 *instance* annotations: the red channel is the class of the
    # 100 instance categories (0 = unlabelled), not mmseg's 150-class semantic ADE20K maps.
    "scene_parse150": DatasetSpec(
        "scene_parse150", "segmentation", 100, "image", "annotation", "train", "test",
        f"prepare it with `tfds build scene_parse150 --file_format=array_record` (see {_TFDS_CATALOG}"
        "scene_parse150), then pass --config.data.data_dir",
        label_lut=REDUCE_ZERO),
    "imagenet2012": DatasetSpec(
        "imagenet2012", "classification", 1000, "image", "label", "train", "validation",
        f"ImageNet needs a manual download: see {_TFDS_CATALOG}imagenet2012, prepare it with "
        "file_format=array_record, then pass --config.data.data_dir"),
    "cifar10": DatasetSpec(
        "cifar10", "classification", 10, "image", "label", "train", "test",
        f"prepare it with `tfds build cifar10 --file_format=array_record` (see {_TFDS_CATALOG}cifar10), "
        "then pass --config.data.data_dir"),
}
ALIASES = {"ade20k": "scene_parse150", "imagenet": "imagenet2012"}


def dataset_spec(name: str) -> DatasetSpec:
    """The table entry for `name` (or an alias), with a clear error for unknown names."""
    key = ALIASES.get(name, name)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(sorted([*DATASETS, *ALIASES]))}")
    return DATASETS[key]


class MappedSource:
    """A random-access source of common records over a TFDS source (anything with len and [])

    The repr names only the dataset, split and length, so a saved iterator
    position stays valid when the data directory moves (Grain checks it).
    """

    def __init__(self, source: Sequence[dict], spec: DatasetSpec, name: str, split: str):
        self._source, self._spec, self._name, self._split = source, spec, name, split

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, key: int) -> dict[str, np.ndarray]:
        return to_record(self._source[int(key)], self._spec)

    def __repr__(self) -> str:
        return f"MappedSource({self._name!r}, split={self._split!r}, len={len(self)})"


def to_record(example: dict[str, Any], spec: DatasetSpec) -> dict[str, np.ndarray]:
    """One TFDS example -> `{'image': (H, W, 3) uint8, 'label': (H, W) uint8 or () int32}`."""
    image = np.asarray(example[spec.image_key], np.uint8)
    if image.ndim == 2 or image.shape[-1] == 1:  # grayscale -> RGB
        image = np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=-1)
    label = np.asarray(example[spec.label_key])
    if spec.task == "classification":
        return {"image": image, "label": label.astype(np.int32).reshape(())}
    if label.ndim == 3:  # PNG label images decode as (H, W, C); the class is in the first channel
        label = label[..., 0]
    label = label.astype(np.uint8)
    if spec.label_lut is not None:
        label = spec.label_lut[label]
    if label.shape != image.shape[:2]:
        # Only TFDS mock data draws image and label sizes independently; real pairs always match.
        label = image_ops.resize_nearest(label, image.shape[:2])
    return {"image": image, "label": label}


def open_source(name: str, split: str, data_dir: Optional[str] = None, *,
                synthetic_options: Optional[dict] = None) -> MappedSource:
    """The common-record source for `split` of dataset `name`.

    The synthetic set is generated into `data_dir` if missing (`synthetic_options`:
    image_size, num_train, num_test, seed). A catalogue set must already be
    prepared there in ArrayRecord format; if not, a FileNotFoundError names the fix.
    """
    spec = dataset_spec(name)
    if spec.tfds_name == synthetic.NAME:
        source = synthetic.prepare_synthetic(data_dir, **(synthetic_options or {})).as_data_source(split=split)
    else:
        try:
            source = tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # TFDS raises assorted errors (NotImplementedError, AssertionError, ...)
            raise _missing_error(name, spec, data_dir, split) from e
    return MappedSource(source, spec, ALIASES.get(name, name), split)


def _missing_error(name: str, spec: DatasetSpec, data_dir: Optional[str], split: str) -> Exception:
    where = data_dir or tfds.core.constants.DATA_DIR
    try:
        builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
        prepared = builder.is_prepared()
    except Exception:
        builder, prepared = None, False
    if not prepared:
        return FileNotFoundError(f"dataset {name!r} not found under {where}; {spec.how_to_get}")
    if split not in builder.info.splits:
        return ValueError(f"dataset {name!r} has no split {split!r}; it has {', '.join(builder.info.splits)}")
    return ValueError(f"dataset {name!r} under {where} is not in ArrayRecord format (random access needs it); "
                      f"rebuild it with file_format=array_record")
