"""RepPoints (mmdet 3.x `RepPointsHead`, moment transform): point sets to boxes, the two-stage targets, the losses
and the test-time decoding, on static shapes.

A RepPoints head predicts, per location and level, 9 points as offsets from the location in units of the level's
stride, in mmdet's channel order `[y0, x0, y1, x1, ...]`: first an initial set (`pts_preds_init`), then a
refinement (`pts_preds_refine`, the initial set plus a learned correction). A point set becomes a box by its
moments (`points_to_boxes`): the mean of the points is the centre, the (unbiased) standard deviation of the x and
y coordinates times `exp(moment_transfer)` the half width and height.

Training (`reppoints_targets`, `reppoints_loss`), as mmdet's `loss_by_feat`:
  init stage: every location is a candidate; mmdet's `PointAssigner(scale=4, pos_num=1)` gives each gt the
    location of its level (log2 of its size / 4, clamped to the pyramid) nearest to its centre (in units of
    its width and height), unless a later gt is strictly nearer to that location; the initial boxes of the
    positives regress their gt (SmoothL1, beta 0.11, weight 0.5, normalised by `point_base_scale * stride`);
  refine stage: the initial boxes (detached) are the proposals of a `MaxIoUAssigner(0.5, 0.4, min_pos_iou=0)`;
    the refined boxes regress the positives' gts (SmoothL1, weight 1.0) and the scores learn the labels (focal
    loss; negatives' weight 1, ignored 0).
  Each term is a sum over the batch divided by the batch's positives of its stage (mmdet's `PseudoSampler`
  average factor: positives only, plus float32 epsilon).
Test (`reppoints_postprocess`): per level the top `nms_pre` (location, class) pairs above `score_thr`, boxes
`bbox * stride + (x, y, x, y)` clipped to the image, to the original image, `min_bbox_size` filter, class-aware
NMS at 0.5, the best 100.

Ties: where two locations are exactly as near to a gt's centre, `PointAssigner` takes the one `torch.topk`
returns, which depends on PyTorch's kernel (the first index for some level sizes, the last for others); here
the first, always.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from cankd_jax.detection.anchors import grid_points
from cankd_jax.detection.assigners import BACKGROUND, IGNORE, _check_gt, max_iou_assign
from cankd_jax.detection.boxes import clip_boxes
from cankd_jax.detection.losses import sigmoid_focal_loss, smooth_l1_loss
from cankd_jax.detection.postprocess import (
    Detections, PostprocessConfig, _check_levels, _finish, _level_topk,
)

Array = jax.Array

REPPOINTS_STRIDES = (8, 16, 32, 64, 128)
REPPOINTS_TEST_CFG = PostprocessConfig(iou_threshold=0.5)  # reppoints-moment_r50_fpn-gn_head-gn_*: nms 0.5, 100


class ReppointsLossConfig(NamedTuple):
    """mmdet's `RepPointsHead` defaults and the moment configs' train_cfg."""

    point_base_scale: int = 4
    assigner_scale: int = 4  # PointAssigner(scale=4, pos_num=1)
    pos_iou_thr: float = 0.5  # refine: MaxIoUAssigner(0.5, 0.4, min_pos_iou=0)
    neg_iou_thr: float = 0.4
    min_pos_iou: float = 0.0
    beta: float = 0.11  # SmoothL1Loss(beta=0.11)
    init_weight: float = 0.5
    refine_weight: float = 1.0
    gamma: float = 2.0  # FocalLoss
    alpha: float = 0.25


REPPOINTS_LOSS_CFG = ReppointsLossConfig()


def points_to_boxes(pts: Array, moment_transfer: Array, *, y_first: bool = True) -> Array:
    """mmdet's `points2bbox` with `transform_method='moment'`: `(..., 2 * n)` point sets -> `(..., 4)` boxes.

    `pts` holds n (y, x) pairs (`y_first`, the head's layout) or (x, y) pairs; `moment_transfer` `(2,)` is the
    head's (width, height) log-scale, already mixed for its gradient (`RepPointsHead`'s output). The standard
    deviation is PyTorch's default, unbiased (n - 1), of the centred coordinates, as mmdet computes it.
    """
    pts = pts.reshape(*pts.shape[:-1], -1, 2)
    ys, xs = (pts[..., 0], pts[..., 1]) if y_first else (pts[..., 1], pts[..., 0])
    y_mean, x_mean = jnp.mean(ys, -1, keepdims=True), jnp.mean(xs, -1, keepdims=True)
    y_std = jnp.std(ys - y_mean, -1, keepdims=True, ddof=1)
    x_std = jnp.std(xs - x_mean, -1, keepdims=True, ddof=1)
    half_w = x_std * jnp.exp(moment_transfer[0])
    half_h = y_std * jnp.exp(moment_transfer[1])
    return jnp.concatenate([x_mean - half_w, y_mean - half_h, x_mean + half_w, y_mean + half_h], -1)


def level_points(featmap_sizes: Sequence[tuple[int, int]], strides: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """mmdet's `MlvlPointGenerator(strides, offset=0)` over every level (`anchors.grid_points` with `offset=0`):
    `(N, 2)` points `(x * s, y * s)`, row-major per level, finest level first, and `(N,)` each point's stride
    (float32)."""
    if len(featmap_sizes) != len(strides):
        raise ValueError(f"RepPoints: {len(featmap_sizes)} feature-map sizes for {len(strides)} strides")
    pts = grid_points(featmap_sizes, strides, offset=0.0)
    return np.concatenate(pts), np.concatenate([np.full(len(p), s, np.float32) for p, s in zip(pts, strides)])


def point_valid_flags(featmap_sizes: Sequence[tuple[int, int]], strides: Sequence[int], pad_shape: Array) -> Array:
    """`MlvlPointGenerator.valid_flags`: a location is valid when it lies within `ceil(pad / stride)` of the
    level's map in both axes. `pad_shape` `(2,)` = (h, w) of the padded input -> `(N,)` bool."""
    flags = []
    for (h, w), s in zip(featmap_sizes, strides):
        vh = jnp.minimum(jnp.ceil(pad_shape[0] / s), h)
        vw = jnp.minimum(jnp.ceil(pad_shape[1] / s), w)
        flags.append(((jnp.arange(h)[:, None] < vh) & (jnp.arange(w)[None, :] < vw)).reshape(-1))
    return jnp.concatenate(flags)


