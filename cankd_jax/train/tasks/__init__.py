"""Tasks: what the student is trained for and how it is evaluated, one module per task.

A task is chosen by `config.task.name` from `TASKS` and gives the train step its
loss and the evaluator its per-batch outputs and their summary (`base.Task`):

  segmentation.py    mmseg's pixel cross-entropy (label 255 ignored), mIoU
  classification.py  softmax cross-entropy, top-1 accuracy
  detection.py       RetinaNet / FCOS: mmdet's targets and losses (`cankd_jax.detection`), jitted
                     post-processing, pycocotools' COCOeval

A new task is a new module here and an entry in `TASKS`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cankd_jax.config_arg import check_number
from cankd_jax.train.tasks.base import Task
from cankd_jax.train.tasks.classification import ClassificationTask, classification_cross_entropy
from cankd_jax.train.tasks.detection import COCO_AREAS, COCO_METRICS, DETECTOR_NMS, DetectionTask, coco_eval
from cankd_jax.train.tasks.segmentation import (
    IGNORE_LABEL, SegmentationTask, confusion_matrix, mean_iou, segmentation_cross_entropy,
)

__all__ = [
    "COCO_AREAS", "COCO_METRICS", "ClassificationTask", "DETECTOR_NMS", "DetectionTask", "IGNORE_LABEL",
    "SegmentationTask", "TASKS", "Task", "classification_cross_entropy", "coco_eval", "confusion_matrix",
    "make_task", "mean_iou", "segmentation_cross_entropy",
]

TASKS: dict[str, Any] = {"segmentation": SegmentationTask, "classification": ClassificationTask,
                         "detection": DetectionTask}


def make_task(cfg: Any) -> Task:
    """The task of a `config.task` block: `name` (a key of `TASKS`) and the task's fields."""
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    name = cfg.pop("name", None)
    if name not in TASKS:
        raise ValueError(f"unknown task.name {name!r}; choose one of {', '.join(sorted(TASKS))}")
    fields = {f.name for f in dataclasses.fields(TASKS[name]) if not f.metadata.get("internal")} - {"metric"}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise ValueError(f"unknown task key(s) {', '.join(unknown)} for task {name!r}; known: {', '.join(sorted(fields))}")
    for key in sorted(k for k in cfg if k.endswith("_weight")):  # a negative weight maximises its loss
        value = cfg[key]
        if value is None:  # unset (class_weight: every class alike)
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:  # class_weight: one per class
            rule = "a finite number >= 0" + (f" (all of {value!r})" if v is not value else "")
            check_number(v, f"task.{key}", lambda v: v >= 0, rule)
    return TASKS[name](**cfg)
