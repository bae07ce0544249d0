"""Box arithmetic and the two coders: hand values, round trips, and the PyTorch formulation."""

from __future__ import annotations

import math

import chex
import jax
import numpy as np
import torch

import torch_detection_reference as ref
from cankd_jax.detection import (
    DeltaXYWHCoder, DistancePointCoder, aligned_giou, aligned_iou, box_area, clip_boxes, pairwise_iou, rescale_boxes,
)
from conftest import assert_close


def random_boxes(r, n, lo=0.0, hi=100.0, min_size=1.0, max_size=40.0):
    xy = r.uniform(lo, hi, (n, 2))
    wh = r.uniform(min_size, max_size, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


@jax.jit
def _box_ops(a, b):
    """Pairwise IoU of a and b, area of b, aligned IoU/GIoU of rows a[i], b[i] (a, b of equal length)."""
    return dict(iou=pairwise_iou(a, b), area=box_area(b), aligned=aligned_iou(a, b), giou=aligned_giou(a, b))


def test_iou_hand_values():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [3, 3, 3, 3]], np.float32)
    b = np.array([[0, 0, 10, 5], [20, 20, 30, 30], [5, 5, 15, 15], [3, 3, 3, 3]], np.float32)
    out = _box_ops(a, b)
    # Last row/column: zero-area boxes; the union is floored at 1e-6 (mmdet 3.x), so IoU 0, no NaN.
    want = np.array([[0.5, 0.0, 25 / 175, 0.0]] * 3 + [[0.0] * 4], np.float32)
    np.testing.assert_allclose(np.asarray(out["iou"]), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["area"]), [50, 100, 100, 0])
    np.testing.assert_allclose(np.asarray(out["aligned"]), [0.5, 0.0, 25 / 175, 0.0], rtol=1e-6)
    # GIoU = IoU - (enclosure - union) / enclosure: disjoint boxes in a 30x30 enclosure give -(900 - 200) / 900;
    # two zero-area boxes: enclosure floored at 1e-6 too, union 1e-6, GIoU 0.
    np.testing.assert_allclose(np.asarray(out["giou"]), [0.5, -(900 - 200) / 900, 25 / 175 - (225 - 175) / 225, 0.0],
                               rtol=1e-6)


def test_iou_and_giou_match_pytorch(rng):
    a, b = random_boxes(rng, 13), random_boxes(rng, 13)
    b[:6] = a[:6] + rng.uniform(-3, 3, (6, 4)).astype(np.float32)  # some overlap, some do not
    out = _box_ops(a, b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    chex.assert_trees_all_close(
        (np.asarray(out["iou"]), np.asarray(out["aligned"]), np.asarray(out["giou"])),
        (ref.box_iou(ta, tb).numpy(), ref.box_iou(ta, tb, aligned=True).numpy(),
         ref.box_iou(ta, tb, aligned=True, giou=True).numpy()),
        rtol=1e-5, atol=1e-6)


@jax.jit
def _delta_ops(priors, gt, big, shapes):
    coder = DeltaXYWHCoder()
    d = coder.encode(priors, gt)
    return dict(enc=d, round=coder.decode(priors, d), free=coder.decode(priors, big),
                clipped=jax.vmap(lambda s: coder.decode(priors, big, max_shape=s))(shapes))


def test_delta_coder_round_trip_and_pytorch(rng):
    priors, gt = random_boxes(rng, 20), random_boxes(rng, 20)
    d = ref.delta_encode(torch.from_numpy(priors), torch.from_numpy(gt)).numpy()
    # Size deltas beyond the wh_ratio_clip bound, |log(16/1000)| = 4.1352, either way.
    big = d.copy()
    big[:, 2:] = np.where(rng.random((20, 2)) < 0.5, 6.0, -6.0)
    # Image shapes (h, w) as a traced array under vmap, one per image.
    out = _delta_ops(priors, gt, big, np.array([[60.0, 80.0], [30.0, 20.0]], np.float32))
    assert_close(out["enc"], d, rtol=1e-5, scale=1.0)
    assert_close(out["round"], gt, rtol=1e-5)
    free = np.asarray(out["free"])
    lim = math.log(1000 / 16)
    pw = priors[:, 2] - priors[:, 0]
    np.testing.assert_allclose(free[:, 2] - free[:, 0], pw * np.exp(np.sign(big[:, 2]) * lim), rtol=1e-5, atol=1e-3)
    assert_close(free, ref.delta_decode(torch.from_numpy(priors), torch.from_numpy(big)).numpy(), rtol=1e-5)
    both = np.asarray(out["clipped"])
    for i, shape in enumerate(((60, 80), (30, 20))):
        want = ref.delta_decode(torch.from_numpy(priors), torch.from_numpy(big), max_shape=shape).numpy()
        assert_close(both[i], want, rtol=1e-5)
        assert both[i][:, 0::2].max() <= shape[1] and both[i][:, 1::2].max() <= shape[0] and both[i].min() >= 0
    assert (both[1] != both[0]).any()


def test_delta_coder_means_stds():
    coder = DeltaXYWHCoder(means=(0.1, 0.0, 0.0, -0.1), stds=(0.1, 0.1, 0.2, 0.2))
    p = np.array([[0, 0, 10, 20]], np.float32)
    g = np.array([[2, 0, 12, 40]], np.float32)
    raw = np.array([[0.2, 0.5, 0.0, math.log(2.0)]], np.float32)
    enc, dec = jax.jit(lambda p, g: (coder.encode(p, g), coder.decode(p, coder.encode(p, g))))(p, g)
    np.testing.assert_allclose(np.asarray(enc), (raw - [0.1, 0, 0, -0.1]) / [0.1, 0.1, 0.2, 0.2], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dec), g, rtol=1e-5, atol=1e-5)


