"""Input pipeline: TFDS sources (plus a built-in synthetic set), mmseg-style augmentation, Grain loaders.

A trainer needs `make_data(config.data, task=...)` (see `dataset.py`); the pieces
are public for other uses:
  options.py          the keys of a config's data section and their defaults, `data_section`
  sources.py          dataset table, `open_source` -> {'image', 'label'} records
  synthetic.py        the `cankd_synthetic_scenes` TFDS builder, `prepare_synthetic`
  scenes.py           its numpy scene generator
  segmentation.py     mmseg training augmentation / test preprocessing
  classification.py   random-resized crop / centre crop
  detection.py        mmdet training augmentation / test preprocessing, the padded buckets
  detection_index.py  a detection split's per-record sizes and objects (cached), the trained records
  pipeline.py         Grain train iterator (resumable) and padded eval iterators
  image_ops.py        numpy resizing, HSV, normalisation

The names below load their modules on first use, so importing one NumPy-only
module (`cankd_jax.data.detection` for the batch layout, say) does not import
Grain or TFDS: benchmarks and memory estimates run where those are not installed.
"""

import importlib

_EXPORTS = {
    "DATASET_DEFAULTS": "options", "data_section": "options",
    "Data": "dataset", "make_data": "dataset", "train_example_layouts": "dataset",
    "TrainIterator": "pipeline", "eval_batch_count": "pipeline", "make_eval_iterator": "pipeline",
    "make_train_iterator": "pipeline", "per_process_batch_size": "pipeline",
    "DATASETS": "sources", "open_source": "sources",
    "prepare_synthetic": "synthetic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