def point_assign(points: Array, strides: Array, valid: Array, gt_boxes: Array, gt_valid: Array, *,
                 scale: int = 4, pos_num: int = 1) -> Array:
    """mmdet's `PointAssigner`: `(N,)` int32, each location's 0-based gt or `BACKGROUND` (an invalid one `IGNORE`).

    points `(N, 2)` (x, y) pixels; strides `(N,)`; valid `(N,)` (mmdet drops invalid locations before assigning);
    gt_boxes `(G, 4)`, gt_valid `(G,)`. A gt's level is `int((log2(w / scale) + log2(h / scale)) / 2)` (towards
    zero), clamped to the levels present; its `pos_num` nearest locations of that level by
    `|(p - centre) / (w, h)|` are taken where nearer than what an earlier gt gave them, gts in index order.
    """
    chex.assert_rank(points, 2)
    _check_gt(gt_boxes, gt_valid)
    points, gt_boxes = jnp.asarray(points, jnp.float32), jnp.asarray(gt_boxes, jnp.float32)
    lvl = jnp.log2(jnp.asarray(strides, jnp.float32)).astype(jnp.int32)
    big = jnp.iinfo(jnp.int32).max
    lvl_min = jnp.min(jnp.where(valid, lvl, big))
    lvl_max = jnp.max(jnp.where(valid, lvl, -big))
    xy = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    wh = jnp.maximum(gt_boxes[:, 2:] - gt_boxes[:, :2], 1e-6)
    gt_lvl = ((jnp.log2(wh[:, 0] / scale) + jnp.log2(wh[:, 1] / scale)) / 2).astype(jnp.int32)  # .int(): to 0
    gt_lvl = jnp.clip(gt_lvl, lvl_min, lvl_max)

    def one_gt(carry, g):
        inds, dist = carry
        d = jnp.linalg.norm((points - xy[g]) / wh[g], axis=1)
        d = jnp.where((lvl == gt_lvl[g]) & valid, d, jnp.inf)
        neg_top, idx = jax.lax.top_k(-d, pos_num)  # top_k: the lower index first on ties
        min_d = -neg_top
        take = (min_d < dist[idx]) & gt_valid[g] & jnp.isfinite(min_d)
        inds = inds.at[idx].set(jnp.where(take, g, inds[idx]))
        dist = dist.at[idx].set(jnp.where(take, min_d, dist[idx]))
        return (inds, dist), None

    n = points.shape[0]
    init = (jnp.full((n,), BACKGROUND, jnp.int32), jnp.full((n,), jnp.inf, jnp.float32))
    (inds, _), _ = jax.lax.scan(one_gt, init, jnp.arange(gt_boxes.shape[0]))
    return jnp.where(valid, inds, IGNORE)


