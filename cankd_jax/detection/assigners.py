"""Training targets of RetinaNet (max-IoU assignment) and FCOS, mmdet 3.x semantics, static shapes.

One image at a time (vmap over the batch). Ground truth is padded to a fixed `G`:
`gt_boxes (G, 4)` pixels, `gt_labels (G,)` int in [0, num_classes), `gt_valid (G,)`
bool; padded rows never match anything. Crowd boxes are not handled here: with the
configs' `ignore_iof_thr=-1` mmdet gives them no part in training, so the data layer
drops them from these inputs.

Labels use mmdet's convention: a class index for a positive, `num_classes` for background.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from cankd_jax.detection.anchors import FCOS_INF, FCOSPriors
from cankd_jax.detection.boxes import DeltaXYWHCoder, DistancePointCoder, box_area, pairwise_iou

Array = jax.Array

BACKGROUND = -1  # assigned gt index of a negative
IGNORE = -2  # neither positive nor negative: no loss at all


class AssignResult(NamedTuple):
    """gt_inds `(A,)` int32: the 0-based gt index of a positive, `BACKGROUND` (-1) or `IGNORE` (-2);
    max_iou `(A,)` float32: each anchor's best IoU with a valid gt (-1 where it has none)."""

    gt_inds: Array
    max_iou: Array


def _check_gt(gt_boxes: Array, gt_valid: Array, gt_labels: Optional[Array] = None) -> None:
    chex.assert_rank(gt_boxes, 2)
    chex.assert_axis_dimension(gt_boxes, 1, 4)
    chex.assert_shape(gt_valid, (gt_boxes.shape[0],))
    if gt_labels is not None:
        chex.assert_shape(gt_labels, (gt_boxes.shape[0],))


def max_iou_assign(
    anchors: Array,
    gt_boxes: Array,
    gt_valid: Array,
    anchor_valid: Optional[Array] = None,
    *,
    pos_iou_thr: float = 0.5,
    neg_iou_thr: float = 0.4,
    min_pos_iou: float = 0.0,
    gt_max_assign_all: bool = True,
    match_low_quality: bool = True,
) -> AssignResult:
    """mmdet's `MaxIoUAssigner` (float `neg_iou_thr`, `ignore_iof_thr=-1`) on static shapes.

    Args:
      anchors: `(A, 4)` pixels. gt_boxes: `(G, 4)` pixels. gt_valid: `(G,)` bool.
      anchor_valid: `(A,)` bool or None (all valid). An invalid anchor is left out
        of the assignment entirely, as mmdet drops it before assigning: it is
        `IGNORE`, and it does not count towards any gt's best IoU.

    Steps, as mmdet's: (1) everything starts ignored; (2) negative where the best IoU
    over gts is in [0, neg_iou_thr); (3) positive, to its best gt (the first on a tie),
    where the best IoU >= pos_iou_thr; (4) low-quality matches: for each gt in index
    order whose best IoU over anchors is >= `min_pos_iou` (mmdet compares with `>=`),
    every anchor whose IoU with it equals that best (all ties with `gt_max_assign_all`,
    else only the first) is assigned to it, so a later gt overrides an earlier one and
    step 4 can override a step-3 positive. With `min_pos_iou=0` a gt that overlaps no
    anchor at all (best IoU 0) therefore claims every valid anchor it does not overlap,
    exactly as mmdet does; real boxes always overlap some anchor, and degenerate
    (zero-area) boxes must be dropped by the data layer (mmdet's COCO loader drops
    boxes under 1 pixel). An image without valid gts: every valid anchor is negative.
    """
    anchors = jnp.asarray(anchors, jnp.float32)
    chex.assert_rank(anchors, 2)
    chex.assert_axis_dimension(anchors, 1, 4)
    _check_gt(gt_boxes, gt_valid)
    num_anchors, num_gts = anchors.shape[0], gt_boxes.shape[0]
    if anchor_valid is None:
        anchor_valid = jnp.ones((num_anchors,), bool)
    chex.assert_shape(anchor_valid, (num_anchors,))
    gt_valid = jnp.asarray(gt_valid, bool)
    anchor_valid = jnp.asarray(anchor_valid, bool)

    # mmdet's orientation (gts x anchors); -1 marks pairs that do not exist in mmdet's
    # compacted tensors, below every real IoU (>= 0) so no max or tie ever picks one.
    pair_ok = gt_valid[:, None] & anchor_valid[None, :]
    iou = jnp.where(pair_ok, pairwise_iou(gt_boxes, anchors), -1.0)

    max_iou = jnp.max(iou, axis=0)
    argmax_gt = jnp.argmax(iou, axis=0).astype(jnp.int32)  # first maximum, as torch.max(dim)
    gt_max = jnp.max(iou, axis=1)

    inds = jnp.full((num_anchors,), IGNORE, jnp.int32)
    inds = jnp.where((max_iou >= 0) & (max_iou < neg_iou_thr), BACKGROUND, inds)
    inds = jnp.where(max_iou >= pos_iou_thr, argmax_gt, inds)

    if match_low_quality:
        gt_ok = gt_valid & (gt_max >= min_pos_iou)
        if gt_max_assign_all:
            hit = (iou == gt_max[:, None]) & pair_ok
        else:
            first = jnp.argmax(iou, axis=1)
            hit = (jnp.arange(num_anchors)[None, :] == first[:, None]) & pair_ok
        hit = hit & gt_ok[:, None]
        # mmdet's loop over gts lets the last matching gt win: take the last True per column.
        last = (num_gts - 1 - jnp.argmax(hit[::-1], axis=0)).astype(jnp.int32)
        inds = jnp.where(jnp.any(hit, axis=0), last, inds)

    # mmdet's num_gts == 0 branch: every (valid) anchor negative.
    inds = jnp.where(jnp.any(gt_valid), inds, jnp.where(anchor_valid, BACKGROUND, IGNORE))
    return AssignResult(inds, max_iou)


