"""The region proposal network on static shapes: its proposals (mmdet 3.x `RPNHead.predict_by_feat`) and its
training targets and losses (`RPNHead.loss_by_feat`).

Per image (vmapped over the batch), as mmdet's `RPNHead._predict_by_feat_single` + `_bbox_post_process`:

1. per level, the sigmoid objectness of every anchor; the best `nms_pre` of the level (all of them when the
   level has no more), ties by lower index;
2. levels concatenated, boxes decoded from the anchors (`DeltaXYWHCoder`, means 0, stds 1) and clipped to the
   image's un-padded shape;
3. boxes of width or height `<= min_bbox_size` dropped (mmdet: whenever `min_bbox_size >= 0`);
4. NMS at `iou_threshold` within each level (mmdet's `batched_nms` with the level as the label), the best
   `max_per_img` kept, best first.

Output: `max_per_img` rows per image, zero boxes and scores after `num_valid` (`valid` False). The proposals
are not differentiated through (mmdet detaches them): this takes the RPN's outputs as values.

Training (`train_cfg.rpn`): max-IoU assignment of the anchors valid on the image's padded extent (0.7 / 0.3,
low-quality matches down to 0.3), 256 anchors sampled at positive fraction 0.5 (`samplers.random_sample`),
binary cross-entropy on the sampled anchors' objectness and L1 on the positives' deltas, both divided by the
number of sampled anchors in the batch (mmdet's `avg_factor` with the random sampler).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence

import chex
import jax
import jax.numpy as jnp

from cankd_jax.detection.anchors import AnchorGenerator
from cankd_jax.detection.assigners import BACKGROUND, max_iou_assign
from cankd_jax.detection.boxes import DeltaXYWHCoder
from cankd_jax.detection.losses import bce_loss, l1_loss
from cankd_jax.detection.nms import batched_nms
from cankd_jax.detection.roi_align import batch_rois
from cankd_jax.detection.samplers import Sample, random_sample
from cankd_jax.detection.topk import top_k

Array = jax.Array

RPN_STRIDES = (4, 8, 16, 32, 64)
# mmdet's RPN anchors: scales=[8], ratios=[0.5, 1.0, 2.0], strides 4-64 (one scale per octave).
RPN_ANCHORS = AnchorGenerator(strides=RPN_STRIDES, ratios=(0.5, 1.0, 2.0), octave_base_scale=8.0, scales_per_octave=1)


@dataclasses.dataclass(frozen=True)
class ProposalConfig:
    """mmdet's `train_cfg.rpn_proposal` / `test_cfg.rpn`."""

    nms_pre: int = 1000
    max_per_img: int = 1000
    iou_threshold: float = 0.7
    min_bbox_size: float = 0.0


RPN_TRAIN_PROPOSALS = ProposalConfig(nms_pre=2000)  # faster-rcnn_r50_fpn: train_cfg.rpn_proposal
RPN_TEST_PROPOSALS = ProposalConfig(nms_pre=1000)  # test_cfg.rpn


class Proposals(NamedTuple):
    """boxes `(..., max_per_img, 4)` x1y1x2y2 input pixels, best first; scores `(...,  max_per_img)` objectness;
    valid `(..., max_per_img)` bool; num_valid `(...)` int32."""

    boxes: Array
    scores: Array
    valid: Array
    num_valid: Array


def proposals_single(cls_logits: Sequence[Array], bbox_pred: Sequence[Array], anchors: Sequence[Array],
                     img_shape: Array, *, cfg: ProposalConfig = RPN_TEST_PROPOSALS,
                     coder: DeltaXYWHCoder = DeltaXYWHCoder()) -> Proposals:
    """One image. Per level l: `cls_logits (N_l,)` objectness logits, `bbox_pred (N_l, 4)` deltas, `anchors
    (N_l, 4)`, N_l = H_l W_l A in `AnchorGenerator` order; `img_shape (2,)` = (h, w) of the resized, un-padded
    image."""
    if not len(cls_logits) == len(bbox_pred) == len(anchors):
        raise ValueError(f"RPN proposals need one objectness, delta and anchor array per level; got "
                         f"{len(cls_logits)}, {len(bbox_pred)}, {len(anchors)}")
    scores, deltas, priors, levels = [], [], [], []
    for level, (cl, bp, an) in enumerate(zip(cls_logits, bbox_pred, anchors)):
        chex.assert_rank(cl, 1)
        chex.assert_shape([bp, an], (cl.shape[0], 4))
        s = jax.nn.sigmoid(cl.astype(jnp.float32))
        top, index = top_k(s, min(cfg.nms_pre, s.shape[0]))  # ties: the lower index first
        scores.append(top)
        deltas.append(bp.astype(jnp.float32)[index])
        priors.append(jnp.asarray(an, jnp.float32)[index])
        levels.append(jnp.full(top.shape, level, jnp.int32))
    boxes = coder.decode(jnp.concatenate(priors), jnp.concatenate(deltas), max_shape=img_shape)
    scores, levels = jnp.concatenate(scores), jnp.concatenate(levels)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    valid = (w > cfg.min_bbox_size) & (h > cfg.min_bbox_size)
    res = batched_nms(boxes, scores, levels, valid, iou_threshold=cfg.iou_threshold, max_out=cfg.max_per_img)
    ok = res.keep >= 0
    idx = jnp.maximum(res.keep, 0)
    return Proposals(boxes=jnp.where(ok[:, None], boxes[idx], 0.0), scores=jnp.where(ok, scores[idx], 0.0),
                     valid=ok, num_valid=res.num_kept)


