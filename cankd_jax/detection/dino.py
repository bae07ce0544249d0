"""DINO's training targets and losses with mmdetection 3.x semantics, static shapes, inside a jitted step:
the contrastive denoising (CDN) queries, their targets, and the matching part's Hungarian targets.

Ground truth is padded to `G` boxes per image (`gt_boxes (B, G, 4)` x1y1x2y2 pixels, `gt_labels (B, G)`,
`gt_valid (B, G)` bool; valid boxes may sit anywhere in the padding). Image sizes `img_shapes (B, 2)` are the
(h, w) each image has inside the padded batch (mmdet's `img_shape`), which normalise the boxes.

Denoising layout (mmdet's `CdnQueryGenerator` with dynamic groups): with `m` the most objects any image of the
batch has, there are `groups = max(num_dn_queries // m, 1)` groups of `2m` queries; in group k, slots
`2mk + j` are the positive (mildly noised) copies of each image's object j and `2mk + m + j` the negative
(strongly noised) ones; a slot past an image's own objects is an empty query trained as background. The
static number of slots is `D = 2 * max(num_dn_queries, G)`; slots past `2 m groups` do not exist for this
batch: they see and are seen by nothing but themselves and carry no loss. `m` is taken over the whole batch
the function is given (under `jax.jit` with a sharded batch, the global batch), so the layout does not depend
on how the batch is split over devices; mmdet takes it over each GPU's images.

Every random draw comes from the `key` the caller derives (from the seed, the step and the image), so a run
is the same on any topology and resumes exactly.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import chex
import jax
import jax.numpy as jnp

from cankd_jax.detection.boxes import clip_boxes
from cankd_jax.detection.hungarian import cxcywh_to_xyxy, hungarian_assign, match_cost, xyxy_to_cxcywh
from cankd_jax.detection.losses import giou_loss, l1_loss, sigmoid_focal_loss
from cankd_jax.detection.postprocess import Detections
from cankd_jax.detection.topk import top_k
from cankd_jax.models.detr_layers import inverse_sigmoid
from cankd_jax.models.dino import Denoising

Array = jax.Array


class DnLayout(NamedTuple):
    """Where each denoising slot's object is: `gt (B, D)` int32, the index into the image's padded ground truth
    (-1: no object); `positive (B, D)` bool; `exists (B, D)` bool (inside this batch's `2 m groups` slots);
    `num_groups ()` and `max_objects ()` (m) int32."""

    gt: Array
    positive: Array
    exists: Array
    num_groups: Array
    max_objects: Array


class DnNoise(NamedTuple):
    """The draws of one step's denoising queries, per slot: `p (B, D)` uniform (the label is replaced where
    `p < label_noise_scale / 2`), `new_label (B, D)` int32 uniform over the classes, `sign (B, D, 4)` +-1,
    `part (B, D, 4)` uniform in [0, 1) (negatives add 1), mmdet's `rand_like` / `randint_like` draws."""

    p: Array
    new_label: Array
    sign: Array
    part: Array


def num_dn_slots(num_dn_queries: int, max_boxes: int) -> int:
    """The static number of denoising slots, `2 * max(num_dn_queries, max_boxes)`."""
    return 2 * max(num_dn_queries, max_boxes)


