"""Max-IoU assignment and FCOS targets: hand-built cases at the rules' edges, and the assignment against the PyTorch
formulation. (Whole RetinaNet / FCOS targets against mmdet's `get_targets`: test_mmdet_parity.py.)"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import torch_detection_reference as ref
from cankd_jax.detection import (
    BACKGROUND, IGNORE, AnchorGenerator, fcos_priors, fcos_targets, max_iou_assign,
)

F = np.float32


_assign = jax.jit(max_iou_assign, static_argnames=("min_pos_iou", "gt_max_assign_all", "match_low_quality"))
A_PAD, G_PAD = 8, 4  # hand cases padded to one shape: one compilation, and padding is exercised throughout


def assign(anchors, gts, gt_valid=None, anchor_valid=None, **kw):
    """Hand case -> gt index per anchor. Pads anchors (invalid) and gts (invalid) to fixed sizes."""
    anchors, gts = np.asarray(anchors, F), np.asarray(gts, F).reshape(-1, 4)
    a, g = len(anchors), len(gts)
    gt_valid = np.ones(g, bool) if gt_valid is None else np.asarray(gt_valid)
    anchor_valid = np.ones(a, bool) if anchor_valid is None else np.asarray(anchor_valid)
    # Padding rows copy real boxes, so only the masks keep them out.
    pa = np.concatenate([anchors, np.resize(anchors, (A_PAD - a, 4))])
    pg = np.concatenate([gts, np.resize(gts, (G_PAD - g, 4))])
    va = np.concatenate([anchor_valid, np.zeros(A_PAD - a, bool)])
    vg = np.concatenate([gt_valid, np.zeros(G_PAD - g, bool)])
    out = np.asarray(_assign(pa, pg, vg, va, **kw).gt_inds)
    assert (out[a:] == IGNORE).all()
    return out[:a]


def test_thresholds_at_their_boundaries():
    gt = [[100, 100, 120, 120]]  # area 400
    anchors = [
        [100, 100, 120, 120],  # IoU 1       -> positive
        [100, 100, 120, 110],  # IoU 0.5     -> positive (>= pos_iou_thr)
        [100, 100, 120, 109],  # IoU 0.45    -> neither: ignored
        [100, 100, 120, 108],  # IoU 0.4     -> ignored (negatives need < 0.4)
        [100, 100, 120, 107],  # IoU 0.35    -> negative
        [0, 0, 10, 10],  # IoU 0           -> negative
    ]
    np.testing.assert_array_equal(assign(anchors, gt), [0, 0, IGNORE, IGNORE, BACKGROUND, BACKGROUND])


def test_low_quality_match_overrides_a_positive():
    # Anchor 0 has IoU 1.0 with gt 0 (a positive for gt 0) and 0.8 with gt 1; it is also gt 1's best
    # anchor, and mmdet's low-quality pass runs over gts in order, so gt 1 takes it from gt 0.
    anchors = [[0, 0, 10, 10], [20, 20, 30, 30]]
    gts = [[0, 0, 10, 10], [0, 0, 10, 8]]
    np.testing.assert_array_equal(assign(anchors, gts), [1, BACKGROUND])
    # Without low-quality matching anchor 0 stays with its best gt.
    np.testing.assert_array_equal(assign(anchors, gts, match_low_quality=False), [0, BACKGROUND])


def test_low_quality_ties_all_assigned():
    gt = [[0, 0, 10, 10]]
    anchors = [
        [0, 0, 10, 30],  # IoU 1/3, the gt's best
        [0, -20, 10, 10],  # IoU 1/3, tied
        [0, 0, 10, 40],  # IoU 1/4 -> negative
        [50, 50, 60, 60],  # IoU 0 -> negative
    ]
    np.testing.assert_array_equal(assign(anchors, gt), [0, 0, BACKGROUND, BACKGROUND])
    # gt_max_assign_all=False: only the first of the tied anchors.
    np.testing.assert_array_equal(assign(anchors, gt, gt_max_assign_all=False), [0, BACKGROUND, BACKGROUND, BACKGROUND])
    # min_pos_iou above the gt's best disables its low-quality match.
    np.testing.assert_array_equal(assign(anchors, gt, min_pos_iou=0.34), [BACKGROUND] * 4)


def test_equal_best_iou_goes_to_the_first_gt():
    # The anchor is exactly between two gts (IoU 0.5 with each): positive for the first.
    anchors = [[0, 0, 20, 10]]
    gts = [[0, 0, 10, 10], [10, 0, 20, 10]]
    # Step 3 picks gt 0 (first maximum); step 4 hands it to gt 0, then to gt 1 (its best too): gt 1 wins.
    np.testing.assert_array_equal(assign(anchors, gts), [1])
    np.testing.assert_array_equal(assign(anchors, gts, match_low_quality=False), [0])


def test_padded_gts_never_match():
    anchors = [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]
    # The padded row sits exactly on anchor 1; marked invalid it must change nothing.
    padded = [[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 0, 0]]
    got = assign(anchors, padded, gt_valid=[True, False, False])
    np.testing.assert_array_equal(got, [0, BACKGROUND, BACKGROUND])
    np.testing.assert_array_equal(got, assign(anchors, [[0, 0, 10, 10]]))


def test_invalid_anchors_take_no_part():
    gt = [[0, 0, 10, 10]]
    anchors = [[0, 0, 10, 10], [0, 0, 10, 30], [50, 50, 60, 60]]
    # The perfect anchor is invalid: it is ignored, and the gt's best (low-quality) is anchor 1.
    got = assign(anchors, gt, anchor_valid=np.array([False, True, True]))
    np.testing.assert_array_equal(got, [IGNORE, 0, BACKGROUND])


def test_image_without_gts():
    anchors = [[0, 0, 10, 10], [5, 5, 30, 30], [0, 0, 1, 1]]
    got = assign(anchors, [[0, 0, 10, 10], [1, 2, 3, 4]], gt_valid=[False, False],
                 anchor_valid=np.array([True, False, True]))
    np.testing.assert_array_equal(got, [BACKGROUND, IGNORE, BACKGROUND])


def test_gt_overlapping_no_anchor_claims_the_zero_iou_anchors():
    # mmdet's low-quality test is `gt_max >= min_pos_iou`: with min_pos_iou=0 a gt whose best IoU is 0
    # claims every anchor it does not overlap. Real boxes always overlap an anchor; this pins the rule.
    anchors = [[0, 0, 10, 10], [20, 20, 30, 30]]
    gts = [[0, 0, 10, 10], [100, 100, 110, 110]]
    np.testing.assert_array_equal(assign(anchors, gts), [1, 1])
    np.testing.assert_array_equal(assign(anchors, gts, min_pos_iou=1e-3), [0, BACKGROUND])


def _random_gts(r, g_real, g_pad, img=64.0, lo=4.0, hi=40.0):
    xy = r.uniform(0, img - lo, (g_real, 2))
    wh = r.uniform(lo, hi, (g_real, 2))
    real = np.concatenate([xy, np.minimum(xy + wh, img)], 1).astype(F)
    pad = r.uniform(0, img, (g_pad, 4)).astype(F)  # garbage padding: must be ignored
    return np.concatenate([real, pad]), np.arange(g_real + g_pad) < g_real


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_assign_matches_pytorch(seed):
    r = np.random.default_rng(seed)
    gen = AnchorGenerator(strides=(8, 16))
    anchors = np.concatenate(gen.grid_anchors([(8, 8), (4, 4)]))
    n_real = [0, 3, 7][seed]
    gts, gt_valid = _random_gts(r, n_real, 8 - n_real)
    anchor_valid = r.random(len(anchors)) < 0.9
    ours = np.asarray(_assign(anchors, gts, gt_valid, anchor_valid).gt_inds)
    t_in = ref.max_iou_assign(torch.from_numpy(anchors[anchor_valid]), torch.from_numpy(gts[gt_valid]))
    want = np.full(len(anchors), IGNORE)
    want[anchor_valid] = np.where(t_in.numpy() > 0, t_in.numpy() - 1, np.where(t_in.numpy() == 0, BACKGROUND, IGNORE))
    np.testing.assert_array_equal(ours, want)
    if n_real:
        assert (ours >= 0).sum() >= n_real  # every gt got at least one anchor


def _fcos_case(seed, n_real, g_pad=3):
    r = np.random.default_rng(seed)
    pri = fcos_priors([(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)])  # a 128 x 128 input
    gts, valid = _random_gts(r, n_real, g_pad, img=128.0, lo=6.0, hi=120.0)
    labels = r.integers(0, 4, len(gts)).astype(np.int32)
    return pri, gts, labels, valid


def test_fcos_smallest_area_wins_first_on_ties():
    pri = fcos_priors([(4, 4)], strides=(8,), regress_ranges=((-1.0, 1e8),))
    gts = np.array([
        [0, 0, 32, 32],  # area 1024
        [0, 0, 16, 16],  # area 256: wins where both qualify
        [0, 0, 16, 16],  # identical: the first of equal areas wins, so never this one
        [16, 16, 32, 32],  # area 256
    ], F)
    out = jax.jit(lambda g: fcos_targets(pri, g, np.array([0, 1, 2, 3], np.int32), np.ones(4, bool), num_classes=4,
                                         center_sampling=False))(gts)
    labels = np.asarray(out.labels).reshape(4, 4)
    # Points at 4, 12, 20, 28 on each axis; strictly-inside tests decide who qualifies.
    want = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 3, 3], [0, 0, 3, 3]])
    np.testing.assert_array_equal(labels, want)
    # Normalised targets: point (4, 4) to gt 1 is (4, 4, 12, 12) pixels / stride 8.
    np.testing.assert_allclose(np.asarray(out.bbox_targets)[0], [0.5, 0.5, 1.5, 1.5])
    np.testing.assert_allclose(float(out.centerness_targets[0]), np.sqrt((4 / 12) * (4 / 12)), rtol=1e-6)


def test_fcos_center_sampling_and_ranges():
    pri = fcos_priors([(8, 8), (4, 4)], strides=(8, 16), regress_ranges=((-1.0, 20.0), (20.0, 1e8)))
    gt = np.array([[0, 0, 64, 24]], F)  # centre (32, 12); sampling square half-side 12 (stride 8), 24 (stride 16)
    out = jax.jit(lambda g: fcos_targets(pri, g, np.array([2], np.int32), np.array([True]), num_classes=3))(gt)
    pos0 = np.asarray(out.pos[:64]).reshape(8, 8)
    pos1 = np.asarray(out.pos[64:]).reshape(4, 4)
    # Stride 8: the points strictly inside the square x in (20, 44), y in (0, 24) have x = 28 or 36, so
    # their farthest side is 36 px away, beyond this level's range (<= 20): none is positive.
    assert not pos0.any()
    # Stride 16: square x in (8, 56), y in (0, 24) clipped to the gt; points (24|40, 8) qualify.
    want1 = np.zeros((4, 4), bool)
    want1[0, 1] = want1[0, 2] = True
    np.testing.assert_array_equal(pos1, want1)
    np.testing.assert_array_equal(np.asarray(out.labels[64:]).reshape(4, 4)[0], [3, 2, 2, 3])
