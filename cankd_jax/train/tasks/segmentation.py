"""Semantic segmentation: mmseg's pixel cross-entropy (label 255 ignored, optional class weights, an auxiliary
head), evaluated by mIoU from summed confusion counts."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cankd_jax.train.tasks.base import _SummedCounts

IGNORE_LABEL = 255


def segmentation_cross_entropy(logits: jax.Array, labels: jax.Array, *, avg_non_ignore: bool = False,
                               class_weight: Optional[Sequence[float]] = None) -> jax.Array:
    """Pixel-wise softmax cross-entropy, pixels labelled 255 ignored.

    `logits (B, H, W, K)`, `labels (B, H, W)` int. mmseg's default
    (`avg_non_ignore=False`) averages over every pixel, ignored ones counting
    zero; `avg_non_ignore=True` averages over the labelled pixels only.
    `class_weight` (K,) scales each pixel's loss by the weight of its label and,
    as in mmseg (unlike PyTorch's weighted 'mean'), does not renormalise.
    """
    if logits.shape[:3] != labels.shape:
        raise ValueError(f"segmentation logits {logits.shape} and labels {labels.shape} differ in (B, H, W)")
    if class_weight is not None and len(class_weight) != logits.shape[-1]:
        raise ValueError(f"class_weight has {len(class_weight)} entries for {logits.shape[-1]} classes")
    valid = labels != IGNORE_LABEL
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    if class_weight is not None:
        nll = nll * jnp.asarray(class_weight, jnp.float32)[safe]
    nll = jnp.where(valid, nll, 0.0)
    denom = jnp.maximum(jnp.sum(valid), 1) if avg_non_ignore else nll.size
    return jnp.sum(nll) / denom


def confusion_matrix(preds: jax.Array, labels: jax.Array, valid: jax.Array, num_classes: int) -> jax.Array:
    """`(K, K)` int32 counts [true, predicted] over pixels where `valid` and the label is not 255."""
    keep = valid & (labels != IGNORE_LABEL) & (labels < num_classes)
    idx = jnp.where(keep, labels.astype(jnp.int32) * num_classes + preds.astype(jnp.int32), 0)
    counts = jnp.bincount(idx.reshape(-1), weights=keep.reshape(-1).astype(jnp.int32), length=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def mean_iou(confusion: np.ndarray) -> tuple[float, np.ndarray]:
    """mIoU over classes present in the labels or predictions (mmseg ignores classes with no union)."""
    confusion = np.asarray(confusion, np.float64)
    inter = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou)) if np.any(union > 0) else 0.0, iou


@dataclasses.dataclass(frozen=True)
class SegmentationTask(_SummedCounts):
    """Pixel cross-entropy on `logits` (+ `aux_weight` x on `aux_logits`), evaluated by mIoU."""

    num_classes: int
    aux_weight: float = 0.4
    avg_non_ignore: bool = False
    class_weight: Optional[tuple[float, ...]] = None  # mmseg's CrossEntropyLoss(class_weight=...), both heads
    metric: str = "mIoU"

    def __post_init__(self):
        if self.class_weight is not None:
            if len(self.class_weight) != self.num_classes:
                raise ValueError(f"task.class_weight has {len(self.class_weight)} entries for "
                                 f"task.num_classes={self.num_classes}")
            object.__setattr__(self, "class_weight", tuple(float(w) for w in self.class_weight))

    def loss(self, outputs: Mapping[str, jax.Array], labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        ce = functools.partial(segmentation_cross_entropy, avg_non_ignore=self.avg_non_ignore,
                               class_weight=self.class_weight)
        terms = {"seg": ce(outputs["logits"], labels)}
        if self.aux_weight and "aux_logits" in outputs:
            terms["aux"] = self.aux_weight * ce(outputs["aux_logits"], labels)
        return sum(terms.values()), terms

    def eval_outputs(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, Any]) -> jax.Array:
        """`(K, K)` int32 confusion counts [true, predicted] of the batch's real examples."""
        preds = jnp.argmax(outputs["logits"], axis=-1)
        return confusion_matrix(preds, batch["label"], batch["valid"][:, None, None], self.num_classes)

    def summarize(self, counts: np.ndarray) -> dict[str, float]:
        miou, _ = mean_iou(counts)
        total = counts.sum()
        return {"mIoU": miou, "pixel_acc": float(np.trace(counts) / total) if total else 0.0}