class RetinaNetTargets(NamedTuple):
    """Targets of one image's anchors (A = all levels' anchors, concatenated).

    labels `(A,)` int32: class, or `num_classes` for background and ignored anchors.
    label_weights `(A,)` float32: 1 for positives and negatives, 0 for ignored/invalid.
    bbox_targets `(A, 4)` float32: encoded deltas of positives, 0 elsewhere.
    bbox_weights `(A, 4)` float32: 1 for positives, 0 elsewhere.
    num_pos `()` int32: positives in this image.
    """

    labels: Array
    label_weights: Array
    bbox_targets: Array
    bbox_weights: Array
    num_pos: Array


def retinanet_targets(
    anchors: Array,
    anchor_valid: Optional[Array],
    gt_boxes: Array,
    gt_labels: Array,
    gt_valid: Array,
    *,
    num_classes: int,
    coder: DeltaXYWHCoder = DeltaXYWHCoder(),
    pos_iou_thr: float = 0.5,
    neg_iou_thr: float = 0.4,
    min_pos_iou: float = 0.0,
) -> RetinaNetTargets:
    """mmdet `AnchorHead._get_targets_single` with RetinaNet's train_cfg.

    `allowed_border=-1` (only the valid flags restrict anchors), `PseudoSampler`
    (every assigned anchor is used), `pos_weight=-1` (positives weigh 1), regression
    on encoded deltas (`reg_decoded_bbox=False`). Shapes as `max_iou_assign`.
    """
    _check_gt(gt_boxes, gt_valid, gt_labels)
    res = max_iou_assign(anchors, gt_boxes, gt_valid, anchor_valid, pos_iou_thr=pos_iou_thr,
                         neg_iou_thr=neg_iou_thr, min_pos_iou=min_pos_iou)
    pos = res.gt_inds >= 0
    neg = res.gt_inds == BACKGROUND
    idx = jnp.maximum(res.gt_inds, 0)
    labels = jnp.where(pos, jnp.asarray(gt_labels, jnp.int32)[idx], num_classes).astype(jnp.int32)
    anchors = jnp.asarray(anchors, jnp.float32)
    # Non-positives encode against themselves so that no log(0) of a padded gt is ever formed.
    matched = jnp.where(pos[:, None], jnp.asarray(gt_boxes, jnp.float32)[idx], anchors)
    bbox_targets = jnp.where(pos[:, None], coder.encode(anchors, matched), 0.0)
    return RetinaNetTargets(
        labels=labels,
        label_weights=(pos | neg).astype(jnp.float32),
        bbox_targets=bbox_targets,
        bbox_weights=jnp.broadcast_to(pos[:, None], bbox_targets.shape).astype(jnp.float32),
        num_pos=jnp.sum(pos).astype(jnp.int32),
    )