def dn_layout(gt_valid: Array, num_dn_queries: int) -> DnLayout:
    """The slots' objects for padded ground truth `gt_valid (B, G)` (see the module docstring)."""
    chex.assert_rank(gt_valid, 2)
    b, g = gt_valid.shape
    d = num_dn_slots(num_dn_queries, g)
    counts = jnp.sum(gt_valid, axis=1).astype(jnp.int32)
    m = jnp.max(counts)
    groups = jnp.where(m > 0, jnp.maximum(num_dn_queries // jnp.maximum(m, 1), 1), 1).astype(jnp.int32)
    slot = jnp.arange(d, dtype=jnp.int32)
    per_group = jnp.maximum(2 * m, 1)
    r = slot % per_group
    j = r % jnp.maximum(m, 1)
    exists = slot < 2 * m * groups
    positive = r < m
    # the j-th valid box of each image, wherever the padding put it
    order = jnp.argsort(~gt_valid, axis=1, stable=True).astype(jnp.int32)  # valid indices first, in order
    has = exists[None] & (j[None] < counts[:, None])
    gt = jnp.where(has, jnp.take_along_axis(order, jnp.broadcast_to(jnp.minimum(j, g - 1), (b, d)), axis=1), -1)
    return DnLayout(gt, jnp.broadcast_to(positive & exists, (b, d)), jnp.broadcast_to(exists, (b, d)), groups, m)


def dn_noise(key: Array, batch: int, slots: int, num_classes: int) -> DnNoise:
    """Fresh draws for `batch` images of `slots` slots."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return DnNoise(jax.random.uniform(k1, (batch, slots)),
                   jax.random.randint(k2, (batch, slots), 0, num_classes, jnp.int32),
                   jax.random.randint(k3, (batch, slots, 4), 0, 2).astype(jnp.float32) * 2.0 - 1.0,
                   jax.random.uniform(k4, (batch, slots, 4)))


def _whwh(img_shapes: Array) -> Array:
    """`(..., 2)` image (h, w) -> `(..., 4)` (w, h, w, h), the factor between normalised boxes and pixels."""
    h, w = img_shapes[..., 0], img_shapes[..., 1]
    return jnp.stack([w, h, w, h], axis=-1)


def _normalised(boxes: Array, img_shapes: Array) -> Array:
    """`(B, N, 4)` pixels / each image's `(w, h, w, h)`."""
    return boxes / _whwh(img_shapes)[:, None, :]


def dn_attention_mask(layout: DnLayout, num_matching_queries: int) -> Array:
    """`(B, D + Q, D + Q)` bool, True where a query may not attend: mmdet's `generate_dn_mask` (the matching
    queries never see the denoising ones; each denoising group sees only itself and the matching queries),
    with the slots that do not exist in this batch cut off from everything but themselves."""
    b, d = layout.exists.shape
    n = d + num_matching_queries
    slot = jnp.arange(n)
    exists = jnp.concatenate([layout.exists[0], jnp.ones((num_matching_queries,), bool)])
    group = jnp.where(slot < d, slot // jnp.maximum(2 * layout.max_objects, 1), -1)
    is_dn = slot < d
    blocked = is_dn[None, :] & ((~is_dn[:, None]) | (group[:, None] != group[None, :]))
    blocked = blocked | ~exists[None, :] | ~exists[:, None]
    blocked = jnp.where(jnp.eye(n, dtype=bool), False, blocked)
    return jnp.broadcast_to(blocked, (b, n, n))


def cdn_queries(noise: DnNoise, layout: DnLayout, gt_boxes: Array, gt_labels: Array, img_shapes: Array, *,
                num_matching_queries: int, label_noise_scale: float = 0.5, box_noise_scale: float = 1.0) -> Denoising:
    """mmdet's `CdnQueryGenerator` from given draws: each slot's noised label and inverse-sigmoid noised box
    (cx, cy, w, h), and the attention mask. DINO's config: label noise 0.5, box noise 1.0."""
    has = layout.gt >= 0
    idx = jnp.maximum(layout.gt, 0)
    labels = jnp.take_along_axis(gt_labels, idx, axis=1)
    labels = jnp.where(noise.p < label_noise_scale * 0.5, noise.new_label, labels)
    boxes = jnp.take_along_axis(_normalised(gt_boxes, img_shapes), idx[..., None], axis=1)
    part = noise.part + jnp.where(layout.positive, 0.0, 1.0)[..., None]
    whwh = jnp.tile(xyxy_to_cxcywh(boxes)[..., 2:], (1, 1, 2))
    noisy = boxes + part * noise.sign * whwh * box_noise_scale / 2
    noisy = xyxy_to_cxcywh(jnp.clip(noisy, 0.0, 1.0))
    unact = inverse_sigmoid(noisy, eps=1e-3)
    return Denoising(jnp.where(has, labels, -1).astype(jnp.int32), jnp.where(has[..., None], unact, 0.0),
                     dn_attention_mask(layout, num_matching_queries))


class SetTargets(NamedTuple):
    """One prediction layer's targets for `N` queries per image: `labels (B, N)` (num_classes: background),
    `label_weights (B, N)`, `boxes (B, N, 4)` normalised (cx, cy, w, h), `box_weights (B, N)`, `num_pos ()`."""

    labels: Array
    label_weights: Array
    boxes: Array
    box_weights: Array
    num_pos: Array


def dn_targets(layout: DnLayout, gt_boxes: Array, gt_labels: Array, img_shapes: Array, num_classes: int) -> SetTargets:
    """mmdet's `get_dn_targets`: a positive slot learns its object's class and box; negative and empty slots of
    this batch learn background; slots that do not exist learn nothing."""
    idx = jnp.maximum(layout.gt, 0)
    pos = layout.positive & (layout.gt >= 0)
    labels = jnp.where(pos, jnp.take_along_axis(gt_labels, idx, axis=1), num_classes)
    boxes = jnp.take_along_axis(xyxy_to_cxcywh(_normalised(gt_boxes, img_shapes)), idx[..., None], axis=1)
    return SetTargets(labels, layout.exists.astype(jnp.float32), jnp.where(pos[..., None], boxes, 0.0),
                      pos.astype(jnp.float32), jnp.sum(pos))


def matching_targets(cls_scores: Array, bbox_preds: Array, gt_boxes: Array, gt_labels: Array, gt_valid: Array,
                     img_shapes: Array, num_classes: int) -> SetTargets:
    """mmdet's `DETRHead.get_targets` with DINO's `HungarianAssigner`: per image, the queries matched one to one
    to its objects learn them, every other query learns background. `cls_scores (B, Q, K)`, `bbox_preds
    (B, Q, 4)` normalised (cx, cy, w, h). No gradient flows through the matching."""
    def one(cls, box, gtb, gtl, valid, shape):
        factor = _whwh(shape)
        pred = cxcywh_to_xyxy(box) * factor
        cost = match_cost(cls, pred, gtb, gtl, shape)
        gt = hungarian_assign(jax.lax.stop_gradient(cost), valid).gt_inds
        has = gt >= 0
        idx = jnp.maximum(gt, 0)
        labels = jnp.where(has, gtl[idx], num_classes)
        boxes = jnp.where(has[:, None], xyxy_to_cxcywh(gtb[idx] / factor), 0.0)
        return labels, boxes, has

    labels, boxes, has = jax.vmap(one)(jax.lax.stop_gradient(cls_scores), jax.lax.stop_gradient(bbox_preds),
                                       gt_boxes, gt_labels, gt_valid, img_shapes)
    return SetTargets(labels, jnp.ones(labels.shape, jnp.float32), boxes, has.astype(jnp.float32), jnp.sum(has))


def set_loss(cls_scores: Array, bbox_preds: Array, t: SetTargets, img_shapes: Array, *, cls_weight: float = 1.0,
             l1_weight: float = 5.0, iou_weight: float = 2.0) -> tuple[Array, Array, Array]:
    """mmdet's `loss_by_feat_single` (and `_loss_dn_single`): (focal, L1, GIoU) of one layer, each summed over the
    batch and divided by the batch's positives (at least 1); GIoU on boxes in pixels of each image."""
    b, n, k = cls_scores.shape
    avg = jnp.maximum(t.num_pos.astype(jnp.float32), 1.0)
    loss_cls = sigmoid_focal_loss(cls_scores.reshape(b * n, k), t.labels.reshape(-1), t.label_weights.reshape(-1),
                                  avg_factor=avg) * cls_weight
    factor = _whwh(img_shapes)[:, None, :]
    weights = jnp.broadcast_to(t.box_weights[..., None], bbox_preds.shape)
    loss_iou = giou_loss((cxcywh_to_xyxy(bbox_preds) * factor).reshape(-1, 4),
                         (cxcywh_to_xyxy(t.boxes) * factor).reshape(-1, 4), t.box_weights.reshape(-1),
                         avg_factor=avg) * iou_weight
    loss_bbox = l1_loss(bbox_preds.reshape(-1, 4), t.boxes.reshape(-1, 4), weights.reshape(-1, 4),
                        avg_factor=avg) * l1_weight
    return loss_cls, loss_bbox, loss_iou


def dino_losses(outputs: dict, gt_boxes: Array, gt_labels: Array, gt_valid: Array, img_shapes: Array, *,
                num_classes: int, num_dn: int, layout: Optional[DnLayout] = None) -> dict[str, Array]:
    """Every term of mmdet's `DINOHead.loss_by_feat`, named as mmdet logs them: the last decoder layer's
    `loss_cls` / `loss_bbox` / `loss_iou`, earlier layers' `d{i}.loss_*`, the encoder's proposals' `enc_loss_*`,
    and the denoising queries' `dn_loss_*` / `d{i}.dn_loss_*` (when `layout` is given; `num_dn` = D slots
    lead every layer's outputs). The training loss is their sum."""
    cls_all, box_all = outputs["cls_scores"], outputs["bbox_preds"]
    layers = cls_all.shape[0]
    terms: dict[str, Array] = {}

    def put(prefix: str, i: int, values: Sequence[Array]) -> None:
        name = "" if i == layers - 1 else f"d{i}."
        for what, v in zip(("cls", "bbox", "iou"), values):
            terms[f"{name}{prefix}loss_{what}"] = v

    for i in range(layers):
        cls, box = cls_all[i, :, num_dn:], box_all[i, :, num_dn:]
        t = matching_targets(cls, box, gt_boxes, gt_labels, gt_valid, img_shapes, num_classes)
        put("", i, set_loss(cls, box, t, img_shapes))
    t = matching_targets(outputs["enc_cls_scores"], outputs["enc_bbox_preds"], gt_boxes, gt_labels, gt_valid,
                         img_shapes, num_classes)
    for what, v in zip(("cls", "bbox", "iou"), set_loss(outputs["enc_cls_scores"], outputs["enc_bbox_preds"], t,
                                                        img_shapes)):
        terms[f"enc_loss_{what}"] = v
    if layout is not None:
        t = dn_targets(layout, gt_boxes, gt_labels, img_shapes, num_classes)
        for i in range(layers):
            put("dn_", i, set_loss(cls_all[i, :, :num_dn], box_all[i, :, :num_dn], t, img_shapes))
    return terms


def dino_postprocess(cls_scores: Array, bbox_preds: Array, img_shapes: Array, scale_factors: Array, *,
                     max_per_img: int = 300) -> Detections:
    """mmdet's DETR `_predict_by_feat_single` (sigmoid classifier), batched: the last decoder layer's
    `cls_scores (B, Q, K)` / `bbox_preds (B, Q, 4)` -> the `max_per_img` best (query, class) pairs (no NMS; a
    query may appear with several classes), boxes scaled to each image's `(h, w)`, clipped to it, and divided by
    its `(w, h)` scale factor into original-image pixels. DINO's test config keeps 300."""
    b, q, k = cls_scores.shape
    if max_per_img > q * k:
        raise ValueError(f"max_per_img={max_per_img} exceeds the {q} queries x {k} classes")
    scores, index = top_k(jax.nn.sigmoid(cls_scores.astype(jnp.float32)).reshape(b, q * k), max_per_img)
    labels = (index % k).astype(jnp.int32)
    boxes = cxcywh_to_xyxy(jnp.take_along_axis(bbox_preds.astype(jnp.float32), (index // k)[..., None], axis=1))
    boxes = jax.vmap(clip_boxes)(boxes * _whwh(img_shapes)[:, None, :], img_shapes)
    # divided, not multiplied by the reciprocal (`rescale_boxes`): mmdet's DETR head divides
    boxes = boxes / jnp.concatenate([scale_factors, scale_factors], axis=-1)[:, None, :]
    return Detections(boxes, scores, labels, jnp.full((b,), max_per_img, jnp.int32))
