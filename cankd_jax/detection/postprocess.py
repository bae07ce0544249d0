"""RetinaNet / FCOS test-time post-processing on static shapes (mmdet 3.x `BaseDenseHead.predict_by_feat`).

Per image (vmapped over the batch), as mmdet's `_predict_by_feat_single` +
`_bbox_post_process`:

1. per level, sigmoid scores over every (prior, class) pair; pairs with
   score > `score_thr` (strictly) are candidates; the best `nms_pre` candidates of
   the level by score (ties: lower (prior, class) index first) go on, so one prior
   can yield several classes;
2. levels concatenated; boxes decoded from the priors (RetinaNet: deltas from
   anchors; FCOS: distances from points) and clipped to the image's un-padded shape;
3. boxes rescaled to the original image (divided by the resize scale factor), before NMS,
   as mmdet does;
4. FCOS only: scores multiplied by the sigmoid of the centerness, after the threshold
   and the top-k (mmdet 3.x multiplies, `scores * score_factors`, no square root);
5. `min_bbox_size=0` filter: boxes of zero width or height are dropped (mmdet keeps
   `w > 0 and h > 0` whenever `min_bbox_size >= 0`);
6. class-aware NMS (`nms.batched_nms`) and the best `max_per_img`.

Output padding: boxes and scores 0, labels -1, after `num_valid`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from cankd_jax.detection.boxes import DeltaXYWHCoder, DistancePointCoder, rescale_boxes
from cankd_jax.detection.nms import NMSResult, batched_nms
from cankd_jax.detection.topk import top_k

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PostprocessConfig:
    """mmdet `test_cfg` of the one-stage heads."""

    score_thr: float = 0.05
    nms_pre: int = 1000
    iou_threshold: float = 0.5
    max_per_img: int = 100
    min_bbox_size: Optional[float] = 0.0  # None: no size filter (mmdet's -1)


RETINANET_TEST_CFG = PostprocessConfig(iou_threshold=0.5)
FCOS_TEST_CFG = PostprocessConfig(iou_threshold=0.6)  # the center-normbbox-centeronreg-giou config


class Detections(NamedTuple):
    """boxes `(..., max_per_img, 4)` pixels of the original image; scores `(..., max_per_img)`;
    labels `(..., max_per_img)` int32 (-1 for padding); num_valid `(...)` int32."""

    boxes: Array
    scores: Array
    labels: Array
    num_valid: Array


def _level_topk(logits: Array, score_thr: float, nms_pre: int):
    """One level's `(N, C)` logits -> top-k (scores, prior index, class, candidate mask), k = min(nms_pre, N*C)."""
    n, c = logits.shape
    scores = jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(-1)
    cand = scores > score_thr
    # Sigmoid scores are >= 0, so -1 ranks every non-candidate below every candidate;
    # top_k puts the lower index first on ties, which is a stable descending sort.
    top, flat = top_k(jnp.where(cand, scores, -1.0), min(nms_pre, n * c))
    return top, flat // c, flat % c, top > score_thr


def _finish(boxes, scores, labels, valid, scale_factor, cfg: PostprocessConfig) -> Detections:
    if scale_factor is not None:
        boxes = rescale_boxes(boxes, scale_factor)
    if cfg.min_bbox_size is not None:
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        valid = valid & (w > cfg.min_bbox_size) & (h > cfg.min_bbox_size)
    res = batched_nms(boxes, scores, labels, valid, iou_threshold=cfg.iou_threshold, max_out=cfg.max_per_img)
    return kept_detections(boxes, scores, labels, res)


def kept_detections(boxes: Array, scores: Array, labels: Array, res: NMSResult) -> Detections:
    """The candidates NMS kept, best first, as `Detections` (zero boxes and scores, label -1 after `num_kept`)."""
    ok = res.keep >= 0
    idx = jnp.maximum(res.keep, 0)
    return Detections(
        boxes=jnp.where(ok[:, None], boxes[idx], 0.0),
        scores=jnp.where(ok, scores[idx], 0.0),
        labels=jnp.where(ok, labels[idx], -1).astype(jnp.int32),
        num_valid=res.num_kept,
    )


def _check_levels(cls_logits, bbox_pred, priors, prior_dim, img_shape, scale_factor):
    # np.shape: tuples are accepted as well as (traced) arrays.
    if np.shape(img_shape) != (2,) or (scale_factor is not None and np.shape(scale_factor) != (2,)):
        raise ValueError(f"post-processing takes one image's (h, w) and (w_scale, h_scale), got shapes "
                         f"{np.shape(img_shape)} and {None if scale_factor is None else np.shape(scale_factor)}")
    if not len(cls_logits) == len(bbox_pred) == len(priors):
        raise ValueError("post-processing needs one cls, bbox and prior array per level")
    for cl, bp, pr in zip(cls_logits, bbox_pred, priors):
        chex.assert_rank(cl, 2)
        chex.assert_shape(bp, (cl.shape[0], 4))
        chex.assert_shape(pr, (cl.shape[0], prior_dim))


