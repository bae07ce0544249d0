"""PyTorch formulations of the detection pieces, written from mmdetection 3.x's described semantics.

Dynamic shapes and literal control flow, the way mmdet computes (compacted
tensors, boolean indexing, a Python loop over gts in the assigner, per-image
lists), so that the static-shape JAX code in `cankd_jax.detection` is held
against a differently built computation. Inputs are torch tensors (float32 unless
said); ground truth here is unpadded: `(G, 4)` boxes of real objects only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

FLT_EPS = float(np.finfo(np.float32).eps)
FCOS_INF = 1e8


# ---------------------------------------------------------------- boxes


def box_iou(a: torch.Tensor, b: torch.Tensor, *, aligned: bool = False, giou: bool = False, eps: float = 1e-6):
    """IoU / GIoU, pairwise `(N, M)` or aligned `(N,)`; union and enclosure floored at eps."""
    if not aligned:
        a, b = a[:, None, :], b[None, :, :]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = iw * ih
    union = torch.clamp(area_a + area_b - inter, min=eps)
    iou = inter / union
    if not giou:
        return iou
    ew = (torch.maximum(a[..., 2], b[..., 2]) - torch.minimum(a[..., 0], b[..., 0])).clamp(min=0)
    eh = (torch.maximum(a[..., 3], b[..., 3]) - torch.minimum(a[..., 1], b[..., 1])).clamp(min=0)
    enclose = torch.clamp(ew * eh, min=eps)
    return iou - (enclose - union) / enclose


def delta_encode(priors, gt):
    pw, ph = priors[:, 2] - priors[:, 0], priors[:, 3] - priors[:, 1]
    pcx, pcy = priors[:, 0] + 0.5 * pw, priors[:, 1] + 0.5 * ph
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    gcx, gcy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
    return torch.stack([(gcx - pcx) / pw, (gcy - pcy) / ph, torch.log(gw / pw), torch.log(gh / ph)], 1)


def delta_decode(priors, deltas, max_shape=None, wh_ratio_clip=16 / 1000):
    lim = abs(math.log(wh_ratio_clip))
    pw, ph = priors[:, 2] - priors[:, 0], priors[:, 3] - priors[:, 1]
    pcx, pcy = (priors[:, 0] + priors[:, 2]) / 2, (priors[:, 1] + priors[:, 3]) / 2
    cx, cy = pcx + deltas[:, 0] * pw, pcy + deltas[:, 1] * ph
    w, h = pw * deltas[:, 2].clamp(-lim, lim).exp(), ph * deltas[:, 3].clamp(-lim, lim).exp()
    out = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    if max_shape is not None:
        out = clip(out, max_shape)
    return out


def clip(boxes, shape):
    h, w = shape
    x = boxes[:, 0::2].clamp(0, w)
    y = boxes[:, 1::2].clamp(0, h)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1)


def distance_encode(points, boxes):
    return torch.stack([points[:, 0] - boxes[:, 0], points[:, 1] - boxes[:, 1],
                        boxes[:, 2] - points[:, 0], boxes[:, 3] - points[:, 1]], 1)


def distance_decode(points, dist, max_shape=None):
    out = torch.cat([points - dist[:, :2], points + dist[:, 2:]], 1)
    if max_shape is not None:
        out = clip(out, max_shape)
    return out


# ---------------------------------------------------------------- assignment


def max_iou_assign(anchors, gts, *, pos_thr=0.5, neg_thr=0.4, min_pos_iou=0.0, assign_all=True):
    """mmdet's steps on compacted tensors. Returns 1-based gt index, 0 negative, -1 ignored (mmdet's encoding)."""
    n = anchors.shape[0]
    result = torch.full((n,), -1, dtype=torch.long)
    if gts.shape[0] == 0:
        result[:] = 0
        return result
    ov = box_iou(gts, anchors)  # (G, N)
    best, best_gt = ov.max(0)
    result[(best >= 0) & (best < neg_thr)] = 0
    strong = best >= pos_thr
    result[strong] = best_gt[strong] + 1
    gt_best, gt_first = ov.max(1)
    for g in range(gts.shape[0]):
        if gt_best[g] >= min_pos_iou:
            if assign_all:
                result[ov[g] == gt_best[g]] = g + 1
            else:
                result[gt_first[g]] = g + 1
    return result


# ---------------------------------------------------------------- losses


def reduce(loss, weight=None, avg_factor=None):
    if weight is not None:
        loss = loss * weight
    return loss.mean() if avg_factor is None else loss.sum() / (avg_factor + FLT_EPS)


def focal_loss(logits, labels, weight=None, avg_factor=None, gamma=2.0, alpha=0.25):
    """mmdet's CPU path: one-hot targets (background = C drops out), BCE-with-logits x focal weight."""
    c = logits.shape[1]
    t = F.one_hot(labels, c + 1)[:, :c].to(logits.dtype)
    p = logits.sigmoid()
    pt = (1 - p) * t + p * (1 - t)
    fw = (alpha * t + (1 - alpha) * (1 - t)) * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(logits, t, reduction="none") * fw
    if weight is not None and weight.dim() == 1:
        weight = weight[:, None]
    return reduce(loss, weight, avg_factor)


def focal_loss_cuda_form(logits, labels, gamma=2.0, alpha=0.25):
    """mmcv's CUDA kernel formula, elementwise `(N, C)`: the log terms floored at FLT_MIN."""
    c = logits.shape[1]
    p = logits.sigmoid()
    is_pos = labels[:, None] == torch.arange(c)[None]
    tiny = torch.finfo(p.dtype).tiny
    pos = -alpha * (1 - p).pow(gamma) * torch.log(p.clamp(min=tiny))
    neg = -(1 - alpha) * p.pow(gamma) * torch.log((1 - p).clamp(min=tiny))
    return torch.where(is_pos, pos, neg)


def giou_loss(pred, target, weight=None, avg_factor=None, eps=1e-6):
    if weight is not None and not torch.any(weight > 0):
        return (pred * weight[:, None]).sum()
    return reduce(1 - box_iou(pred, target, aligned=True, giou=True, eps=eps), weight, avg_factor)


# ---------------------------------------------------------------- test time


def nms_numpy(boxes, scores, labels, thr):
    """Plain greedy class-aware NMS, stable descending order; returns all kept indices, best first."""
    boxes = np.asarray(boxes, np.float32)
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    kept = []
    for i in order:
        ok = True
        for j in kept:
            if labels[j] != labels[i]:
                continue
            a, b = boxes[j], boxes[i]
            iw = max(np.float32(0), min(a[2], b[2]) - max(a[0], b[0]))
            ih = max(np.float32(0), min(a[3], b[3]) - max(a[1], b[1]))
            inter = np.float32(iw * ih)
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            if inter / max(union, np.float32(1e-6)) > thr:
                ok = False
                break
        if ok:
            kept.append(i)
    return kept
