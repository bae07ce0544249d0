"""Task losses and evaluation metrics: segmentation (ignore label 255) and classification."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

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


def classification_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy. `logits (B, K)`, `labels (B,)` int."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels.astype(jnp.int32)[:, None], axis=-1))


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
