"""The box head of a two-stage detector at test time, on static shapes (mmdet 3.x `BBoxHead.predict_by_feat`
with `multiclass_nms`).

Per image (vmapped over the batch), for its RoIs (the RPN's proposals):

1. softmax over the K + 1 logits (background last, dropped);
2. class-specific boxes decoded from each RoI (`DeltaXYWHCoder`, stds 0.1, 0.1, 0.2, 0.2) and clipped to the
   image's un-padded shape, then divided by the resize scale factor (`rescale=True`);
3. every (RoI, class) pair with score > `score_thr` (strictly) a candidate; class-aware NMS at `iou_threshold`,
   the best `max_per_img`.

Output as the one-stage post-processing: `Detections`, padding after `num_valid`.

Training (`train_cfg.rcnn`): each image's proposals are assigned to its ground truths by max IoU (0.5 / 0.5, no
low-quality matches); the ground truths join the candidates as positives of themselves (`add_gt_as_proposals`);
512 candidates are sampled at positive fraction 0.25 and laid out positives first, then negatives, in a fixed
number of slots with a validity mask; softmax cross-entropy over K + 1 classes on the sampled RoIs and L1 on the
positives' deltas of their own class, both divided by the number of sampled RoIs in the batch.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from cankd_jax.detection.assigners import BACKGROUND, IGNORE, max_iou_assign
from cankd_jax.detection.boxes import DeltaXYWHCoder, rescale_boxes
from cankd_jax.detection.losses import l1_loss, weight_reduce
from cankd_jax.detection.nms import batched_nms
from cankd_jax.detection.postprocess import Detections, kept_detections
from cankd_jax.detection.roi_align import batch_rois
from cankd_jax.detection.samplers import Sample, random_sample

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
    return kept_detections(boxes, scores, labels, res)


def rcnn_postprocess(roi_boxes: Array, roi_valid: Array, cls_logits: Array, bbox_pred: Array, img_shapes: Array,
                     scale_factors: Optional[Array] = None, *, cfg: RCNNTestConfig = RCNN_TEST_CFG) -> Detections:
    """Batched `rcnn_postprocess_single`: `roi_boxes (B, R, 4)`, `roi_valid (B, R)`, `cls_logits (B, R, K + 1)`,
    `bbox_pred (B, R, 4 K)`, `img_shapes (B, 2)`, `scale_factors (B, 2)` or None."""
    def one(boxes, valid, cl, bp, shape, sf):
        return rcnn_postprocess_single(boxes, valid, cl, bp, shape, sf, cfg=cfg)

    return jax.vmap(one)(roi_boxes, roi_valid, cls_logits, bbox_pred, jnp.asarray(img_shapes, jnp.float32),
                         None if scale_factors is None else jnp.asarray(scale_factors, jnp.float32))


@dataclasses.dataclass(frozen=True)
class RCNNTrainConfig:
    """mmdet's `train_cfg.rcnn` (faster-rcnn_r50_fpn)."""

    pos_iou_thr: float = 0.5
    neg_iou_thr: float = 0.5
    min_pos_iou: float = 0.5
    num: int = 512
    pos_fraction: float = 0.25


RCNN_TRAIN_CFG = RCNNTrainConfig()


class RoISample(NamedTuple):
    """One image's sampled RoIs in `num` slots, positives first (S = num).

    boxes `(S, 4)` input pixels (zero in unused slots); valid `(S,)` bool; labels `(S,)` int32 (class of a
    positive, K for a negative or an unused slot); bbox_targets `(S, 4)` deltas of the positives (stds 0.1, 0.1,
    0.2, 0.2); pos `(S,)` bool. mmdet orders its sampled RoIs the same way (`unique()` sorts the indices)."""

    boxes: Array
    valid: Array
    labels: Array
    bbox_targets: Array
    pos: Array


def candidate_assignment(proposals: Array, proposal_valid: Array, gt_boxes: Array, gt_valid: Array, *,
                         cfg: RCNNTrainConfig = RCNN_TRAIN_CFG) -> tuple[Array, Array]:
    """The candidates `(G + M, 4)` (the ground truths, then the proposals, as mmdet prepends them) and their
    assigned ground truth `(G + M,)` (0-based index, `BACKGROUND`, or `IGNORE` for padding): the proposals by
    max IoU, each valid ground truth to itself."""
    res = max_iou_assign(proposals, gt_boxes, gt_valid, proposal_valid, pos_iou_thr=cfg.pos_iou_thr,
                         neg_iou_thr=cfg.neg_iou_thr, min_pos_iou=cfg.min_pos_iou, match_low_quality=False)
    g = gt_boxes.shape[0]
    own = jnp.where(gt_valid, jnp.arange(g, dtype=jnp.int32), IGNORE)
    boxes = jnp.concatenate([jnp.asarray(gt_boxes, jnp.float32), jnp.asarray(proposals, jnp.float32)])
    return boxes, jnp.concatenate([own, res.gt_inds])