@jax.jit
def _distance_ops(pts, boxes):
    coder = DistancePointCoder()
    d = coder.encode(pts, boxes)
    return dict(enc=d, round=coder.decode(pts, d), clipped=coder.decode(pts, d * 3, max_shape=(50, 70)),
                unclipped=DistancePointCoder(clip_border=False).decode(pts, d * 3, max_shape=(1, 1)))


def test_distance_coder(rng):
    boxes = random_boxes(rng, 15)
    pts = (boxes[:, :2] + boxes[:, 2:]) / 2 + rng.uniform(-2, 2, (15, 2)).astype(np.float32)
    boxes[0] = [1, 2, 11, 16]
    pts[0] = [5, 6]
    out = _distance_ops(pts, boxes)
    d = ref.distance_encode(torch.from_numpy(pts), torch.from_numpy(boxes))
    chex.assert_trees_all_close(np.asarray(out["enc"]), d.numpy(), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["enc"])[0], [4, 4, 6, 10])  # (x - x1, y - y1, x2 - x, y2 - y)
    assert_close(out["round"], boxes, rtol=1e-5)
    # Three times the distances: boxes spilling over a 50 x 70 image, clamped to it; unclamped without clip_border.
    want = ref.distance_decode(torch.from_numpy(pts), d * 3, max_shape=(50, 70)).numpy()
    assert_close(out["clipped"], want, rtol=1e-5)
    assert_close(out["unclipped"], ref.distance_decode(torch.from_numpy(pts), d * 3).numpy(), rtol=1e-5)
    assert (np.asarray(out["clipped"]) != np.asarray(out["unclipped"])).any()


def test_clip_and_rescale():
    b = np.array([[-5, -1, 30, 50], [2, 3, 4, 5]], np.float32)
    clipped, rescaled = jax.jit(lambda b: (clip_boxes(b, (40, 20)), rescale_boxes(b, (2.0, 4.0))))(b)
    np.testing.assert_allclose(np.asarray(clipped), [[0, 0, 20, 40], [2, 3, 4, 5]])
    # scale_factor = (w_scale, h_scale) = resized / original: x divided by 2, y by 4.
    np.testing.assert_allclose(np.asarray(rescaled), [[-2.5, -0.25, 15, 12.5], [1, 0.75, 2, 1.25]])
