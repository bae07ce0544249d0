"""Box arithmetic with mmdetection 3.x semantics: areas, IoU/GIoU, the two box coders.

Boxes are `x1y1x2y2` in pixels of the (resized) network input; a width is
`x2 - x1` (no "+1", as mmdet 3.x). Everything is float32, shape-polymorphic over
leading axes where it says `(..., 4)`, and jit/vmap-friendly: image shapes may be
traced arrays, so a batch of images of different sizes can be vmapped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union

import chex
import jax
import jax.numpy as jnp

Array = jax.Array
# (h, w) of an image: a static tuple or a traced array of shape (2,), e.g. one row of a batch's shapes.
Shape2 = Union[Sequence[float], Array]

IOU_EPS = 1e-6  # mmdet's bbox_overlaps: IoU = overlap / max(union, 1e-6)


def _f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


def box_area(boxes: Array) -> Array:
    """`(..., 4) -> (...)`: `(x2 - x1) * (y2 - y1)`, pixels^2 (negative for inverted boxes, as mmdet)."""
    boxes = _f32(boxes)
    chex.assert_axis_dimension(boxes, -1, 4)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_iou(boxes1: Array, boxes2: Array, eps: float = IOU_EPS) -> Array:
    """IoU of every pair: `(N, 4), (M, 4) -> (N, M)`.

    The same float32 expression order as mmdet's `bbox_overlaps(mode='iou')`
    (`area1[:, None] + area2[None] - overlap`, then `max(union, eps)`), so that
    exact ties, which the max-IoU assigner compares with `==`, fall where mmdet's do.
    """
    boxes1, boxes2 = _f32(boxes1), _f32(boxes2)
    chex.assert_rank([boxes1, boxes2], 2)
    chex.assert_axis_dimension(boxes1, 1, 4)
    chex.assert_axis_dimension(boxes2, 1, 4)
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = jnp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = jnp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - overlap
    return overlap / jnp.maximum(union, eps)


def _aligned_terms(boxes1: Array, boxes2: Array):
    boxes1, boxes2 = _f32(boxes1), _f32(boxes2)
    chex.assert_equal_shape([boxes1, boxes2])
    chex.assert_axis_dimension(boxes1, -1, 4)
    lt = jnp.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    overlap = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1) + box_area(boxes2) - overlap
    return boxes1, boxes2, overlap, union


def aligned_iou(boxes1: Array, boxes2: Array, eps: float = IOU_EPS) -> Array:
    """IoU of corresponding boxes: `(..., 4), (..., 4) -> (...)`."""
    _, _, overlap, union = _aligned_terms(boxes1, boxes2)
    return overlap / jnp.maximum(union, eps)


def aligned_giou(boxes1: Array, boxes2: Array, eps: float = IOU_EPS) -> Array:
    """Generalised IoU of corresponding boxes: `(..., 4), (..., 4) -> (...)`, in [-1, 1].

    mmdet's `bbox_overlaps(mode='giou', is_aligned=True)`: the union and the
    enclosing box's area are each floored at `eps` (GIoULoss passes its own eps, 1e-6).
    """
    b1, b2, overlap, union = _aligned_terms(boxes1, boxes2)
    union = jnp.maximum(union, eps)
    iou = overlap / union
    enclose_wh = jnp.maximum(jnp.maximum(b1[..., 2:], b2[..., 2:]) - jnp.minimum(b1[..., :2], b2[..., :2]), 0.0)
    enclose = jnp.maximum(enclose_wh[..., 0] * enclose_wh[..., 1], eps)
    return iou - (enclose - union) / enclose


def clip_boxes(boxes: Array, img_shape: Shape2) -> Array:
    """Clamp x into [0, w] and y into [0, h]: `(..., 4) -> (..., 4)`; `img_shape = (h, w)`."""
    boxes = _f32(boxes)
    chex.assert_axis_dimension(boxes, -1, 4)
    h, w = _f32(img_shape)[0], _f32(img_shape)[1]
    hi = jnp.stack([w, h, w, h])
    return jnp.minimum(jnp.maximum(boxes, 0.0), hi)


def rescale_boxes(boxes: Array, scale_factor: Shape2) -> Array:
    """Map boxes from the resized image back to the original one: `(..., 4) -> (..., 4)`.

    `scale_factor = (w_scale, h_scale)`, mmdet's `img_meta['scale_factor']` (resized /
    original). Like mmdet's `scale_boxes(boxes, [1 / s for s in scale_factor])`, this
    multiplies by the reciprocals.
    """
    boxes = _f32(boxes)
    chex.assert_axis_dimension(boxes, -1, 4)
    sf = _f32(scale_factor)
    inv = 1.0 / jnp.stack([sf[0], sf[1], sf[0], sf[1]])
    return boxes * inv


@dataclasses.dataclass(frozen=True)
class DeltaXYWHCoder:
    """mmdet's `DeltaXYWHBBoxCoder`: boxes as (dx, dy, dw, dh) offsets from a prior box.

    `encode(priors, gt)`: `dx = (gx - px) / pw`, `dy = (gy - py) / ph`,
    `dw = log(gw / pw)`, `dh = log(gh / ph)` (centres and sizes of x1y1x2y2 boxes),
    then `(delta - means) / stds`. `decode` inverts it with `dw, dh` clamped to
    `+-|log(wh_ratio_clip)|` (a box at most 62.5x / at least 1/62.5 its prior's size) and,
    when `clip_border` and a `max_shape = (h, w)` are given, the result clamped to the image.
    RetinaNet uses means 0, stds 1.
    """

    means: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    wh_ratio_clip: float = 16 / 1000
    clip_border: bool = True

    def encode(self, priors: Array, gt_boxes: Array) -> Array:
        """`(..., 4) priors, (..., 4) gt boxes -> (..., 4)` deltas (unitless)."""
        p, g = _f32(priors), _f32(gt_boxes)
        chex.assert_equal_shape([p, g])
        chex.assert_axis_dimension(p, -1, 4)
        px, py = (p[..., 0] + p[..., 2]) * 0.5, (p[..., 1] + p[..., 3]) * 0.5
        pw, ph = p[..., 2] - p[..., 0], p[..., 3] - p[..., 1]
        gx, gy = (g[..., 0] + g[..., 2]) * 0.5, (g[..., 1] + g[..., 3]) * 0.5
        gw, gh = g[..., 2] - g[..., 0], g[..., 3] - g[..., 1]
        d = jnp.stack([(gx - px) / pw, (gy - py) / ph, jnp.log(gw / pw), jnp.log(gh / ph)], axis=-1)
        return (d - _f32(self.means)) / _f32(self.stds)

    def decode(self, priors: Array, deltas: Array, max_shape: Optional[Shape2] = None) -> Array:
        """`(..., 4) priors, (..., 4) deltas -> (..., 4)` boxes in pixels; `max_shape = (h, w)`."""
        p, d = _f32(priors), _f32(deltas)
        chex.assert_equal_shape([p, d])
        chex.assert_axis_dimension(p, -1, 4)
        d = d * _f32(self.stds) + _f32(self.means)
        # The clamp bound is computed in float64 and then rounded, as mmdet's numpy scalar is.
        max_ratio = abs(math.log(self.wh_ratio_clip))
        pxy = (p[..., :2] + p[..., 2:]) * 0.5
        pwh = p[..., 2:] - p[..., :2]
        gxy = pxy + pwh * d[..., :2]
        gwh = pwh * jnp.exp(jnp.clip(d[..., 2:], -max_ratio, max_ratio))
        boxes = jnp.concatenate([gxy - gwh * 0.5, gxy + gwh * 0.5], axis=-1)
        if self.clip_border and max_shape is not None:
            boxes = clip_boxes(boxes, max_shape)
        return boxes


@dataclasses.dataclass(frozen=True)
class DistancePointCoder:
    """mmdet's `DistancePointBBoxCoder` (FCOS): a box as distances from a point inside it.

    `encode(points, boxes) -> (left, top, right, bottom) = (x - x1, y - y1, x2 - x, y2 - y)`
    (no clamping: mmdet's `max_dis` is unused by FCOS); `decode` inverts it and, when
    `clip_border` and a `max_shape = (h, w)` are given, clamps the box to the image.
    Units are whatever the distances are in: pixels at test time; FCOS's normalised
    training targets are in strides (see `assigners.fcos_targets`).
    """

    clip_border: bool = True

    def encode(self, points: Array, boxes: Array) -> Array:
        """`(..., 2) points (x, y), (..., 4) boxes -> (..., 4)` distances (l, t, r, b)."""
        pt, b = _f32(points), _f32(boxes)
        chex.assert_axis_dimension(pt, -1, 2)
        chex.assert_axis_dimension(b, -1, 4)
        chex.assert_equal_shape_prefix([pt, b], pt.ndim - 1)
        x, y = pt[..., 0], pt[..., 1]
        return jnp.stack([x - b[..., 0], y - b[..., 1], b[..., 2] - x, b[..., 3] - y], axis=-1)

    def decode(self, points: Array, distances: Array, max_shape: Optional[Shape2] = None) -> Array:
        """`(..., 2) points, (..., 4) distances (l, t, r, b) -> (..., 4)` boxes."""
        pt, d = _f32(points), _f32(distances)
        chex.assert_axis_dimension(pt, -1, 2)
        chex.assert_axis_dimension(d, -1, 4)
        chex.assert_equal_shape_prefix([pt, d], pt.ndim - 1)
        x, y = pt[..., 0], pt[..., 1]
        boxes = jnp.stack([x - d[..., 0], y - d[..., 1], x + d[..., 2], y + d[..., 3]], axis=-1)
        if self.clip_border and max_shape is not None:
            boxes = clip_boxes(boxes, max_shape)
        return boxes
