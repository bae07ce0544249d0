"""Focal, L1, GIoU and BCE losses against their PyTorch formulation; FCOS's loss without positives. (The RetinaNet /
FCOS loss assembly against mmdet's `loss_by_feat`, with gradients: test_mmdet_parity.py.)"""

from __future__ import annotations

import chex
import jax
import numpy as np
import torch

import torch_detection_reference as ref
from cankd_jax.detection import (
    bce_loss, fcos_loss, fcos_priors, fcos_targets, giou_loss, l1_loss, sigmoid_focal_loss,
)
from conftest import assert_close

F = np.float32


def test_focal_loss_matches_pytorch_and_mmcv_cuda_form(rng):
    n, c = 40, 6
    logits = (rng.standard_normal((n, c)) * 4).astype(F)
    labels = rng.integers(0, c + 1, n).astype(np.int32)  # c = background
    weight = (rng.random(n) < 0.8).astype(F)
    tl = torch.from_numpy(logits).requires_grad_(True)
    tlab, tw = torch.from_numpy(labels).long(), torch.from_numpy(weight)
    want = ref.focal_loss(tl, tlab, tw, avg_factor=7.0)
    want.backward()
    val, grad = jax.jit(jax.value_and_grad(lambda x: sigmoid_focal_loss(x, labels, weight, avg_factor=7.0)))(logits)
    assert_close(val, want.item(), rtol=1e-5)
    assert_close(grad, tl.grad.numpy(), rtol=1e-4)
    # mmcv's CUDA kernel writes the same loss as -alpha (1-p)^g log p / -(1-alpha) p^g log(1-p).
    # Each row's sum (the row's mean without avg_factor, times C) against that form.
    per_row = jax.jit(jax.vmap(lambda x, l: sigmoid_focal_loss(x[None], l[None]) * c))(logits, labels)
    cuda = ref.focal_loss_cuda_form(torch.from_numpy(logits).double(), tlab).sum(1).numpy()
    assert_close(per_row, cuda, rtol=1e-5)
    # Per-element weights (N, C) and no avg_factor (plain mean).
    w2 = rng.random((n, c)).astype(F)
    assert_close(jax.jit(sigmoid_focal_loss)(logits, labels, w2),
                 ref.focal_loss(torch.from_numpy(logits), tlab, torch.from_numpy(w2)).item(), rtol=1e-5)


def test_l1_giou_bce_match_pytorch(rng):
    n = 30
    xy = rng.uniform(0, 50, (n, 2))
    pred = np.concatenate([xy, xy + rng.uniform(1, 30, (n, 2))], 1).astype(F)
    target = (pred + rng.normal(0, 6, (n, 4))).astype(F)
    target[:, 2:] = np.maximum(target[:, 2:], target[:, :2] + 0.5)
    target[:3] = [[200, 200, 210, 210]] * 3  # disjoint: GIoU < 0
    w = rng.random(n).astype(F)
    tp = torch.from_numpy(pred).requires_grad_(True)
    want = ref.giou_loss(tp, torch.from_numpy(target), torch.from_numpy(w), avg_factor=float(w.sum()))
    want.backward()
    giou = jax.jit(lambda p, t, w, a: giou_loss(p, t, w, avg_factor=a))
    val, grad = jax.jit(jax.value_and_grad(giou))(pred, target, w, w.sum())
    assert_close(val, want.item(), rtol=1e-5)
    assert_close(grad, tp.grad.numpy(), rtol=1e-4)
    assert float(giou(pred, target, np.zeros(n, F), 1e-6)) == 0.0  # mmdet's "no positive" case

    w4 = (rng.random((n, 4)) < 0.5).astype(F)
    assert_close(jax.jit(lambda *a: l1_loss(*a, avg_factor=5.0))(pred, target, w4),
                 ref.reduce(torch.from_numpy(np.abs(pred - target)), torch.from_numpy(w4), 5.0).item(), rtol=1e-5)

    bce = jax.jit(lambda x, t: bce_loss(x, t, avg_factor=3.0))
    logits = (rng.standard_normal(n) * 3).astype(F)
    soft = rng.random(n).astype(F)
    want = torch.nn.functional.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(soft),
                                                                reduction="sum") / (3.0 + ref.FLT_EPS)
    assert_close(bce(logits, soft), want.item(), rtol=1e-5)
    extreme = np.array([-100.0, 100.0, 0.0], F)  # no overflow at saturated logits
    assert np.isfinite(float(bce(extreme, np.array([1.0, 0.0, 0.5], F))))


def _gts(r, sizes, g_pad, img, num_classes):
    boxes, valid, labels = [], [], []
    for n_real in sizes:
        xy = r.uniform(0, img - 8, (n_real, 2))
        real = np.concatenate([xy, np.minimum(xy + r.uniform(6, img * 0.8, (n_real, 2)), img)], 1)
        boxes.append(np.concatenate([real, r.uniform(0, img, (g_pad - n_real, 4))]).astype(F))
        valid.append(np.arange(g_pad) < n_real)
        labels.append(r.integers(0, num_classes, g_pad).astype(np.int32))
    return np.stack(boxes), np.stack(valid), np.stack(labels)


FCOS_C = 3
FCOS_PRI = fcos_priors([(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)])  # a 64 x 64 input, 86 points


@jax.jit
def _fcos_step(logits, dist, ctr, boxes, labels, valid):
    """Targets for a batch, the three FCOS losses and their gradients w.r.t. the three head outputs."""
    tg = jax.vmap(lambda g, l, v: fcos_targets(FCOS_PRI, g, l, v, num_classes=FCOS_C))(boxes, labels, valid)

    def total(lg, ds, ct):
        out = fcos_loss(lg, ds, ct, FCOS_PRI, tg)
        return sum(out.values()), out

    (_, out), grads = jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True)(logits, dist, ctr)
    return out, grads


def test_fcos_loss_without_positives_is_finite_zero():
    p = len(FCOS_PRI.points)
    boxes = np.zeros((2, 5, 4), F)  # padding only; zero-area boxes would give NaN targets if they leaked in
    out, grads = _fcos_step(np.zeros((2, p, FCOS_C), F), np.ones((2, p, 4), F), np.zeros((2, p), F), boxes,
                            np.zeros((2, 5), np.int32), np.zeros((2, 5), bool))
    chex.assert_trees_all_close((out["loss_bbox"], out["loss_centerness"]), (0.0, 0.0))
    # Focal over all-negative points at logit 0, divided by max(num_pos, 1) = 1.
    assert_close(out["loss_cls"], 2 * p * FCOS_C * 0.75 * 0.25 * np.log(2.0), rtol=1e-5)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    assert not np.asarray(grads[1]).any() and not np.asarray(grads[2]).any()
