"""TFDS `coco/2017` as `tfds.testing.mock_data` serves it, without TensorFlow.

TFDS builds the `coco` class from code only with TensorFlow installed (its features name `tf.int64`), so the
project names the version (`coco/2017:1.1.0`) and TFDS reads the prepared files' metadata instead. Here that
metadata is written by hand (the features of TFDS's coco builder, the two splits) into a temporary data dir that
`mock_data(policy=USE_FILES)` serves random examples for. `write_coco` also writes the records, with TFDS's own
serializer, as a prepared set: chosen examples, damaged ones included.
"""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core import dataset_info, file_adapters, splits


def coco_features(num_classes: int = 80) -> tfds.features.FeaturesDict:
    """The features of TFDS's coco/2017 builder (its objects' ClassLabel of `num_classes`)."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "image/filename": tfds.features.Text(),
        "image/id": np.int64,
        "objects": tfds.features.Sequence({
            "id": np.int64, "area": np.int64, "bbox": tfds.features.BBoxFeature(),
            "label": tfds.features.ClassLabel(num_classes=num_classes), "is_crowd": np.bool_,
        }),
    })


def write_coco_metadata(data_dir: str, num_examples: int | dict[str, int], num_classes: int = 80) -> str:
    """`dataset_info.json` and `features.json` of coco/2017 1.1.0 under `data_dir` (`num_examples` per split, or
    {split: count}); returns their directory."""
    features = coco_features(num_classes)
    lengths = num_examples if isinstance(num_examples, dict) else {"train": num_examples, "validation": num_examples}
    directory = os.path.join(data_dir, "coco", "2017", "1.1.0")
    os.makedirs(directory, exist_ok=True)
    identity = dataset_info.DatasetIdentity(name="coco", version="1.1.0", config_name="2017", data_dir=directory,
                                            module_name="tensorflow_datasets.object_detection.coco")
    info = tfds.core.DatasetInfo(builder=identity, features=features)
    info.set_file_format(file_adapters.FileFormat.ARRAY_RECORD)
    info.set_splits(splits.SplitDict([splits.SplitInfo(name=s, shard_lengths=[n], num_bytes=0,
                                                       filename_template=None) for s, n in lengths.items()]))
    info.write_to_directory(directory)
    return directory


def encode_jpeg(image: np.ndarray) -> bytes:
    """`(H, W, 3)` or `(H, W, 4)` uint8 -> JPEG (PNG for 4 channels) bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG" if image.shape[-1] == 4 else "JPEG", quality=95)
    return buffer.getvalue()


def coco_example(index: int, size: tuple[int, int] = (48, 64), objects=((0.1, 0.1, 0.6, 0.7, 3),),
                 image: bytes | None = None, crowd: bool = False) -> dict:
    """One coco/2017 example: a random `size` (h, w) JPEG unless `image` (encoded bytes) is given; `objects` as
    (ymin, xmin, ymax, xmax, label) with normalised coordinates; image id 1000 + index."""
    if image is None:
        pixels = np.random.default_rng(index).integers(0, 256, (*size, 3), dtype=np.uint8)
        image = encode_jpeg(pixels)
    return {"image": image, "image/filename": f"{index}.jpg", "image/id": 1000 + index,
            "objects": {"id": [10 * index + k for k in range(len(objects))], "area": [100] * len(objects),
                        "bbox": [np.asarray(o[:4], np.float32) for o in objects], "label": [o[4] for o in objects],
                        "is_crowd": [crowd] * len(objects)}}


def write_coco(data_dir: str, examples: dict[str, list[dict]], num_classes: int = 80) -> str:
    """A prepared coco/2017 1.1.0 in ArrayRecord format under `data_dir`, holding `examples` per split (what
    `tfds build coco/2017 --file_format=array_record` leaves, with these records); returns its directory."""
    from array_record.python import array_record_module
    from tensorflow_datasets.core import example_serializer

    directory = write_coco_metadata(data_dir, {s: len(e) for s, e in examples.items()}, num_classes)
    features = coco_features(num_classes)
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    for split, records in examples.items():
        writer = array_record_module.ArrayRecordWriter(
            os.path.join(directory, f"coco-{split}.array_record-00000-of-00001"), "group_size:1")
        for record in records:
            writer.write(serializer.serialize_example(features.encode_example(record)))
        writer.close()
    return directory


@contextlib.contextmanager
def mock_coco(data_dir: str, num_examples: int):
    """Random coco/2017 examples (random sizes, unequal object lists, random crowd flags) from `tfds.data_source`."""
    write_coco_metadata(data_dir, num_examples)
    with tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=data_dir):
        yield
