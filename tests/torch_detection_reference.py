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


def retinanet_targets(anchors, valid, gts, gt_labels, num_classes):
    """AnchorHead._get_targets_single with allowed_border=-1, PseudoSampler; unmapped to all anchors."""
    inside = anchors[valid]
    assigned = max_iou_assign(inside, gts)
    m = inside.shape[0]
    labels = torch.full((m,), num_classes, dtype=torch.long)
    lw = torch.zeros(m)
    bt = torch.zeros(m, 4)
    bw = torch.zeros(m, 4)
    pos = torch.nonzero(assigned > 0).reshape(-1)
    neg = torch.nonzero(assigned == 0).reshape(-1)
    if pos.numel():
        g = assigned[pos] - 1
        bt[pos] = delta_encode(inside[pos], gts[g])
        bw[pos] = 1.0
        labels[pos] = gt_labels[g]
        lw[pos] = 1.0
    lw[neg] = 1.0

    def unmap(x, fill):
        out = torch.full((anchors.shape[0],) + x.shape[1:], fill, dtype=x.dtype)
        out[valid] = x
        return out

    return unmap(labels, num_classes), unmap(lw, 0.0), unmap(bt, 0.0), unmap(bw, 0.0), int(pos.numel())


def fcos_targets(points, strides, ranges, gts, gt_labels, num_classes, radius=1.5):
    """FCOSHead._get_targets_single (center sampling) + norm_on_bbox. Returns labels, normalised targets."""
    p = points.shape[0]
    if gts.shape[0] == 0:
        return torch.full((p,), num_classes, dtype=torch.long), torch.zeros(p, 4)
    g = gts.shape[0]
    areas = ((gts[:, 2] - gts[:, 0]) * (gts[:, 3] - gts[:, 1]))[None].repeat(p, 1)
    xs, ys = points[:, 0:1].expand(p, g), points[:, 1:2].expand(p, g)
    gx1, gy1, gx2, gy2 = (gts[None, :, k].expand(p, g) for k in range(4))
    d = torch.stack([xs - gx1, ys - gy1, gx2 - xs, gy2 - ys], -1)
    cx, cy = (gx1 + gx2) / 2, (gy1 + gy2) / 2
    r = (strides * radius)[:, None].expand(p, g)
    bx1 = torch.where(cx - r > gx1, cx - r, gx1)
    by1 = torch.where(cy - r > gy1, cy - r, gy1)
    bx2 = torch.where(cx + r > gx2, gx2, cx + r)
    by2 = torch.where(cy + r > gy2, gy2, cy + r)
    inside = torch.stack([xs - bx1, ys - by1, bx2 - xs, by2 - ys], -1).min(-1)[0] > 0
    reach = d.max(-1)[0]
    in_range = (reach >= ranges[:, 0:1]) & (reach <= ranges[:, 1:2])
    areas[~inside] = FCOS_INF
    areas[~in_range] = FCOS_INF
    min_area, which = areas.min(1)
    labels = gt_labels[which].clone()
    labels[min_area == FCOS_INF] = num_classes
    targets = d[torch.arange(p), which] / strides[:, None]
    return labels, targets


def centerness(t):
    lr, tb = t[:, [0, 2]], t[:, [1, 3]]
    return torch.sqrt(lr.min(-1)[0] / lr.max(-1)[0] * (tb.min(-1)[0] / tb.max(-1)[0]))


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


def retinanet_loss(cls_logits, bbox_pred, anchors, valid, gts_list, labels_list, num_classes):
    """(B, A, C), (B, A, 4), (A, 4), valid (B, A): mmdet's per-image targets, avg over the batch."""
    tg = [retinanet_targets(anchors, valid[i], gts_list[i], labels_list[i], num_classes)
          for i in range(cls_logits.shape[0])]
    avg = sum(max(t[4], 1) for t in tg)
    labels = torch.cat([t[0] for t in tg])
    lw = torch.cat([t[1] for t in tg])
    bt = torch.cat([t[2] for t in tg])
    bw = torch.cat([t[3] for t in tg])
    loss_cls = focal_loss(cls_logits.reshape(-1, num_classes), labels, lw, avg)
    loss_bbox = reduce((bbox_pred.reshape(-1, 4) - bt).abs(), bw, avg)
    return loss_cls, loss_bbox