def retinanet_postprocess_single(
    cls_logits: Sequence[Array],
    bbox_pred: Sequence[Array],
    anchors: Sequence[Array],
    img_shape: Array,
    scale_factor: Optional[Array] = None,
    *,
    cfg: PostprocessConfig = RETINANET_TEST_CFG,
    coder: DeltaXYWHCoder = DeltaXYWHCoder(),
) -> Detections:
    """One image. Per level l: cls_logits `(N_l, C)`, bbox_pred `(N_l, 4)` deltas, anchors `(N_l, 4)`
    (N_l = H_l * W_l * 9, the order of `anchors.AnchorGenerator`). img_shape `(2,)` = (h, w) of the
    resized, un-padded image; scale_factor `(2,)` = (w_scale, h_scale) resized / original, or None
    to stay in network-input pixels. Returns `Detections` with `max_per_img` rows."""
    _check_levels(cls_logits, bbox_pred, anchors, 4, img_shape, scale_factor)
    sc, pri, dl, lab, val = [], [], [], [], []
    for cl, bp, an in zip(cls_logits, bbox_pred, anchors):
        top, loc, cls, ok = _level_topk(cl, cfg.score_thr, cfg.nms_pre)
        sc.append(top), lab.append(cls), val.append(ok)
        dl.append(jnp.asarray(bp, jnp.float32)[loc]), pri.append(jnp.asarray(an, jnp.float32)[loc])
    boxes = coder.decode(jnp.concatenate(pri), jnp.concatenate(dl), max_shape=img_shape)
    return _finish(boxes, jnp.concatenate(sc), jnp.concatenate(lab), jnp.concatenate(val), scale_factor, cfg)


def fcos_postprocess_single(
    cls_logits: Sequence[Array],
    bbox_pred: Sequence[Array],
    centerness: Sequence[Array],
    points: Sequence[Array],
    strides: Sequence[int],
    img_shape: Array,
    scale_factor: Optional[Array] = None,
    *,
    cfg: PostprocessConfig = FCOS_TEST_CFG,
) -> Detections:
    """One image. Per level l: cls_logits `(N_l, C)`, bbox_pred `(N_l, 4)` distances (l, t, r, b) in
    units of the level's stride (the head's ReLU'd output with `norm_on_bbox`, which mmdet's head
    multiplies by the stride at test time, as done here), centerness `(N_l,)` logits, points
    `(N_l, 2)` (`anchors.grid_points`), strides: one int per level. img_shape, scale_factor as in
    `retinanet_postprocess_single`."""
    _check_levels(cls_logits, bbox_pred, points, 2, img_shape, scale_factor)
    if not len(centerness) == len(strides) == len(points):
        raise ValueError("fcos post-processing needs one centerness array and one stride per level")
    sc, pts, dist, lab, val = [], [], [], [], []
    for cl, bp, ct, pt, s in zip(cls_logits, bbox_pred, centerness, points, strides):
        chex.assert_shape(ct, (cl.shape[0],))
        top, loc, cls, ok = _level_topk(cl, cfg.score_thr, cfg.nms_pre)
        # The threshold and top-k are on the class score alone; the centerness factor comes after.
        sc.append(top * jax.nn.sigmoid(jnp.asarray(ct, jnp.float32)[loc]))
        lab.append(cls), val.append(ok)
        dist.append(jnp.asarray(bp, jnp.float32)[loc] * float(s)), pts.append(jnp.asarray(pt, jnp.float32)[loc])
    boxes = DistancePointCoder().decode(jnp.concatenate(pts), jnp.concatenate(dist), max_shape=img_shape)
    return _finish(boxes, jnp.concatenate(sc), jnp.concatenate(lab), jnp.concatenate(val), scale_factor, cfg)


def retinanet_postprocess(cls_logits: Sequence[Array], bbox_pred: Sequence[Array], anchors: Sequence[Array],
                          img_shapes: Array, scale_factors: Optional[Array] = None, *,
                          cfg: PostprocessConfig = RETINANET_TEST_CFG) -> Detections:
    """Batched `retinanet_postprocess_single`: per level `(B, N_l, C)` and `(B, N_l, 4)`, shared
    anchors `(N_l, 4)`, img_shapes `(B, 2)`, scale_factors `(B, 2)` or None -> `Detections` with a
    leading B."""
    def one(cl, bp, shape, sf):
        return retinanet_postprocess_single(cl, bp, anchors, shape, sf, cfg=cfg)

    return jax.vmap(one)(list(cls_logits), list(bbox_pred), jnp.asarray(img_shapes, jnp.float32),
                         None if scale_factors is None else jnp.asarray(scale_factors, jnp.float32))


def fcos_postprocess(cls_logits: Sequence[Array], bbox_pred: Sequence[Array], centerness: Sequence[Array],
                     points: Sequence[Array], strides: Sequence[int], img_shapes: Array,
                     scale_factors: Optional[Array] = None, *, cfg: PostprocessConfig = FCOS_TEST_CFG) -> Detections:
    """Batched `fcos_postprocess_single`: per level `(B, N_l, C)`, `(B, N_l, 4)`, `(B, N_l)`, shared
    points `(N_l, 2)`, img_shapes `(B, 2)`, scale_factors `(B, 2)` or None."""
    def one(cl, bp, ct, shape, sf):
        return fcos_postprocess_single(cl, bp, ct, points, strides, shape, sf, cfg=cfg)

    return jax.vmap(one)(list(cls_logits), list(bbox_pred), list(centerness), jnp.asarray(img_shapes, jnp.float32),
                         None if scale_factors is None else jnp.asarray(scale_factors, jnp.float32))