class FCOSTargets(NamedTuple):
    """Targets of one image's points (P = all levels' points, concatenated).

    labels `(P,)` int32: class, or `num_classes` for background.
    bbox_targets `(P, 4)` float32: (left, top, right, bottom) to the assigned gt, divided
      by the point's stride when `norm_on_bbox` (mmdet does so for every point;
      only positives' values are used).
    centerness_targets `(P,)` float32: `sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))` for
      positives, 0 elsewhere.
    pos `(P,)` bool: positive points. num_pos `()` int32.
    """

    labels: Array
    bbox_targets: Array
    centerness_targets: Array
    pos: Array
    num_pos: Array


def centerness_target(distances: Array) -> Array:
    """`(..., 4)` positive distances (l, t, r, b) -> `(...)` FCOS centerness in [0, 1]."""
    lr, tb = distances[..., 0::2], distances[..., 1::2]
    return jnp.sqrt((jnp.min(lr, -1) / jnp.max(lr, -1)) * (jnp.min(tb, -1) / jnp.max(tb, -1)))


def fcos_targets(
    priors: FCOSPriors,
    gt_boxes: Array,
    gt_labels: Array,
    gt_valid: Array,
    *,
    num_classes: int,
    center_sampling: bool = True,
    center_sample_radius: float = 1.5,
    norm_on_bbox: bool = True,
) -> FCOSTargets:
    """mmdet `FCOSHead._get_targets_single` + `get_targets` (+ `centerness_target`) for one image.

    A point is a candidate for a gt when it lies strictly inside it (with
    `center_sampling`: strictly inside the gt clipped to a square of half-side
    `stride * radius` around the gt's centre) and the largest of its four distances
    to the gt is within its level's regress range (both ends inclusive). Among
    candidates the gt of smallest area wins, the first one on an exact tie (mmdet:
    `min` over areas with `INF` = 1e8 for non-candidates; a point whose minimum is
    `INF` is background, padded gts never qualify).
    """
    _check_gt(gt_boxes, gt_valid, gt_labels)
    points = jnp.asarray(priors.points, jnp.float32)
    strides = jnp.asarray(priors.strides, jnp.float32)
    ranges = jnp.asarray(priors.regress_ranges, jnp.float32)
    chex.assert_rank(points, 2)
    num_points = points.shape[0]
    chex.assert_shape([strides], (num_points,))
    chex.assert_shape(ranges, (num_points, 2))
    gt = jnp.asarray(gt_boxes, jnp.float32)

    coder = DistancePointCoder()
    pts = jnp.broadcast_to(points[:, None, :], (num_points, gt.shape[0], 2))
    dist = coder.encode(pts, jnp.broadcast_to(gt[None], (num_points,) + gt.shape))  # (P, G, 4)
    if center_sampling:
        cx, cy = (gt[:, 0] + gt[:, 2]) / 2, (gt[:, 1] + gt[:, 3]) / 2
        r = (strides * center_sample_radius)[:, None]
        # The sampling square clipped to the gt; mmdet's torch.where picks are max/min.
        inner = jnp.stack([jnp.maximum(cx - r, gt[:, 0]), jnp.maximum(cy - r, gt[:, 1]),
                           jnp.minimum(cx + r, gt[:, 2]), jnp.minimum(cy + r, gt[:, 3])], axis=-1)
        inside = jnp.min(coder.encode(pts, inner), axis=-1) > 0
    else:
        inside = jnp.min(dist, axis=-1) > 0
    reach = jnp.max(dist, axis=-1)
    in_range = (reach >= ranges[:, :1]) & (reach <= ranges[:, 1:])
    areas = jnp.where(inside & in_range & gt_valid[None, :], box_area(gt)[None, :], FCOS_INF)
    best = jnp.argmin(areas, axis=1)  # first minimum, as torch.min(dim)
    pos = jnp.min(areas, axis=1) != FCOS_INF
    labels = jnp.where(pos, jnp.asarray(gt_labels, jnp.int32)[best], num_classes).astype(jnp.int32)
    targets = jnp.take_along_axis(dist, best[:, None, None], axis=1)[:, 0]
    if norm_on_bbox:
        targets = targets / strides[:, None]
    # Negatives' distances may be <= 0; give them a harmless stand-in so no NaN is ever formed.
    safe = jnp.where(pos[:, None], targets, 1.0)
    centerness = jnp.where(pos, centerness_target(safe), 0.0)
    return FCOSTargets(labels, targets, centerness, pos, jnp.sum(pos).astype(jnp.int32))