class ReppointsTargets(NamedTuple):
    """One image's targets over its N locations (every level, finest first): init-stage `bbox_gt_init (N, 4)`,
    `pos_init (N,)`; refine-stage `labels (N,)` (gt label, or `num_classes` for background), `label_weights (N,)`
    (1 for positives and negatives, 0 for ignored and invalid), `bbox_gt_refine (N, 4)`, `pos_refine (N,)`."""

    bbox_gt_init: Array
    pos_init: Array
    labels: Array
    label_weights: Array
    bbox_gt_refine: Array
    pos_refine: Array


def reppoints_targets(init_boxes: Array, points: Array, strides: Array, valid: Array, gt_boxes: Array,
                      gt_labels: Array, gt_valid: Array, *, num_classes: int,
                      cfg: ReppointsLossConfig = REPPOINTS_LOSS_CFG) -> ReppointsTargets:
    """One image: `init_boxes (N, 4)` are the initial point sets' boxes in pixels (the refine stage's proposals:
    `points_to_boxes(pts_init) * stride + (x, y, x, y)`, detached), `points`, `strides`, `valid` as in
    `point_assign`."""
    init = point_assign(points, strides, valid, gt_boxes, gt_valid, scale=cfg.assigner_scale)
    pos_init = init >= 0
    refine = max_iou_assign(jax.lax.stop_gradient(init_boxes), gt_boxes, gt_valid, valid, pos_iou_thr=cfg.pos_iou_thr,
                            neg_iou_thr=cfg.neg_iou_thr, min_pos_iou=cfg.min_pos_iou).gt_inds
    pos_refine = refine >= 0
    gt_for = lambda inds: jnp.asarray(gt_boxes, jnp.float32)[jnp.maximum(inds, 0)]  # noqa: E731
    return ReppointsTargets(
        bbox_gt_init=jnp.where(pos_init[:, None], gt_for(init), 0.0),
        pos_init=pos_init,
        labels=jnp.where(pos_refine, jnp.asarray(gt_labels, jnp.int32)[jnp.maximum(refine, 0)], num_classes),
        label_weights=((refine >= 0) | (refine == BACKGROUND)).astype(jnp.float32),
        bbox_gt_refine=jnp.where(pos_refine[:, None], gt_for(refine), 0.0),
        pos_refine=pos_refine,
    )


