"""Input pipeline: TFDS sources (plus a built-in synthetic set), mmseg-style augmentation, Grain loaders.

A trainer needs `make_data(config.data, task=...)` (see `dataset.py`); the pieces
are public for other uses:
  sources.py         dataset table, `open_source` -> {'image', 'label'} records
  synthetic.py       the `cankd_synthetic_scenes` TFDS builder, `prepare_synthetic`
  scenes.py          its numpy scene generator
  segmentation.py    mmseg training augmentation / test preprocessing
  classification.py  random-resized crop / centre crop
  pipeline.py        Grain train iterator (resumable) and padded eval iterator
  image_ops.py       numpy resizing, HSV, normalisation
"""

from cankd_jax.data.dataset import DATASET_DEFAULTS, Data, make_data
from cankd_jax.data.pipeline import (
                                     TrainIterator,
                                     eval_batch_count,
                                     make_eval_iterator,
                                     make_train_iterator,
                                     per_process_batch_size,
)
from cankd_jax.data.sources import DATASETS, open_source
from cankd_jax.data.synthetic import prepare_synthetic

__all__ = [
    "DATASETS", "DATASET_DEFAULTS", "Data", "TrainIterator", "eval_batch_count", "make_data", "make_eval_iterator",
    "make_train_iterator", "open_source", "per_process_batch_size", "prepare_synthetic",
]