def fcos_loss(cls_logits, bbox_pred, ctr_logits, points, strides, ranges, gts_list, labels_list, num_classes):
    """FCOSHead.loss_by_feat on levels already concatenated per image: (B, P, C), (B, P, 4), (B, P)."""
    b = cls_logits.shape[0]
    tg = [fcos_targets(points, strides, ranges, gts_list[i], labels_list[i], num_classes) for i in range(b)]
    labels = torch.cat([t[0] for t in tg])
    targets = torch.cat([t[1] for t in tg])
    flat_pts = points.repeat(b, 1)
    pos = torch.nonzero((labels >= 0) & (labels < num_classes)).reshape(-1)
    num_pos = max(float(pos.numel()), 1.0)
    loss_cls = focal_loss(cls_logits.reshape(-1, num_classes), labels, avg_factor=num_pos)
    pb, pc, pt = bbox_pred.reshape(-1, 4)[pos], ctr_logits.reshape(-1)[pos], targets[pos]
    ctr_t = centerness(pt)
    denorm = max(float(ctr_t.sum()), 1e-6)
    if pos.numel():
        pp = flat_pts[pos]
        loss_bbox = giou_loss(distance_decode(pp, pb), distance_decode(pp, pt), ctr_t, denorm)
        loss_ctr = reduce(F.binary_cross_entropy_with_logits(pc, ctr_t, reduction="none"), None, num_pos)
    else:
        loss_bbox, loss_ctr = pb.sum(), pc.sum()
    return loss_cls, loss_bbox, loss_ctr


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


def predict_single(levels, img_shape, scale_factor, *, kind, score_thr=0.05, nms_pre=1000, iou_thr=0.5,
                   max_per_img=100):
    """mmdet's _predict_by_feat_single + _bbox_post_process for one image.

    levels: per level a dict with `cls (N, C)`, `reg (N, 4)`, `priors` and, for FCOS,
    `ctr (N,)` and `stride`. Returns boxes, scores, labels (numpy), all kept up to max_per_img.
    """
    all_reg, all_pri, all_sc, all_lab, all_fac = [], [], [], [], []
    for lv in levels:
        scores = lv["cls"].sigmoid()
        mask = scores > score_thr
        cand = scores[mask]
        idx = torch.nonzero(mask)
        cand, order = cand.sort(descending=True, stable=True)
        k = min(nms_pre, idx.shape[0])
        idx = idx[order[:k]]
        loc, lab = idx[:, 0], idx[:, 1]
        reg = lv["reg"][loc]
        if kind == "fcos":
            reg = reg * lv["stride"]
            all_fac.append(lv["ctr"].sigmoid()[loc])
        all_reg.append(reg)
        all_pri.append(lv["priors"][loc])
        all_sc.append(cand[:k])
        all_lab.append(lab)
    reg, pri = torch.cat(all_reg), torch.cat(all_pri)
    boxes = delta_decode(pri, reg, img_shape) if kind == "retinanet" else distance_decode(pri, reg, img_shape)
    scores, labels = torch.cat(all_sc), torch.cat(all_lab)
    if scale_factor is not None:
        sw, sh = scale_factor
        boxes = boxes * torch.tensor([1 / sw, 1 / sh, 1 / sw, 1 / sh], dtype=torch.float32)
    if kind == "fcos":
        scores = scores * torch.cat(all_fac)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ok = (w > 0) & (h > 0)
    boxes, scores, labels = boxes[ok], scores[ok], labels[ok]
    kept = nms_numpy(boxes.numpy(), scores.numpy(), labels.numpy(), iou_thr)[:max_per_img]
    return boxes.numpy()[kept], scores.numpy()[kept], labels.numpy()[kept]


def predict_detector(head_outputs, priors, img_shapes, scale_factors, *, kind, **cfg):
    """mmdet's `predict_by_feat` for a batch, from a whole detector's eval-mode head outputs (lists of NCHW tensors).

    Per image, each level's `(A*C, H, W)` map is flattened as mmdet does (`permute(1, 2, 0).reshape(-1, C)`);
    `priors` are the levels' anchors / points. FCOS's eval-mode `bbox_preds` are already pixels (mmdet's
    `forward_single` multiplies them by the stride outside training), so they decode with stride 1. Returns a
    list of (boxes, scores, labels) per image.
    """
    cls, reg = head_outputs["cls_scores"], head_outputs["bbox_preds"]
    num_classes = cls[0].shape[1] // (reg[0].shape[1] // 4)
    out = []
    for i in range(cls[0].shape[0]):
        levels = []
        for lv in range(len(cls)):
            d = dict(cls=cls[lv][i].permute(1, 2, 0).reshape(-1, num_classes),
                     reg=reg[lv][i].permute(1, 2, 0).reshape(-1, 4), priors=torch.as_tensor(priors[lv]), stride=1)
            if kind == "fcos":
                d["ctr"] = head_outputs["centernesses"][lv][i].reshape(-1)
            levels.append(d)
        out.append(predict_single(levels, tuple(img_shapes[i]), tuple(scale_factors[i]), kind=kind, **cfg))
    return out
