"""Where examples come from: TFDS random-access sources mapped to one common record.

Every source yields `{'image': (H, W, 3) uint8 RGB, 'label': ...}` where the
label is an (H, W) uint8 class map (255 = ignore) for segmentation or an int32
class id for classification; detection records carry the objects instead
(`to_detection_record`: boxes in pixels, contiguous labels, crowd flags, the image
id). The per-dataset differences (feature names, label encodings, splits, how to
obtain the data) live in the `DATASETS` table. A record the pipeline cannot use as
it is (undecodable, labels outside the classes, a label map of another size than
its image) raises `BadRecord`, naming the data set, split and record.

Reading goes through `tfds.data_source` (ArrayRecord, random access, no
TensorFlow). Catalogue image features are PNG/JPEG inside the records, and TFDS
decodes them with OpenCV or Pillow, so reading real Cityscapes/ADE20K/ImageNet
needs one of those installed; the synthetic set stores raw tensors and needs
neither.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import tensorflow_datasets as tfds

from cankd_jax.data import synthetic
from cankd_jax.data.image_ops import IGNORE
from cankd_jax.data.options import ALIASES, dataset_key
from cankd_jax.data.scenes import NUM_CLASSES as SYNTHETIC_CLASSES

log = logging.getLogger(__name__)

# COCO's 80 category ids in the order of TFDS coco's contiguous labels 0..79 (the annotation file's order).
COCO_CATEGORY_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
                     31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
                     56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
                     85, 86, 87, 88, 89, 90)


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
    task: str  # "segmentation" | "classification" | "detection"
    num_classes: int
    image_key: str
    label_key: str
    train_split: str
    eval_split: str
    how_to_get: str  # the fix named in the "not found" error
    label_lut: Optional[np.ndarray] = None  # uint8 -> uint8 remapping of segmentation labels
    # Detection: the objects feature is `label_key` (a Sequence of bbox / label / is_crowd / area).
    image_id_key: str = ""  # the image's id in the data set ("": the record's index)
    label_offset: int = 0  # contiguous label = stored label - label_offset (the synthetic set's 0 is background)
    category_ids: tuple[int, ...] = ()  # contiguous label -> the data set's category id (what COCO's tools expect)


_TFDS_CATALOG = "https://www.tensorflow.org/datasets/catalog/"
DATASETS: dict[str, DatasetSpec] = {
    "synthetic": DatasetSpec(
        synthetic.NAME, "segmentation", SYNTHETIC_CLASSES, "image", "mask", "train", "test",
        "it is generated on first use by cankd_jax.data.prepare_synthetic"),
    # The same scenes seen as detection: each visible object's box, its shape class 1-6 as labels 0-5.
    "synthetic_detection": DatasetSpec(
        synthetic.NAME, "detection", SYNTHETIC_CLASSES - 1, "image", "objects", "train", "test",
        "it is generated on first use by cankd_jax.data.prepare_synthetic",
        label_offset=1, category_ids=tuple(range(1, SYNTHETIC_CLASSES))),
    # The version is named so TFDS reads the prepared files' own metadata: building the `coco` class from code
    # would import TensorFlow.
    "coco": DatasetSpec(
        "coco/2017:1.1.0", "detection", 80, "image", "objects", "train", "validation",
        f"prepare it with `tfds build coco/2017 --file_format=array_record` (see {_TFDS_CATALOG}coco), "
        "then pass --config.data.data_dir",
        image_id_key="image/id", category_ids=COCO_CATEGORY_IDS),
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


def dataset_spec(name: str) -> DatasetSpec:
    """The table entry for `name` (or an alias), with a clear error for unknown names."""
    return DATASETS[dataset_key(name)]


class BadRecord(ValueError):
    """A record the pipeline cannot use as it is (undecodable, of another dtype or channel count, labels outside
    the classes, a label map of another size than its image), named by its data set, split and index."""


class MappedSource:
    """A random-access source of common records over a TFDS source (anything with len and [])

    The repr names only the dataset, split and length, so a saved iterator
    position stays valid when the data directory moves (Grain checks it).

    Detection sources also give `annotations(i)`: a record's objects and image size
    without decoding its pixels where the image is an encoded feature (the size comes
    from the JPEG/PNG header of the undecoded bytes, `header_source`), so indexing a
    whole split reads no pixels.
    """

    def __init__(self, source: Sequence[dict], spec: DatasetSpec, name: str, split: str,
                 header_source: Optional[Sequence[dict]] = None):
        self._source, self._spec, self._name, self._split = source, spec, name, split
        self._header_source = header_source

    def __len__(self) -> int:
        return len(self._source)

    @property
    def _folder(self) -> Optional[str]:
        """The directory of the prepared files (None for a source without one, e.g. TFDS mock data)."""
        return getattr(getattr(self._source, "dataset_info", None), "data_dir", None)

    @property
    def fingerprint(self) -> str:
        """A short hash of the prepared files' names, sizes, first and last bytes ('' where the source has no
        directory of its own): what a cache of this source's annotations is keyed by, so that a data set prepared
        again in the same place is indexed again."""
        return files_fingerprint(self._folder)

    def _named(self, key: int, e: BadRecord) -> BadRecord:
        return BadRecord(f"{self._name}:{self._split} record {key}: {e}")

    def _read(self, key: int) -> dict:
        try:
            return self._source[key]
        except (IndexError, MemoryError):  # a key past the end, or the machine: not the files' fault
            raise
        except Exception as e:  # noqa: BLE001 - a damaged file or image surfaces as anything from deep in TFDS
            fix = (f"delete {self._folder} and it is generated again"
                   if self._spec.tfds_name == synthetic.NAME and self._folder else self._spec.how_to_get)
            raise BadRecord(f"{self._name}:{self._split} record {key} cannot be read ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:300]}); the prepared files may be damaged or incomplete: "
                            f"{fix}") from e

    def __getitem__(self, key: int) -> dict[str, np.ndarray]:
        key = int(key)
        example = self._read(key)
        try:
            return to_record(example, self._spec, key)
        except BadRecord as e:
            raise self._named(key, e) from None

    def annotations(self, key: int) -> dict[str, np.ndarray]:
        """A detection record without `image`: `size` (2,) int32 (h, w) plus the objects of `to_detection_record`."""
        key = int(key)
        if self._header_source is not None:
            try:
                example = self._header_source[key]
                size = encoded_image_size(example[self._spec.image_key])
                objects = detection_objects(example, self._spec, size, key)
            except BadRecord as e:
                raise self._named(key, e) from None
            except Exception as e:  # noqa: BLE001 - anything wrong with the cheap path: decode instead
                log.info("%r: reading image sizes from headers failed (%s); decoding images instead", self, e)
                self._header_source = None
            else:
                return {"size": np.asarray(size, np.int32), **objects}
        record = self[key]
        image = record.pop("image")
        return {"size": np.asarray(image.shape[:2], np.int32), **record}

    def __repr__(self) -> str:
        return f"MappedSource({self._name!r}, split={self._split!r}, len={len(self)})"


def encoded_image_size(data: Any) -> tuple[int, int]:
    """(h, w) of an encoded image (JPEG/PNG bytes) from its header, without decoding the pixels."""
    from PIL import Image  # pillow is a dependency (TFDS decodes the catalogue images with it)

    if isinstance(data, np.ndarray):
        data = data.item()
    with Image.open(io.BytesIO(bytes(data))) as image:
        width, height = image.size
    return int(height), int(width)


def detection_objects(example: dict[str, Any], spec: DatasetSpec, size: tuple[int, int],
                      key: int) -> dict[str, np.ndarray]:
    """The objects of one TFDS detection example, in pixels of its (h, w) = `size` image.

    `boxes (N, 4)` float32 x1y1x2y2 (TFDS stores normalised ymin, xmin, ymax, xmax),
    `labels (N,)` int32 contiguous class ids, `is_crowd (N,)` bool, `area (N,)`
    float32 (the data set's area, COCO's segment area; the box's where it has none),
    `image_id` () int64 (the data set's id, else the record's index).
    """
    objects = example[spec.label_key]
    bbox = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
    labels = np.asarray(objects["label"]).reshape(-1)
    n = min(len(bbox), len(labels))
    crowd = np.asarray(objects["is_crowd"], bool).reshape(-1) if "is_crowd" in objects else np.zeros(n, bool)
    area = np.asarray(objects["area"], np.float32).reshape(-1) if "area" in objects else None
    # Real examples hold equally long sequences; TFDS mock data draws each length on its own.
    n = min(n, len(crowd), n if area is None else len(area))
    h, w = size
    boxes = bbox[:n][:, [1, 0, 3, 2]] * np.array([w, h, w, h], np.float32)
    if area is None:
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    image_id = np.asarray(example[spec.image_id_key]).reshape(()) if spec.image_id_key else key
    labels = labels[:n].astype(np.int64) - spec.label_offset
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        # A data set of another class list (COCO's 91 ids, a custom set): the targets would drop these objects.
        raise BadRecord(f"object labels {_span(labels + spec.label_offset)} are outside the data set's "
                        f"{spec.num_classes} classes ({spec.label_offset}..{spec.num_classes - 1 + spec.label_offset} "
                        "as stored)")
    return {"image_id": np.asarray(image_id, np.int64), "boxes": boxes,
            "labels": labels.astype(np.int32),
            "is_crowd": crowd[:n], "area": np.asarray(area[:n], np.float32)}


def to_record(example: dict[str, Any], spec: DatasetSpec, key: int = 0) -> dict[str, np.ndarray]:
    """One TFDS example -> `{'image': (H, W, 3) uint8, 'label': (H, W) uint8 or () int32}`, or for detection
    `{'image', 'image_id', 'boxes', 'labels', 'is_crowd', 'area'}` (`detection_objects`; `key` is the record's
    index, the image id of a data set without ids). A record that cannot be used as it is raises `BadRecord`."""
    image = np.asarray(example[spec.image_key])
    if image.dtype != np.uint8:  # a 16-bit PNG: a cast would keep its values mod 256
        raise BadRecord(f"the image is {image.dtype}, not 8-bit (uint8); convert the data set's images to 8 bits")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 1):  # grayscale -> RGB
        image = np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=-1)
    elif image.ndim == 3 and image.shape[-1] == 4:  # RGBA: the alpha channel dropped, as OpenCV's colour read does
        image = image[..., :3]
    elif image.ndim != 3 or image.shape[-1] != 3:
        raise BadRecord(f"the image has shape {image.shape}; expected (H, W, 3) RGB, (H, W, 4) RGBA or grayscale")
    if spec.task == "detection":
        return {"image": image, **detection_objects(example, spec, image.shape[:2], key)}
    label = np.asarray(example[spec.label_key])
    if spec.task == "classification":
        if label.size != 1 or not 0 <= int(label.reshape(())) < spec.num_classes:
            raise BadRecord(f"the class label {label.tolist()} is not one of the data set's {spec.num_classes} "
                            f"classes (0..{spec.num_classes - 1})")
        return {"image": image, "label": label.astype(np.int32).reshape(())}
    if label.ndim == 3:  # PNG label images decode as (H, W, C); the class is in the first channel
        label = label[..., 0]
    if not np.issubdtype(label.dtype, np.integer):
        raise BadRecord(f"the label map is {label.dtype}, not integer class indices")
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > IGNORE):
            raise BadRecord(f"label values {_span(label)} do not fit 8-bit class maps (0..{IGNORE})")
        label = label.astype(np.uint8)
    if spec.label_lut is not None:
        label = spec.label_lut[label]
    if label.shape != image.shape[:2]:  # cropping one with the other's coordinates would misplace every label
        raise BadRecord(f"the label map is {'x'.join(map(str, label.shape))} for a "
                        f"{image.shape[0]}x{image.shape[1]} image")
    outside = label[(label >= spec.num_classes) & (label != IGNORE)]
    if outside.size:  # the loss would read past its logits (NaN), the evaluation would drop these pixels
        raise BadRecord(f"label values {_span(outside)} are outside the data set's {spec.num_classes} classes "
                        f"(0..{spec.num_classes - 1}, {IGNORE} ignored) after its label mapping")
    return {"image": image, "label": label}


def _span(values: np.ndarray) -> str:
    lo, hi = int(np.min(values)), int(np.max(values))
    return str(lo) if lo == hi else f"{lo}..{hi}"


def files_fingerprint(directory: Optional[str], *, sample: int = 1 << 16) -> str:
    """12 hex digits over the names and sizes of the files in `directory` and the first and last `sample` bytes
    of each ('' if it is not a local directory): ArrayRecord files are padded to whole blocks, so a set prepared
    again with other records can keep every size. Not the files' times: a copy staged per job without them has the
    same fingerprint, so a shared index cache serves it."""
    if not directory or not os.path.isdir(directory):
        return ""
    h = hashlib.sha1()
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_file():
            size = entry.stat().st_size
            h.update(f"{entry.name}\0{size}\n".encode())
            with open(entry.path, "rb") as f:
                h.update(f.read(sample))
                if size > sample:
                    f.seek(max(sample, size - sample))
                    h.update(f.read(sample))
    return h.hexdigest()[:12]


def open_source(name: str, split: str, data_dir: Optional[str] = None, *,
                synthetic_options: Optional[dict] = None) -> MappedSource:
    """The common-record source for `split` of dataset `name`.

    The synthetic set is generated into `data_dir` if missing (`synthetic_options`:
    image_size, num_train, num_test, seed). A catalogue set must already be
    prepared there in ArrayRecord format; if not, a FileNotFoundError names the fix.
    """
    spec = dataset_spec(name)
    header = None
    if spec.tfds_name == synthetic.NAME:
        builder = synthetic.prepare_synthetic(data_dir, **(synthetic_options or {}))
        try:
            source = builder.as_data_source(split=split)
        except ValueError as e:  # an unknown split, or a slice TFDS cannot read
            raise ValueError(f"dataset {name!r} cannot read split {split!r} ({' '.join(str(e).split())}); it has "
                             f"{', '.join(builder.info.splits)} (data.train_split, data.eval_split)") from e
    else:
        try:
            source = tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # TFDS raises assorted errors (NotImplementedError, AssertionError, ...)
            raise _missing_error(name, spec, data_dir, split) from e
        if spec.task == "detection":
            try:  # the same records with the image left encoded: sizes from headers, for indexing a split
                header = tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False,
                                          decoders={spec.image_key: tfds.decode.SkipDecoding()})
            except Exception:  # noqa: BLE001 - annotations() decodes the images instead
                header = None
    if not len(source):  # TFDS refuses most empty splits itself (`_missing_error`); a source may still be empty
        raise _empty_split(name, split, data_dir or tfds.core.constants.DATA_DIR)
    return MappedSource(source, spec, ALIASES.get(name, name), split, header_source=header)


def _empty_split(name: str, split: str, where: str) -> ValueError:
    return ValueError(f"split {split!r} of dataset {name!r} under {where} holds no examples; choose another "
                      "(data.train_split, data.eval_split) or prepare the data set again")


def _what_is_there(spec: DatasetSpec, where: str) -> str:
    """What a data directory holds of `spec`'s data set where TFDS finds none it can read: other versions, or
    metadata that does not parse ('' when there is nothing of it)."""
    name, _, version = spec.tfds_name.partition(":")
    folder = os.path.join(os.path.expanduser(where), name)
    if not version or not os.path.isdir(folder):
        return ""
    found = sorted(v for v in os.listdir(folder) if os.path.isdir(os.path.join(folder, v)))
    if found and version not in found:
        return f" (it holds version{'s' if len(found) > 1 else ''} {', '.join(found)}; this project reads {version})"
    info = os.path.join(folder, version, "dataset_info.json")
    if version in found and os.path.exists(info):
        try:
            with open(info) as f:
                json.load(f)
        except (OSError, ValueError) as e:
            return f" ({info} cannot be read: {' '.join(str(e).split())[:120]})"
    return ""


def _missing_error(name: str, spec: DatasetSpec, data_dir: Optional[str], split: str) -> Exception:
    where = data_dir or tfds.core.constants.DATA_DIR
    try:
        builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
        prepared = builder.is_prepared()
    except Exception:
        builder, prepared = None, False
    if not prepared:
        return FileNotFoundError(f"dataset {name!r} not found under {where}{_what_is_there(spec, where)}; "
                                 f"{spec.how_to_get}")
    try:  # `in` does not resolve a slice ('validation[:500]'); indexing does
        info = builder.info.splits[split]
    except (KeyError, ValueError):
        return ValueError(f"dataset {name!r} has no split {split!r}; it has {', '.join(builder.info.splits)}")
    if not info.num_examples:
        return _empty_split(name, split, where)
    return ValueError(f"dataset {name!r} under {where} is not in ArrayRecord format (random access needs it); "
                      f"rebuild it with file_format=array_record")
