"""Detection losses and the RetinaNet / FCOS loss assembly, as mmdet 3.x computes them.

Element losses are reduced as mmdet's `weight_reduce_loss`: multiplied by the
element weights, then either averaged (no `avg_factor`) or summed and divided by
`avg_factor + eps`, eps = float32 machine epsilon (mmdet's guard against a zero
factor). All math in float32; every function is jit/vmap/grad-friendly.

The head assemblies take the whole batch at once (levels concatenated in the
prior order of `anchors.py`), so every normaliser is over the global batch, which
is what mmdet's single-device numbers are (there is no cross-device `reduce_mean`
to do: under `jax.jit` with a sharded batch the sums are already global).
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from cankd_jax.detection.anchors import FCOSPriors
from cankd_jax.detection.assigners import FCOSTargets, RetinaNetTargets
from cankd_jax.detection.boxes import IOU_EPS, DistancePointCoder, aligned_giou

Array = jax.Array

FLT_EPS = float(np.finfo(np.float32).eps)  # mmdet's weight_reduce_loss guard


def weight_reduce(loss: Array, weight: Optional[Array] = None, avg_factor=None) -> Array:
    """mmdet's `weight_reduce_loss(reduction='mean')`: `sum(loss * w) / (avg_factor + eps)`, or the mean."""
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return jnp.mean(loss)
    return jnp.sum(loss) / (jnp.asarray(avg_factor, jnp.float32) + FLT_EPS)


def _expand_weight(weight: Optional[Array], loss: Array) -> Optional[Array]:
    # mmdet views a per-row weight (N,) as (N, 1) against an (N, C) loss.
    if weight is None:
        return None
    weight = jnp.asarray(weight, jnp.float32)
    if weight.shape != loss.shape:
        chex.assert_shape(weight, loss.shape[:1])
        weight = weight.reshape(weight.shape + (1,) * (loss.ndim - 1))
    return weight


def bce_with_logits(logits: Array, targets: Array) -> Array:
    """Elementwise `-t log(sigmoid(x)) - (1 - t) log(1 - sigmoid(x))`, stable for any x."""
    x = jnp.asarray(logits, jnp.float32)
    t = jnp.asarray(targets, jnp.float32)
    return jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))


def sigmoid_focal_loss(
    logits: Array,
    labels: Array,
    weight: Optional[Array] = None,
    *,
    gamma: float = 2.0,
    alpha: float = 0.25,
    avg_factor=None,
) -> Array:
    """Sigmoid focal loss over `(N, C)` logits, mmcv/mmdet `FocalLoss(use_sigmoid=True)`.

    labels `(N,)` int: a class in [0, C) is that class's positive; any other value
    (mmdet's background `C`) makes every class negative. weight `(N,)` (per row) or
    `(N, C)`. Per element, with p = sigmoid(x) and t the one-hot target:
    `BCE(x, t) * (alpha t + (1 - alpha)(1 - t)) * (p (1 - t) + (1 - p) t) ** gamma`,
    which is mmcv's CUDA `sigmoid_focal_loss` (written there as
    `-alpha (1-p)^gamma log p` / `-(1-alpha) p^gamma log(1-p)`) and mmdet's CPU
    `py_sigmoid_focal_loss`, up to float32 rounding. Returns a scalar.
    """
    logits = jnp.asarray(logits, jnp.float32)
    chex.assert_rank(logits, 2)
    chex.assert_shape(labels, logits.shape[:1])
    t = jax.nn.one_hot(labels, logits.shape[1], dtype=jnp.float32)  # out-of-range labels: all zeros
    p = jax.nn.sigmoid(logits)
    pt = (1.0 - p) * t + p * (1.0 - t)
    focal_weight = (alpha * t + (1.0 - alpha) * (1.0 - t)) * jnp.power(pt, gamma)
    loss = bce_with_logits(logits, t) * focal_weight
    return weight_reduce(loss, _expand_weight(weight, loss), avg_factor)


def l1_loss(pred: Array, target: Array, weight: Optional[Array] = None, *, avg_factor=None) -> Array:
    """mmdet `L1Loss`: `|pred - target|` weighted and reduced; `(N, 4)` inputs (any equal shapes)."""
    pred, target = jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32)
    chex.assert_equal_shape([pred, target])
    loss = jnp.abs(pred - target)
    return weight_reduce(loss, _expand_weight(weight, loss), avg_factor)


def smooth_l1_loss(pred: Array, target: Array, weight: Optional[Array] = None, *, beta: float = 1.0,
                   avg_factor=None) -> Array:
    """mmdet `SmoothL1Loss`: `0.5 d^2 / beta` where `d = |pred - target| < beta`, else `d - 0.5 beta`; equal
    shapes, weight of the loss's shape or per row."""
    if beta <= 0:
        raise ValueError(f"smooth_l1_loss: beta must be positive, got {beta}")
    pred, target = jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32)
    chex.assert_equal_shape([pred, target])
    d = jnp.abs(pred - target)
    loss = jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)
    return weight_reduce(loss, _expand_weight(weight, loss), avg_factor)


def giou_loss(pred: Array, target: Array, weight: Optional[Array] = None, *, eps: float = IOU_EPS,
              avg_factor=None) -> Array:
    """mmdet `GIoULoss(eps=1e-6)`: `1 - GIoU(pred, target)` per box; `(N, 4)` boxes, weight `(N,)`.

    (mmdet returns 0 early when no weight is positive; the weighted sum below is that 0.)
    """
    pred, target = jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32)
    chex.assert_equal_shape([pred, target])
    chex.assert_axis_dimension(pred, -1, 4)
    loss = 1.0 - aligned_giou(pred, target, eps)
    return weight_reduce(loss, _expand_weight(weight, loss), avg_factor)


