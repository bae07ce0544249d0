"""TFDS `coco/2017` as `tfds.testing.mock_data` serves it, without TensorFlow.

TFDS builds the `coco` class from code only with TensorFlow installed (its features name `tf.int64`), so the
project names the version (`coco/2017:1.1.0`) and TFDS reads the prepared files' metadata instead. Here that
metadata is written by hand (the features of TFDS's coco builder, the two splits) into a temporary data dir that
`mock_data(policy=USE_FILES)` serves random examples for.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import dataset_info, file_adapters, splits


def write_coco_metadata(data_dir: str, num_examples: int) -> str:
    """`dataset_info.json` and `features.json` of coco/2017 1.1.0 under `data_dir`; returns their directory."""
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "image/filename": tfds.features.Text(),
        "image/id": np.int64,
        "objects": tfds.features.Sequence({
            "id": np.int64, "area": np.int64, "bbox": tfds.features.BBoxFeature(),
            "label": tfds.features.ClassLabel(num_classes=80), "is_crowd": np.bool_,
        }),
    })
    directory = os.path.join(data_dir, "coco", "2017", "1.1.0")
    os.makedirs(directory, exist_ok=True)
    identity = dataset_info.DatasetIdentity(name="coco", version="1.1.0", config_name="2017", data_dir=directory,
                                            module_name="tensorflow_datasets.object_detection.coco")
    info = tfds.core.DatasetInfo(builder=identity, features=features)
    info.set_file_format(file_adapters.FileFormat.ARRAY_RECORD)
    info.set_splits(splits.SplitDict([splits.SplitInfo(name=s, shard_lengths=[num_examples], num_bytes=0,
                                                       filename_template=None) for s in ("train", "validation")]))
    info.write_to_directory(directory)
    return directory


@contextlib.contextmanager
def mock_coco(data_dir: str, num_examples: int):
    """Random coco/2017 examples (random sizes, unequal object lists, random crowd flags) from `tfds.data_source`."""
    write_coco_metadata(data_dir, num_examples)
    with tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=data_dir):
        yield
