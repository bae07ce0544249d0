"""One-to-one matching of queries to ground truth (DETR, DINO): mmdet 3.x's `HungarianAssigner` and its match
costs, inside a jitted step.

One image at a time (vmap over the batch), static shapes: `Q` queries against ground truth padded to `G`
(`gt_valid (G,)` bool). The costs are mmdet's `FocalLossCost`, `BBoxL1Cost` and `IoUCost` written as the same
float32 expressions; the assignment is `optax.assignment.hungarian_algorithm` on the summed `(Q, G)` cost,
which minimises the same total as mmdet's `scipy.optimize.linear_sum_assignment` (the assignment is the same
wherever the minimum is unique, as it is for costs from continuous predictions).

Padded ground truth: its column of the cost is set to 0 for every query. With `Q >= G` every column is
matched, and a constant column adds the same amount to every assignment, so the valid columns' matching is
the one mmdet computes on the valid ground truth alone; the queries the padded columns take are then
released to the background.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import chex
import jax
import jax.numpy as jnp
from optax.assignment import hungarian_algorithm

from cankd_jax.detection.assigners import BACKGROUND
from cankd_jax.detection.boxes import aligned_giou

Array = jax.Array
Shape2 = Union[Sequence[float], Array]


def xyxy_to_cxcywh(boxes: Array) -> Array:
    """`(..., 4)` corners -> centre and size, mmdet's `bbox_xyxy_to_cxcywh` (same expression order)."""
    x1, y1, x2, y2 = jnp.split(boxes, 4, axis=-1)
    return jnp.concatenate([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def cxcywh_to_xyxy(boxes: Array) -> Array:
    """`(..., 4)` centre and size -> corners, mmdet's `bbox_cxcywh_to_xyxy` (same expression order)."""
    cx, cy, w, h = jnp.split(boxes, 4, axis=-1)
    return jnp.concatenate([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def focal_cost(logits: Array, gt_labels: Array, *, alpha: float = 0.25, gamma: float = 2.0,
               eps: float = 1e-12) -> Array:
    """mmdet's `FocalLossCost` before its weight: `logits (Q, K)`, `gt_labels (G,)` -> `(Q, G)`, the focal
    loss of calling each query a positive of each ground truth's class minus that of calling it negative."""
    p = jax.nn.sigmoid(logits)
    neg = -jnp.log(1 - p + eps) * (1 - alpha) * p ** gamma
    pos = -jnp.log(p + eps) * alpha * (1 - p) ** gamma
    return pos[:, gt_labels] - neg[:, gt_labels]


def l1_cost(pred_boxes: Array, gt_boxes: Array, img_shape: Shape2, box_format: str = "xywh") -> Array:
    """mmdet's `BBoxL1Cost` before its weight: boxes `(Q, 4)`, `(G, 4)` x1y1x2y2 pixels -> `(Q, G)`, the L1
    distance of the boxes (as centre and size for 'xywh', DETR's and DINO's choice) normalised by the
    image's `(h, w)`."""
    if box_format not in ("xyxy", "xywh"):
        raise ValueError(f"unknown box_format {box_format!r}; choose 'xyxy' or 'xywh'")
    if box_format == "xywh":
        pred_boxes, gt_boxes = xyxy_to_cxcywh(pred_boxes), xyxy_to_cxcywh(gt_boxes)
    h, w = img_shape[0], img_shape[1]
    factor = jnp.stack([w, h, w, h]).astype(jnp.float32)
    return jnp.abs((pred_boxes / factor)[:, None, :] - (gt_boxes / factor)[None, :, :]).sum(-1)


def giou_cost(pred_boxes: Array, gt_boxes: Array) -> Array:
    """mmdet's `IoUCost(iou_mode='giou')` before its weight: `-GIoU`, `(Q, 4), (G, 4) -> (Q, G)`."""
    return -aligned_giou(*jnp.broadcast_arrays(pred_boxes[:, None, :], gt_boxes[None, :, :]))


class HungarianMatch(NamedTuple):
    """gt_inds `(Q,)` int32: the 0-based ground truth a query is matched to, `BACKGROUND` (-1) for the rest;
    cost `(Q, G)` float32: the weighted cost the matching minimised (padded columns 0)."""

    gt_inds: Array
    cost: Array


def match_cost(logits: Array, pred_boxes: Array, gt_boxes: Array, gt_labels: Array, img_shape: Shape2, *,
               cls_weight: float = 2.0, l1_weight: float = 5.0, iou_weight: float = 2.0,
               box_format: str = "xywh", alpha: float = 0.25, gamma: float = 2.0) -> Array:
    """The `(Q, G)` cost of DINO's `HungarianAssigner`: focal (2.0) + L1 on normalised centre/size (5.0) +
    -GIoU (2.0), summed in that order as mmdet stacks and sums them. Boxes are x1y1x2y2 pixels."""
    costs = (focal_cost(logits, gt_labels, alpha=alpha, gamma=gamma) * cls_weight,
             l1_cost(pred_boxes, gt_boxes, img_shape, box_format) * l1_weight,
             giou_cost(pred_boxes, gt_boxes) * iou_weight)
    return costs[0] + costs[1] + costs[2]


def hungarian_assign(cost: Array, gt_valid: Array) -> HungarianMatch:
    """Match each valid ground truth (a column of `cost (Q, G)`) to its own query minimising the total cost.

    Needs `Q >= G` (DETR-style: more queries than padded ground truth), checked at trace time. Returns every
    query's matched ground truth or `BACKGROUND`."""
    chex.assert_rank(cost, 2)
    q, g = cost.shape
    chex.assert_shape(gt_valid, (g,))
    if g > q:
        raise ValueError(f"{g} padded ground-truth boxes but only {q} queries: the matching needs queries >= boxes")
    cost = jnp.where(gt_valid[None, :], cost, 0.0)
    if g == 0:
        return HungarianMatch(jnp.full((q,), BACKGROUND, jnp.int32), cost)
    rows, cols = hungarian_algorithm(cost)
    cols = jnp.where(gt_valid[cols], cols, BACKGROUND).astype(jnp.int32)
    gt_inds = jnp.full((q,), BACKGROUND, jnp.int32).at[rows].set(cols)
    return HungarianMatch(gt_inds, cost)