def bce_loss(logits: Array, targets: Array, weight: Optional[Array] = None, *, avg_factor=None) -> Array:
    """mmdet `CrossEntropyLoss(use_sigmoid=True)` with soft targets in [0, 1] of the same shape."""
    logits, targets = jnp.asarray(logits, jnp.float32), jnp.asarray(targets, jnp.float32)
    chex.assert_equal_shape([logits, targets])
    loss = bce_with_logits(logits, targets)
    return weight_reduce(loss, _expand_weight(weight, loss), avg_factor)


def retinanet_avg_factor(num_pos: Array) -> Array:
    """`(B,)` positives per image -> `()` mmdet's RetinaNet normaliser.

    mmdet 3.x: `avg_factor = sum over images of SamplingResult.avg_factor`, and with the
    `PseudoSampler` that is `num_pos` clamped to at least 1 per image (`max(numel, 1)`),
    so an image without positives still counts 1.
    """
    chex.assert_rank(num_pos, 1)
    return jnp.sum(jnp.maximum(num_pos, 1)).astype(jnp.float32)


def retinanet_loss(cls_logits: Array, bbox_pred: Array, targets: RetinaNetTargets, *,
                   gamma: float = 2.0, alpha: float = 0.25) -> dict[str, Array]:
    """RetinaNet's `loss_cls` (focal) and `loss_bbox` (L1 on deltas), both loss_weight 1.

    cls_logits `(B, A, C)`, bbox_pred `(B, A, 4)` deltas, targets: `RetinaNetTargets`
    with a leading batch axis (vmap `retinanet_targets`). Both losses are divided by
    `retinanet_avg_factor(targets.num_pos)`; ignored anchors have zero weights.
    """
    chex.assert_rank([cls_logits, bbox_pred], 3)
    b, a, c = cls_logits.shape
    chex.assert_shape(bbox_pred, (b, a, 4))
    chex.assert_shape(targets.labels, (b, a))
    chex.assert_shape(targets.bbox_targets, (b, a, 4))
    avg = retinanet_avg_factor(targets.num_pos)
    loss_cls = sigmoid_focal_loss(cls_logits.reshape(b * a, c), targets.labels.reshape(-1),
                                  targets.label_weights.reshape(-1), gamma=gamma, alpha=alpha, avg_factor=avg)
    loss_bbox = l1_loss(bbox_pred.reshape(-1, 4), targets.bbox_targets.reshape(-1, 4),
                        targets.bbox_weights.reshape(-1, 4), avg_factor=avg)
    return {"loss_cls": loss_cls, "loss_bbox": loss_bbox}


def fcos_loss(cls_logits: Array, bbox_pred: Array, centerness: Array, priors: FCOSPriors, targets: FCOSTargets, *,
              gamma: float = 2.0, alpha: float = 0.25) -> dict[str, Array]:
    """FCOS's `loss_cls`, `loss_bbox` (GIoU) and `loss_centerness`, as mmdet 3.x `FCOSHead.loss_by_feat`.

    cls_logits `(B, P, C)`; bbox_pred `(B, P, 4)` distances (l, t, r, b) in the same
    units as `targets.bbox_targets` (strides with `norm_on_bbox`: the head's ReLU'd
    training output); centerness `(B, P)` logits; targets: `FCOSTargets` with a
    leading batch axis (vmap `fcos_targets`).

    - num_pos = max(positives in the batch, 1); focal loss over every point / num_pos.
    - GIoU between the boxes decoded from the point (pixels) and the predicted vs the
      target distances, positives only, weighted by the centerness targets and divided
      by max(sum of positives' centerness targets, 1e-6). (mmdet decodes stride-unit
      distances around pixel points; GIoU is invariant to that shared translation.)
    - centerness BCE on positives / num_pos.
    Every normaliser is a constant (targets carry no gradient).
    """
    chex.assert_rank([cls_logits, bbox_pred, centerness], [3, 3, 2])
    b, p, c = cls_logits.shape
    chex.assert_shape(bbox_pred, (b, p, 4))
    chex.assert_shape(centerness, (b, p))
    chex.assert_shape(targets.labels, (b, p))
    pos = targets.pos.astype(jnp.float32)
    num_pos = jnp.maximum(jnp.sum(targets.num_pos).astype(jnp.float32), 1.0)
    loss_cls = sigmoid_focal_loss(cls_logits.reshape(b * p, c), targets.labels.reshape(-1),
                                  gamma=gamma, alpha=alpha, avg_factor=num_pos)

    ctr_targets = targets.centerness_targets * pos
    denorm = jnp.maximum(jnp.sum(ctr_targets), 1e-6)
    coder = DistancePointCoder()
    points = jnp.broadcast_to(jnp.asarray(priors.points, jnp.float32), (b, p, 2))
    # Negatives' target distances are arbitrary; swapping in the prediction keeps their
    # (zero-weighted) GIoU finite whatever the targets hold.
    tgt = jnp.where(targets.pos[..., None], targets.bbox_targets, jax.lax.stop_gradient(bbox_pred))
    loss_bbox = giou_loss(coder.decode(points, bbox_pred).reshape(-1, 4), coder.decode(points, tgt).reshape(-1, 4),
                          ctr_targets.reshape(-1), avg_factor=denorm)
    loss_ctr = bce_loss(centerness.reshape(-1), ctr_targets.reshape(-1), pos.reshape(-1), avg_factor=num_pos)
    return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_centerness": loss_ctr}