def rcnn_sample_single(proposals: Array, proposal_valid: Array, gt_boxes: Array, gt_labels: Array, gt_valid: Array,
                       key: Optional[Array] = None, *, num_classes: int, sample: Optional[Sample] = None,
                       cfg: RCNNTrainConfig = RCNN_TRAIN_CFG, coder: DeltaXYWHCoder = RCNN_CODER) -> RoISample:
    """mmdet `StandardRoIHead.loss`'s assignment and sampling, and `BBoxHead._get_targets_single`, for one image:
    `proposals (M, 4)` with `proposal_valid (M,)`, `gt_boxes (G, 4)`, `gt_labels (G,)`, `gt_valid (G,)`.
    Sampled with `key`, or `sample` gives the sampled candidates (`(G + M,)` masks; the tests feed mmdet's)."""
    boxes, gt_inds = candidate_assignment(proposals, proposal_valid, gt_boxes, gt_valid, cfg=cfg)
    if sample is None:
        if key is None:
            raise ValueError("rcnn_sample_single: give a sampling key, or the sample itself")
        sample = random_sample(key, gt_inds >= 0, gt_inds == BACKGROUND, num=cfg.num, pos_fraction=cfg.pos_fraction)
    pos, neg = sample
    chex.assert_shape([pos, neg], gt_inds.shape)
    slots = min(cfg.num, gt_inds.shape[0])
    rank = jnp.where(pos, 0, jnp.where(neg, 1, 2))
    order = jnp.argsort(rank, stable=True)[:slots]  # positives, then negatives, each in candidate order
    s_pos, s_valid = pos[order], (pos | neg)[order]
    idx = jnp.maximum(gt_inds[order], 0)
    s_boxes = jnp.where(s_valid[:, None], boxes[order], 0.0)
    matched = jnp.where(s_pos[:, None], jnp.asarray(gt_boxes, jnp.float32)[idx], s_boxes)
    safe = jnp.where(s_pos[:, None], s_boxes, jnp.asarray([0.0, 0.0, 1.0, 1.0]))  # no log(0) in unused slots
    targets = jnp.where(s_pos[:, None], coder.encode(safe, jnp.where(s_pos[:, None], matched, safe)), 0.0)
    labels = jnp.where(s_pos, jnp.asarray(gt_labels, jnp.int32)[idx], num_classes).astype(jnp.int32)
    return RoISample(boxes=s_boxes, valid=s_valid, labels=labels, bbox_targets=targets, pos=s_pos)


def rcnn_loss(cls_logits: Array, bbox_pred: Array, samples: RoISample) -> dict[str, Array]:
    """`loss_cls` (softmax cross-entropy over K + 1) and `loss_bbox` (L1 on the positives' deltas of their class),
    loss_weight 1. `cls_logits (N, K + 1)`, `bbox_pred (N, 4 K)` or `(N, 4)` for the N = B * S sampled slots in
    `samples` (a leading B, flattened here). Both are divided by the batch's sampled RoIs (the classifier's
    normaliser at least 1, as mmdet's)."""
    n, k1 = cls_logits.shape
    labels, valid = samples.labels.reshape(-1), samples.valid.reshape(-1).astype(jnp.float32)
    pos = samples.pos.reshape(-1)
    chex.assert_shape(labels, (n,))
    count = jnp.sum(valid)
    log_p = jax.nn.log_softmax(cls_logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
    loss_cls = weight_reduce(ce, valid, jnp.maximum(count, 1.0))
    deltas = bbox_pred.astype(jnp.float32).reshape(n, -1, 4)
    if deltas.shape[1] > 1:
        deltas = jnp.take_along_axis(deltas, jnp.clip(labels, 0, k1 - 2)[:, None, None], axis=1)
    weights = jnp.broadcast_to(pos[:, None], (n, 4)).astype(jnp.float32)
    loss_bbox = l1_loss(deltas[:, 0], samples.bbox_targets.reshape(-1, 4), weights, avg_factor=count)
    return {"loss_cls": loss_cls, "loss_bbox": loss_bbox}


def sample_rois(samples: RoISample) -> Array:
    """`(B * S, 5)` RoIs `(image index, x1, y1, x2, y2)` of a batch's sampled slots (unused slots: zero boxes)."""
    return batch_rois(samples.boxes)
