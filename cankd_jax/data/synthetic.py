"""`cankd_synthetic_scenes`: a TFDS dataset generated locally, no download (see `scenes.py` for the content).

    builder = prepare_synthetic("/tmp/tfds", image_size=64, num_train=2000, num_test=500, seed=0)
    train = builder.as_data_source(split="train")   # random access, no TensorFlow needed

Features of one example:
  image:   (S, S, 3) uint8 RGB
  mask:    (S, S) uint8 semantic labels, 0 = background, 1-6 = CLASS_NAMES[1:]; no 255 (ignore) pixels
  objects: Sequence of {bbox: (4,) float32 normalised (ymin, xmin, ymax, xmax) of the visible
           pixels, label: int64 class id as in the mask}, in painting order; fully hidden objects omitted

Images and masks are stored as zlib-compressed tensors (TFDS image encoding needs
TensorFlow). Each configuration (size, counts, seed) is its own TFDS config, so
several can live side by side in one data directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
from collections.abc import Iterator
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from cankd_jax.data.scenes import CLASS_NAMES, generate_scenes

NAME = "cankd_synthetic_scenes"
SPLIT_STREAMS = {"train": 0, "test": 1}  # independent random streams per split


@dataclasses.dataclass(eq=False)
class SyntheticScenesConfig(tfds.core.BuilderConfig):
    """Size (S x S pixels), split sizes and seed of one variant of the data set."""

    image_size: int = 64
    num_train: int = 2000
    num_test: int = 500
    seed: int = 0


def synthetic_config(image_size: int = 64, num_train: int = 2000, num_test: int = 500,
                     seed: int = 0) -> SyntheticScenesConfig:
    """The config for these parameters; its name encodes them (one prepared copy per combination)."""
    for key, value, low in (("image_size", image_size, 8), ("num_train", num_train, 1), ("num_test", num_test, 1)):
        if int(value) < low:
            raise ValueError(f"synthetic {key} must be >= {low}, got {value}")
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"synthetic seed must be in [0, 2**32), got {seed}")
    name = f"s{image_size}_train{num_train}_test{num_test}_seed{seed}"
    return SyntheticScenesConfig(name=name, image_size=int(image_size), num_train=int(num_train),
                                 num_test=int(num_test), seed=int(seed))


class _ThisFile:
    """Class attribute descriptor: the path of this module.

    TFDS derives `code_path` (where it looks for checksums next to the code)
    through `importlib_resources` for builders inside packages, a backport we
    do not install; the module file is all it needs.
    """

    def __get__(self, obj, objtype=None) -> epath.Path:
        return epath.Path(__file__)


class CankdSyntheticScenes(tfds.core.GeneratorBasedBuilder):
    """Synthetic scene parsing: textured backgrounds, six shape classes, occlusion, distractors."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [synthetic_config()]
    code_path = _ThisFile()

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8, encoding="zlib"),
                "mask": tfds.features.Tensor(shape=(size, size), dtype=np.uint8, encoding="zlib"),
                "objects": tfds.features.Sequence({
                    "bbox": tfds.features.BBoxFeature(),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                }),
            }),
            supervised_keys=("image", "mask"),
            disable_shuffling=True,  # record i of a split is generated scene i
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        counts = {"train": cfg.num_train, "test": cfg.num_test}
        return {split: self._generate_examples(split, counts[split]) for split in SPLIT_STREAMS}

    def _generate_examples(self, split: str, num: int) -> Iterator[tuple[int, dict]]:
        cfg = self.builder_config
        scenes = generate_scenes(num, cfg.image_size, cfg.seed, stream=SPLIT_STREAMS[split])
        for i in range(num):
            keep = scenes["present"][i]
            yield i, {"image": scenes["image"][i], "mask": scenes["mask"][i],
                      "objects": {"bbox": scenes["boxes"][i][keep], "label": scenes["labels"][i][keep]}}


def prepare_synthetic(data_dir: Optional[str] = None, *, image_size: int = 64, num_train: int = 2000,
                      num_test: int = 500, seed: int = 0) -> CankdSyntheticScenes:
    """The builder for this configuration, generated into `data_dir` first if it is not there yet.

    `data_dir` defaults to TFDS's (`$TFDS_DATA_DIR` or ~/tensorflow_datasets).
    Several processes may call this at once on one machine: a file lock lets
    the first generate and the others reuse its result.
    """
    data_dir = os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)
    config = synthetic_config(image_size, num_train, num_test, seed)
    if config.name in {c.name for c in CankdSyntheticScenes.BUILDER_CONFIGS}:
        config = config.name  # TFDS refuses a new config object that shadows a listed one
    builder = CankdSyntheticScenes(data_dir=data_dir, config=config, file_format="array_record")
    if not builder.is_prepared():
        with _generation_lock(data_dir):
            builder = CankdSyntheticScenes(data_dir=data_dir, config=config, file_format="array_record")
            if not builder.is_prepared():  # another process may have finished while we waited
                builder.download_and_prepare()
    return builder


@contextlib.contextmanager
def _generation_lock(data_dir: str):
    """`data_dir`'s lock for generating the set, the directory created first; one that cannot be written is a
    `ValueError` naming it."""
    try:
        os.makedirs(data_dir, exist_ok=True)
        f = open(os.path.join(data_dir, f".{NAME}.lock"), "w")
    except OSError as e:
        raise ValueError(f"the synthetic data set cannot be generated into data.data_dir {data_dir!r}: "
                         f"{e.strerror or e}; give a directory this process can write") from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