def absolute_points(pts: Array, points: Array, strides: Array) -> Array:
    """mmdet's `offset_to_pts`: `(..., N, 2n)` (y, x) offsets in strides -> (x, y) pixels `(..., N, 2n)`."""
    yx = pts.reshape(*pts.shape[:-1], -1, 2)
    xy = jnp.stack([yx[..., 1], yx[..., 0]], -1).reshape(pts.shape)
    centre = jnp.tile(jnp.asarray(points, jnp.float32), (1, pts.shape[-1] // 2))
    return xy * jnp.asarray(strides, jnp.float32)[:, None] + centre


def proposal_boxes(pts_init: Array, moment_transfer: Array, points: Array, strides: Array) -> Array:
    """The refine stage's proposals: `points_to_boxes(pts_init)` (y first, in strides) `* stride + (x, y, x, y)`,
    detached, as mmdet's `loss_by_feat`. `(..., N, 2n) -> (..., N, 4)` pixels."""
    boxes = points_to_boxes(jax.lax.stop_gradient(pts_init), moment_transfer)
    s = jnp.asarray(strides, jnp.float32)[:, None]
    return boxes * s + jnp.tile(jnp.asarray(points, jnp.float32), (1, 2))


def reppoints_loss(cls_logits: Array, pts_init: Array, pts_refine: Array, moment_transfer: Array, points: Array,
                   strides: Array, targets: ReppointsTargets, *,
                   cfg: ReppointsLossConfig = REPPOINTS_LOSS_CFG) -> dict[str, Array]:
    """`loss_cls`, `loss_pts_init`, `loss_pts_refine` of a batch: cls_logits `(B, N, K)`, pts_init / pts_refine
    `(B, N, 2n)` (y, x) offsets in strides, `moment_transfer (2,)`, points `(N, 2)`, strides `(N,)`, targets
    with a leading B. Each term is normalised by the batch's positives of its stage (mmdet's average factor)."""
    k = cls_logits.shape[-1]
    avg_init = jnp.sum(targets.pos_init).astype(jnp.float32)
    avg_refine = jnp.sum(targets.pos_refine).astype(jnp.float32)
    loss_cls = sigmoid_focal_loss(cls_logits.reshape(-1, k), targets.labels.reshape(-1),
                                  targets.label_weights.reshape(-1), gamma=cfg.gamma, alpha=cfg.alpha,
                                  avg_factor=avg_refine)
    norm = (cfg.point_base_scale * jnp.asarray(strides, jnp.float32))[:, None]

    def box_loss(pts, gt, pos, avg, weight):
        boxes = points_to_boxes(absolute_points(pts, points, strides), moment_transfer, y_first=False)
        w = jnp.broadcast_to(pos[..., None], gt.shape).astype(jnp.float32)
        return weight * smooth_l1_loss((boxes / norm).reshape(-1, 4), (gt / norm).reshape(-1, 4), w.reshape(-1, 4),
                                       beta=cfg.beta, avg_factor=avg)

    return {"loss_cls": loss_cls,
            "loss_pts_init": box_loss(pts_init, targets.bbox_gt_init, targets.pos_init, avg_init, cfg.init_weight),
            "loss_pts_refine": box_loss(pts_refine, targets.bbox_gt_refine, targets.pos_refine, avg_refine,
                                        cfg.refine_weight)}


def reppoints_postprocess_single(cls_logits: Sequence[Array], bbox_pred: Sequence[Array], points: Sequence[Array],
                                 strides: Sequence[int], img_shape: Array, scale_factor: Optional[Array] = None, *,
                                 cfg: PostprocessConfig = REPPOINTS_TEST_CFG) -> Detections:
    """One image. Per level l: cls_logits `(N_l, C)`, bbox_pred `(N_l, 4)` (the head's test-time boxes, in units
    of the stride around the location), points `(N_l, 2)` (`level_points`' for that level), strides one int per
    level. img_shape, scale_factor as in `retinanet_postprocess_single`."""
    _check_levels(cls_logits, bbox_pred, points, 2, img_shape, scale_factor)
    if len(strides) != len(points):
        raise ValueError("RepPoints post-processing needs one stride per level")
    sc, boxes, lab, val = [], [], [], []
    for cl, bp, pt, s in zip(cls_logits, bbox_pred, points, strides):
        top, loc, cls, ok = _level_topk(cl, cfg.score_thr, cfg.nms_pre)
        pt = jnp.asarray(pt, jnp.float32)[loc]
        b = jnp.asarray(bp, jnp.float32)[loc] * float(s) + jnp.concatenate([pt, pt], -1)
        boxes.append(clip_boxes(b, img_shape)), sc.append(top), lab.append(cls), val.append(ok)
    return _finish(jnp.concatenate(boxes), jnp.concatenate(sc), jnp.concatenate(lab), jnp.concatenate(val),
                   scale_factor, cfg)


def reppoints_postprocess(cls_logits: Sequence[Array], bbox_pred: Sequence[Array], points: Sequence[Array],
                          strides: Sequence[int], img_shapes: Array, scale_factors: Optional[Array] = None, *,
                          cfg: PostprocessConfig = REPPOINTS_TEST_CFG) -> Detections:
    """Batched `reppoints_postprocess_single`: per level `(B, N_l, C)` and `(B, N_l, 4)`, shared points."""
    def one(cl, bp, shape, sf):
        return reppoints_postprocess_single(cl, bp, points, strides, shape, sf, cfg=cfg)

    return jax.vmap(one)(list(cls_logits), list(bbox_pred), jnp.asarray(img_shapes, jnp.float32),
                         None if scale_factors is None else jnp.asarray(scale_factors, jnp.float32))

