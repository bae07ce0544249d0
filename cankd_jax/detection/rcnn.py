"""The box head of a two-stage detector at test time, on static shapes (mmdet 3.x `BBoxHead.predict_by_feat`
with `multiclass_nms`).

Per image (vmapped over the batch), for its RoIs (the RPN's proposals):

1. softmax over the K + 1 logits (background last, dropped);
2. class-specific boxes decoded from each RoI (`DeltaXYWHCoder`, stds 0.1, 0.1, 0.2, 0.2) and clipped to the
   image's un-padded shape, then divided by the resize scale factor (`rescale=True`);
3. every (RoI, class) pair with score > `score_thr` (strictly) a candidate; class-aware NMS at `iou_threshold`,
   the best `max_per_img`.

Output as the one-stage post-processing: `Detections`, padding after `num_valid`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import chex
import jax
import jax.numpy as jnp

from cankd_jax.detection.boxes import DeltaXYWHCoder, rescale_boxes
from cankd_jax.detection.nms import batched_nms
from cankd_jax.detection.postprocess import Detections

Array = jax.Array

RCNN_CODER = DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2))  # Shared2FCBBoxHead's bbox_coder


@dataclasses.dataclass(frozen=True)
class RCNNTestConfig:
    """mmdet's `test_cfg.rcnn`."""

    score_thr: float = 0.05
    iou_threshold: float = 0.5
    max_per_img: int = 100


RCNN_TEST_CFG = RCNNTestConfig()


def rcnn_postprocess_single(roi_boxes: Array, roi_valid: Array, cls_logits: Array, bbox_pred: Array,
                            img_shape: Array, scale_factor: Optional[Array] = None, *,
                            cfg: RCNNTestConfig = RCNN_TEST_CFG, coder: DeltaXYWHCoder = RCNN_CODER) -> Detections:
    """One image: `roi_boxes (R, 4)` input pixels with `roi_valid (R,)`, `cls_logits (R, K + 1)`, `bbox_pred
    (R, 4 K)` (class-specific) or `(R, 4)` (class-agnostic); `img_shape (2,)` (h, w); `scale_factor (2,)` (w, h)
    resized / original, or None to stay in input pixels."""
    r, k1 = cls_logits.shape
    k = k1 - 1
    chex.assert_shape(roi_boxes, (r, 4))
    chex.assert_shape(roi_valid, (r,))
    if bbox_pred.shape not in ((r, 4 * k), (r, 4)):
        raise ValueError(f"RCNN post-processing: bbox_pred {bbox_pred.shape} is neither ({r}, {4 * k}) nor ({r}, 4)")
    scores = jax.nn.softmax(cls_logits.astype(jnp.float32), axis=-1)[:, :k]
    deltas = jnp.broadcast_to(bbox_pred.astype(jnp.float32).reshape(r, -1, 4), (r, k, 4))
    priors = jnp.broadcast_to(roi_boxes.astype(jnp.float32)[:, None, :], (r, k, 4))
    boxes = coder.decode(priors, deltas, max_shape=img_shape)
    if scale_factor is not None:
        boxes = rescale_boxes(boxes, scale_factor)
    boxes, scores = boxes.reshape(r * k, 4), scores.reshape(r * k)
    labels = jnp.tile(jnp.arange(k, dtype=jnp.int32), r)
    valid = jnp.repeat(roi_valid, k) & (scores > cfg.score_thr)
    res = batched_nms(boxes, scores, labels, valid, iou_threshold=cfg.iou_threshold, max_out=cfg.max_per_img)
    ok = res.keep >= 0
    idx = jnp.maximum(res.keep, 0)
    return Detections(boxes=jnp.where(ok[:, None], boxes[idx], 0.0), scores=jnp.where(ok, scores[idx], 0.0),
                      labels=jnp.where(ok, labels[idx], -1).astype(jnp.int32), num_valid=res.num_kept)


def rcnn_postprocess(roi_boxes: Array, roi_valid: Array, cls_logits: Array, bbox_pred: Array, img_shapes: Array,
                     scale_factors: Optional[Array] = None, *, cfg: RCNNTestConfig = RCNN_TEST_CFG) -> Detections:
    """Batched `rcnn_postprocess_single`: `roi_boxes (B, R, 4)`, `roi_valid (B, R)`, `cls_logits (B, R, K + 1)`,
    `bbox_pred (B, R, 4 K)`, `img_shapes (B, 2)`, `scale_factors (B, 2)` or None."""
    def one(boxes, valid, cl, bp, shape, sf):
        return rcnn_postprocess_single(boxes, valid, cl, bp, shape, sf, cfg=cfg)

    return jax.vmap(one)(roi_boxes, roi_valid, cls_logits, bbox_pred, jnp.asarray(img_shapes, jnp.float32),
                         None if scale_factors is None else jnp.asarray(scale_factors, jnp.float32))
