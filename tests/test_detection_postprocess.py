"""Post-processing: hand-built cases whose detections are known. (Against mmdet's `predict_by_feat` on whole
detectors: test_mmdet_parity.py.)"""

from __future__ import annotations

import jax
import numpy as np

from cankd_jax.detection import (
    AnchorGenerator, PostprocessConfig, fcos_postprocess, grid_points, retinanet_postprocess,
)

F = np.float32
LOG_HALF = float(np.log(0.5))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


# Every case runs through the same two compiled functions: two levels, 4 classes, a batch of 2.
C, SIZES, STRIDES = 4, [(4, 5), (2, 3)], (8, 16)
RETINA_CFG = PostprocessConfig(nms_pre=30, max_per_img=10, iou_threshold=0.5)
FCOS_CFG = PostprocessConfig(nms_pre=30, max_per_img=10, iou_threshold=0.6)
ANCHORS = AnchorGenerator(strides=STRIDES).grid_anchors(SIZES)
POINTS = grid_points(SIZES, STRIDES)
_retina = jax.jit(lambda l, d, s, sf: retinanet_postprocess(l, d, ANCHORS, s, sf, cfg=RETINA_CFG))
_fcos = jax.jit(lambda l, d, ct, s, sf: fcos_postprocess(l, d, ct, POINTS, STRIDES, s, sf, cfg=FCOS_CFG))


def test_retinanet_hand_case():
    n = [h * w * 9 for h, w in SIZES]
    logits = [np.full((k, C), -10.0, F) for k in n]
    deltas = [np.zeros((k, 4), F) for k in n]
    lg, dl = logits[0], deltas[0]  # everything happens on level 0 (stride 8, 4 x 5 locations)

    def row(y, x, base=3):  # base 3: the 32 x 32 square (ratio 1, scale 4)
        return (y * 5 + x) * 9 + base

    # Location (0, 0), anchor [-16, -16, 16, 16]: shifted by 8 px and halved -> [0, 0, 16, 16], two classes.
    a = row(0, 0)
    dl[a] = [0.25, 0.25, LOG_HALF, LOG_HALF]
    lg[a, 1], lg[a, 2] = 3.0, 2.0
    lg[a, 0] = -3.0  # sigmoid 0.047 < score_thr 0.05: never a candidate
    # Location (1, 1), anchor [-8, -8, 24, 24], no offset: clipped to the image.
    lg[row(1, 1), 1] = 1.0
    # Location (0, 1), anchor [-8, -16, 24, 16] -> [1, 0, 17, 16]: IoU 0.88 with the first box, same class.
    b = row(0, 1)
    dl[b] = [1 / 32, 0.25, LOG_HALF, LOG_HALF]
    lg[b, 1] = 0.5
    # The best score of all, but shifted right off the image: clipped to zero width, dropped.
    z = row(1, 0)
    dl[z, 0] = 4.0
    lg[z, 0] = 4.0

    img_shapes = np.array([[24, 32], [16, 16]], F)
    scale = np.array([[2.0, 0.5], [1.0, 1.0]], F)  # (w_scale, h_scale) = resized / original
    out = _retina([np.stack([x, x]) for x in logits], [np.stack([x, x]) for x in deltas], img_shapes, scale)

    # Image 0 (24 x 32): three detections, in score order, x / 2 and y / 0.5 back to the original.
    assert int(out.num_valid[0]) == 3
    np.testing.assert_allclose(np.asarray(out.scores[0])[:5], [sigmoid(3.0), sigmoid(2.0), sigmoid(1.0), 0, 0],
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.labels[0])[:5], [1, 2, 1, -1, -1])
    np.testing.assert_allclose(np.asarray(out.boxes[0])[:5],
                               [[0, 0, 8, 32], [0, 0, 8, 32], [0, 0, 12, 48], [0] * 4, [0] * 4], atol=1e-4)
    # Image 1 (16 x 16): the third box clips onto the first ([0, 0, 16, 16], same class) and is suppressed.
    assert int(out.num_valid[1]) == 2
    np.testing.assert_array_equal(np.asarray(out.labels[1])[:3], [1, 2, -1])
    np.testing.assert_allclose(np.asarray(out.boxes[1])[:2], [[0, 0, 16, 16]] * 2, atol=1e-4)


def test_fcos_hand_case():
    n = [h * w for h, w in SIZES]
    logits = [np.full((k, C), -10.0, F) for k in n]
    ctr = [np.zeros(k, F) for k in n]
    dist = [np.zeros((k, 4), F) for k in n]
    # Level 0 points are (4, 4), (12, 4), ...; distances are in strides (8 px here).
    logits[0][0, :2] = [0.0, 2.0]  # both classes at point 0; centerness 0.5
    dist[0][0] = [0.5, 0.5, 1.0, 1.0]  # (4, 4, 8, 8) px -> [0, 0, 12, 12], clipped to h = 10
    logits[0][1, :2] = [-3.5, -2.9]  # class 0 under the threshold; class 1 just over it (0.052)
    ctr[0][1] = 10.0
    dist[0][1] = [1.0, 0.25, 1.0, 0.5]  # -> [4, 2, 20, 8]
    # Level 1 (stride 16) point 1 is (24, 8): 1.5 strides left and right -> [0, -16, 48, 32] -> clipped.
    logits[1][1, 3] = 1.0
    dist[1][1] = [1.5, 1.5, 1.5, 1.5]
    ctr[1][1] = -1.0
    out = _fcos([x[None].repeat(2, 0) for x in logits], [x[None].repeat(2, 0) for x in dist],
                [x[None].repeat(2, 0) for x in ctr], np.array([[10, 20]] * 2, F), np.ones((2, 2), F))
    assert int(out.num_valid[0]) == 4
    # mmdet 3.x: score = cls score x centerness (no square root), thresholded before the product.
    want = [sigmoid(2.0) * 0.5, 0.5 * 0.5, sigmoid(1.0) * sigmoid(-1.0), sigmoid(-2.9) * sigmoid(10.0)]
    np.testing.assert_allclose(np.asarray(out.scores[0])[:4], want, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.labels[0])[:5], [1, 0, 3, 1, -1])
    np.testing.assert_allclose(np.asarray(out.boxes[0])[:4], [[0, 0, 12, 10], [0, 0, 12, 10], [0, 0, 20, 10],
                                                              [4, 2, 20, 8]], atol=1e-5)


def _heads(r, sizes, per_loc, c):
    n = [h * w * per_loc for h, w in sizes]
    logits = [(r.standard_normal((2, k, c)) * 1.5 - 1.5).astype(F) for k in n]
    return n, logits