def proposals(rpn_cls_scores: Sequence[Array], rpn_bbox_preds: Sequence[Array], img_shapes: Array, *,
              cfg: ProposalConfig = RPN_TEST_PROPOSALS,
              anchor_generator: AnchorGenerator = RPN_ANCHORS) -> Proposals:
    """The batch's proposals from `RPNHead`'s outputs: per level `(B, H_l, W_l, A)` and `(B, H_l, W_l, 4 A)`;
    `img_shapes (B, 2)` each image's resized, un-padded (h, w). -> `Proposals` with a leading B."""
    if len(rpn_cls_scores) != anchor_generator.num_levels:
        raise ValueError(f"RPN proposals: {len(rpn_cls_scores)} levels for anchors of strides "
                         f"{anchor_generator.strides}")
    sizes = [tuple(x.shape[1:3]) for x in rpn_cls_scores]
    anchors = anchor_generator.grid_anchors(sizes)
    b = rpn_cls_scores[0].shape[0]
    cls = [x.reshape(b, -1) for x in rpn_cls_scores]
    reg = [x.reshape(b, -1, 4) for x in rpn_bbox_preds]

    def one(cl, bp, shape):
        return proposals_single(cl, bp, anchors, shape, cfg=cfg)

    return jax.vmap(one)(cls, reg, jnp.asarray(img_shapes, jnp.float32))


def proposal_rois(props: Proposals) -> tuple[Array, Array]:
    """`(B * M, 5)` RoIs `(image index, x1, y1, x2, y2)` of the proposals (mmdet's `bbox2roi`) and their
    `(B * M,)` validity (the padding rows are zero boxes of their image)."""
    return batch_rois(props.boxes), props.valid.reshape(-1)


@dataclasses.dataclass(frozen=True)
class RPNTrainConfig:
    """mmdet's `train_cfg.rpn` (faster-rcnn_r50_fpn)."""

    pos_iou_thr: float = 0.7
    neg_iou_thr: float = 0.3
    min_pos_iou: float = 0.3
    num: int = 256
    pos_fraction: float = 0.5


RPN_TRAIN_CFG = RPNTrainConfig()


class RPNTargets(NamedTuple):
    """Targets of one image's anchors (A = all levels', concatenated in `AnchorGenerator` order).

    objectness `(A,)` float32: 1 for a sampled positive, 0 otherwise; label_weights `(A,)` float32: 1 for the
    sampled anchors; bbox_targets `(A, 4)` deltas of the sampled positives (0 elsewhere); bbox_weights `(A, 4)`;
    num_samples `()` int32: anchors sampled in this image."""

    objectness: Array
    label_weights: Array
    bbox_targets: Array
    bbox_weights: Array
    num_samples: Array


def rpn_targets_single(anchors: Array, anchor_valid: Array, gt_boxes: Array, gt_valid: Array,
                       key: Optional[Array] = None, *, sample: Optional[Sample] = None,
                       cfg: RPNTrainConfig = RPN_TRAIN_CFG, coder: DeltaXYWHCoder = DeltaXYWHCoder()) -> RPNTargets:
    """mmdet `AnchorHead._get_targets_single` for the RPN: `anchors (A, 4)`, `anchor_valid (A,)` (the valid
    flags of the image's padded shape; `allowed_border=-1`), `gt_boxes (G, 4)`, `gt_valid (G,)`. The anchors
    are sampled with `key`, or `sample` gives the sampled positives and negatives (the tests feed mmdet's)."""
    res = max_iou_assign(anchors, gt_boxes, gt_valid, anchor_valid, pos_iou_thr=cfg.pos_iou_thr,
                         neg_iou_thr=cfg.neg_iou_thr, min_pos_iou=cfg.min_pos_iou)
    if sample is None:
        if key is None:
            raise ValueError("rpn_targets_single: give a sampling key, or the sample itself")
        sample = random_sample(key, res.gt_inds >= 0, res.gt_inds == BACKGROUND, num=cfg.num,
                               pos_fraction=cfg.pos_fraction)
    pos, neg = sample
    anchors = jnp.asarray(anchors, jnp.float32)
    idx = jnp.maximum(res.gt_inds, 0)
    # Non-positives encode against themselves, so no log(0) of a padded ground truth is ever formed.
    matched = jnp.where(pos[:, None], jnp.asarray(gt_boxes, jnp.float32)[idx], anchors)
    bbox_targets = jnp.where(pos[:, None], coder.encode(anchors, matched), 0.0)
    return RPNTargets(objectness=pos.astype(jnp.float32), label_weights=(pos | neg).astype(jnp.float32),
                      bbox_targets=bbox_targets,
                      bbox_weights=jnp.broadcast_to(pos[:, None], bbox_targets.shape).astype(jnp.float32),
                      num_samples=jnp.sum(pos | neg).astype(jnp.int32))


def rpn_loss(cls_logits: Array, bbox_pred: Array, targets: RPNTargets) -> dict[str, Array]:
    """`loss_rpn_cls` (BCE) and `loss_rpn_bbox` (L1 on deltas), both loss_weight 1, each divided by the batch's
    sampled anchors. `cls_logits (B, A)`, `bbox_pred (B, A, 4)`, `targets` with a leading B."""
    chex.assert_rank(cls_logits, 2)
    b, a = cls_logits.shape
    chex.assert_shape(bbox_pred, (b, a, 4))
    chex.assert_shape(targets.objectness, (b, a))
    avg = jnp.sum(targets.num_samples).astype(jnp.float32)
    return {"loss_rpn_cls": bce_loss(cls_logits.reshape(-1), targets.objectness.reshape(-1),
                                     targets.label_weights.reshape(-1), avg_factor=avg),
            "loss_rpn_bbox": l1_loss(bbox_pred.reshape(-1, 4), targets.bbox_targets.reshape(-1, 4),
                                     targets.bbox_weights.reshape(-1, 4), avg_factor=avg)}
