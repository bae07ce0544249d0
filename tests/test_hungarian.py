"""Hungarian matching against mmdetection 3.3 itself: the `HungarianAssigner` of mmdet's own
`dino/dino-4scale_r50_8xb2-12e_coco.py` (FocalLossCost 2.0, BBoxL1Cost 5.0 on centre/size, IoUCost GIoU 2.0)
with scipy's `linear_sum_assignment`, against ours jitted and vmapped over images whose ground truth is
padded to one size. The predictions are made as DINO's head makes them (sigmoid logits, boxes from sigmoid
centre/size scaled to the image), some of them near a ground-truth box so the matching is not arbitrary.

The cost matrices agree to float32 rounding (1e-6 relative); the assignments exactly. Ties are the one
place the two solvers may differ; costs from continuous random predictions have none.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import openmmlab_reference as mr
from cankd_jax.detection import hungarian as hg
from cankd_jax.detection.assigners import BACKGROUND
from conftest import assert_close

pytestmark = pytest.mark.skipif(mr.available() is not None, reason=str(mr.available()))

Q, K, G = 40, 7, 9
IMG_SHAPES = ((120.0, 160.0), (96.0, 200.0), (150.0, 90.0))
NUM_GT = (9, 3, 0)


def _case(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(-1.0, 1.5, size=(len(IMG_SHAPES), Q, K)).astype(np.float32)
    gt_boxes = np.zeros((len(IMG_SHAPES), G, 4), np.float32)
    gt_labels = np.zeros((len(IMG_SHAPES), G), np.int32)
    pred_boxes = np.zeros((len(IMG_SHAPES), Q, 4), np.float32)
    for b, ((h, w), n) in enumerate(zip(IMG_SHAPES, NUM_GT)):
        x1, y1 = rng.uniform(0, w * 0.7, n), rng.uniform(0, h * 0.7, n)
        gt_boxes[b, :n] = np.stack([x1, y1, x1 + rng.uniform(4, w * 0.3, n), y1 + rng.uniform(4, h * 0.3, n)], 1)
        gt_labels[b, :n] = rng.integers(0, K, n)
        gt_labels[b, n:] = rng.integers(0, K, G - n)  # padding holds junk: it must not count
        gt_boxes[b, n:] = rng.uniform(0, 50, (G - n, 4))
        cxcywh = 1 / (1 + np.exp(-rng.normal(0, 1.5, (Q, 4))))
        factor = np.array([w, h, w, h], np.float32)
        pred_boxes[b] = np.asarray(hg.cxcywh_to_xyxy(jnp.asarray(cxcywh, jnp.float32))) * factor
        near = rng.choice(Q, size=n, replace=False)  # some queries near a ground truth, others not
        pred_boxes[b, near] = gt_boxes[b, :n] + rng.normal(0, 3, (n, 4))
    valid = np.arange(G)[None, :] < np.array(NUM_GT)[:, None]
    return logits, pred_boxes, gt_boxes, gt_labels, valid


def _theirs(logits, pred_boxes, gt_boxes, gt_labels):
    from mmdet.registry import TASK_UTILS
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmengine.structures import InstanceData

    cfg = Config.fromfile(f"{mr.CONFIGS}/dino/dino-4scale_r50_8xb2-12e_coco.py").model.train_cfg.assigner
    with DefaultScope.overwrite_default_scope("mmdet"):
        assigner = TASK_UTILS.build(cfg)
    inds, costs = [], []
    for b, ((h, w), n) in enumerate(zip(IMG_SHAPES, NUM_GT)):
        pred = InstanceData(scores=torch.tensor(logits[b]), bboxes=torch.tensor(pred_boxes[b]))
        gt = InstanceData(bboxes=torch.tensor(gt_boxes[b, :n]), labels=torch.tensor(gt_labels[b, :n]).long())
        meta = {"img_shape": (h, w)}
        result = assigner.assign(pred, gt, meta)
        inds.append(result.gt_inds.numpy() - 1)  # mmdet: 0 background, i + 1 the i-th gt
        costs.append(sum(c(pred_instances=pred, gt_instances=gt, img_meta=meta) for c in assigner.match_costs).numpy()
                     if n else np.zeros((Q, 0), np.float32))
    return np.stack(inds), costs


def _ours(logits, pred_boxes, gt_boxes, gt_labels, valid):
    @jax.jit
    def run(logits, pred_boxes, gt_boxes, gt_labels, valid, shapes):
        def one(lg, pb, gb, gl, v, s):
            return hg.hungarian_assign(hg.match_cost(lg, pb, gb, gl, s), v)
        return jax.vmap(one)(logits, pred_boxes, gt_boxes, gt_labels, valid, shapes)
    return run(logits, pred_boxes, gt_boxes, gt_labels, valid, jnp.asarray(IMG_SHAPES))


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_mmdet_hungarian_assigner(seed):
    case = _case(seed)
    want_inds, want_costs = _theirs(*case[:4])
    got = _ours(*case)
    np.testing.assert_array_equal(np.asarray(got.gt_inds), want_inds)
    for b, n in enumerate(NUM_GT):
        assert_close(np.asarray(got.cost)[b, :, :n], want_costs[b], rtol=1e-6, what=f"cost of image {b}")
        assert not np.any(np.asarray(got.cost)[b, :, n:])
    # every valid ground truth has exactly one query; the image without any leaves every query background
    for b, n in enumerate(NUM_GT):
        assert sorted(want_inds[b][want_inds[b] >= 0]) == list(range(n))
    assert np.all(want_inds[2] == BACKGROUND)


def test_padding_does_not_change_the_matching():
    """The same image with its ground truth padded to 9 and to 20 columns (junk in the padding)."""
    logits, pred_boxes, gt_boxes, gt_labels, valid = (a[:1] for a in _case(3))
    wide = [np.concatenate([a, np.random.default_rng(4).uniform(0, 40, (1, 11) + a.shape[2:]).astype(a.dtype)], 1)
            for a in (gt_boxes, gt_labels)]
    wide_valid = np.concatenate([valid, np.zeros((1, 11), bool)], 1)
    f = jax.jit(lambda *a: hg.hungarian_assign(hg.match_cost(*a[:5]), a[5]).gt_inds)
    narrow_inds = f(logits[0], pred_boxes[0], gt_boxes[0], gt_labels[0], IMG_SHAPES[0], valid[0])
    wide_inds = f(logits[0], pred_boxes[0], wide[0][0], wide[1][0], IMG_SHAPES[0], wide_valid[0])
    np.testing.assert_array_equal(narrow_inds, wide_inds)


def test_box_conversions_round_trip_and_errors():
    boxes = jnp.asarray([[10.0, 20.0, 50.0, 35.0], [0.0, 0.0, 1.0, 3.0]])
    np.testing.assert_allclose(hg.xyxy_to_cxcywh(boxes), [[30, 27.5, 40, 15], [0.5, 1.5, 1, 3]])
    np.testing.assert_allclose(hg.cxcywh_to_xyxy(hg.xyxy_to_cxcywh(boxes)), boxes)
    with pytest.raises(ValueError, match="9 padded ground-truth boxes but only 5 queries"):
        hg.hungarian_assign(jnp.zeros((5, 9)), jnp.ones((9,), bool))
    with pytest.raises(ValueError, match="unknown box_format 'cxcy'"):
        hg.l1_cost(boxes, boxes, (10, 10), "cxcy")
