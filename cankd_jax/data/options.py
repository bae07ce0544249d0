"""The keys a config's `data` section takes, per data set, and their defaults; `data_section` writes a whole one.

Pure data and no heavy imports (TFDS, Grain): config files call `data_section` while `train.py` parses its flags,
and `dataset.py` reads the same tables when it opens the data.

A config's data section holds every key its data set takes, so each can be overridden on the command line
(`--config.data.train_split=train[:10%]`): ml_collections refuses an override of a key the section lacks, and of one
whose value is None, so a size left unset is written `()` ("none", as `make_data` reads it).
"""

from __future__ import annotations

from typing import Any

ALIASES = {"ade20k": "scene_parse150", "imagenet": "imagenet2012", "coco/2017": "coco"}
# Which task each data set serves (`sources.DATASETS` holds the rest of each set's description; a test holds the
# two tables to the same names and tasks).
TASKS = {"synthetic": "segmentation", "synthetic_detection": "detection", "coco": "detection",
         "cityscapes": "segmentation", "scene_parse150": "segmentation", "imagenet2012": "classification",
         "cifar10": "classification"}

COMMON = dict(name=None, data_dir="", train_split="", eval_split="", eval_batch_size=8, workers=0, flip_prob=0.5,
              crop_size=None)
BY_TASK = {
    "segmentation": dict(scale=None, ratio_range=(0.5, 2.0), cat_max_ratio=0.75, photometric=True, eval_scale=None,
                         eval_keep_ratio=True, eval_pad_size=None),
    "classification": dict(crop_scale=(0.08, 1.0), eval_resize=None),
    "detection": dict(scale=(1333, 800), norm="pytorch", max_boxes=0, filter_empty=True, min_size=0, index_cache="",
                      augment="resize_flip"),
}
SYNTHETIC = dict(image_size=64, num_train=2000, num_test=500, synthetic_seed=0)
# The keys whose value is a pair of numbers ((h, w) or (w, h) as each names); None or () for "not set".
PAIRS = ("crop_size", "scale", "eval_scale", "eval_pad_size", "ratio_range", "crop_scale")

# mmseg's / the usual settings per dataset; a config overrides any of them.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "synthetic": {},  # crop and scale default to the image size
    "synthetic_detection": dict(scale=None),  # the image size
    "cityscapes": dict(scale=(2048, 1024), crop_size=(512, 1024), eval_scale=(2048, 1024)),
    # Sizes vary, so evaluation resizes to a fixed 512 x 512 (mmseg tests keep-ratio at (2048, 512)).
    "scene_parse150": dict(scale=(2048, 512), crop_size=(512, 512), eval_scale=(512, 512), eval_keep_ratio=False),
    "imagenet2012": dict(crop_size=(224, 224), eval_resize=256),
    "cifar10": dict(crop_size=(32, 32), crop_scale=(0.5, 1.0), eval_resize=32),
    # mmdet's coco_detection: 1333 x 800, filter_cfg=dict(filter_empty_gt=True, min_size=32).
    "coco": dict(scale=(1333, 800), min_size=32),
}


def dataset_key(name: str) -> str:
    """The table key of data set `name` (an alias resolved), or a `ValueError` listing the known names."""
    key = ALIASES.get(name, name)
    if key not in TASKS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(sorted([*TASKS, *ALIASES]))}")
    return key


def allowed_keys(key: str) -> dict[str, Any]:
    """Every key data set `key` (a table key) takes, at the value it has when a config leaves it out."""
    keys = {**COMMON, **BY_TASK[TASKS[key]]}
    if key in ("synthetic", "synthetic_detection"):
        keys.update(SYNTHETIC)
    keys.update(DATASET_DEFAULTS[key])
    return keys


def data_section(name: str, **values: Any) -> dict[str, Any]:
    """A config's whole `data` section for data set `name`: every key it takes, `values` over the defaults.

    Unset pairs (`PAIRS`) are `()`, so the command line can still set them. Raises `ValueError` naming a key that
    `name` does not take.
    """
    key = dataset_key(name)
    section = allowed_keys(key)
    unknown = sorted(set(values) - set(section))
    if unknown:
        raise ValueError(f"unknown data config key(s) {unknown} for dataset {key!r}; "
                         f"known: {', '.join(sorted(section))}")
    section.update(values, name=name)
    return {k: (() if v is None and k in PAIRS else v) for k, v in section.items()}
