"""Class-aware NMS against a plain NumPy greedy reference, and its edge cases."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import torch_detection_reference as ref
from cankd_jax.detection import batched_nms

F = np.float32
K = 16  # every hand case is padded to K candidates: one compilation per (threshold, max_out)

# The threshold is traced (only compared against), so every threshold shares one compilation.
_nms = jax.jit(batched_nms, static_argnames=("max_out",))
_nms_batch = jax.jit(jax.vmap(lambda b, s, l, v, t: batched_nms(b, s, l, v, iou_threshold=t, max_out=40),
                              in_axes=(0, 0, 0, 0, None)))


def run(boxes, scores, labels, valid=None, *, thr=0.5, max_out=K):
    boxes, scores, labels = np.asarray(boxes, F), np.asarray(scores, F), np.asarray(labels, np.int32)
    n = len(boxes)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    pad = K - n
    # Padding rows are high-scoring copies of the first box: only `valid` keeps them out.
    res = _nms(np.concatenate([boxes, np.resize(boxes[:1], (pad, 4))]), np.concatenate([scores, np.full(pad, 9.0, F)]),
               np.concatenate([labels, np.resize(labels[:1], pad)]), np.concatenate([valid, np.zeros(pad, bool)]),
               iou_threshold=np.float32(thr), max_out=max_out)
    keep, n_kept = np.asarray(res.keep), int(res.num_kept)
    assert (keep[n_kept:] == -1).all() and (keep[:n_kept] >= 0).all()
    return keep[:n_kept].tolist()


def test_suppression_is_strictly_greater_than_threshold():
    base = [0, 0, 10, 10]
    boxes = [base, [0, 0, 10, 5], [0, 0, 10, 6], [0, 5.1, 10, 10], [0, 0, 10, 10]]
    # IoU with the first: 0.5 exactly (kept), 0.6 (suppressed), 0.49 (kept; disjoint from box 1), 1.0.
    assert run(boxes, [0.9, 0.8, 0.7, 0.6, 0.5], [0] * 5) == [0, 1, 3]


def test_suppressed_boxes_do_not_suppress():
    # B overlaps A (IoU 0.54: suppressed); C overlaps B as much but A only 0.25: C survives, as B is gone.
    boxes = [[0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10]]
    assert run(boxes, [0.9, 0.8, 0.7], [1, 1, 1]) == [0, 2]


def test_classes_never_suppress_each_other():
    boxes = [[0, 0, 10, 10]] * 3 + [[1, 1, 10, 10]]
    assert run(boxes, [0.9, 0.8, 0.7, 0.6], [0, 1, 2, 0]) == [0, 1, 2]


def test_score_ties_broken_by_index():
    boxes = [[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60], [50, 50, 60, 60]]
    # Equal scores: the lower index ranks first and suppresses the later duplicate.
    assert run(boxes, [0.5, 0.5, 0.5, 0.5], [3, 3, 3, 3]) == [0, 2]
    assert run(boxes[::-1], [0.5] * 4, [3] * 4) == [0, 2]
    # Output order is by score, not by index.
    assert run(boxes, [0.1, 0.2, 0.4, 0.3], [0, 1, 0, 1]) == [2, 3, 1, 0]


def test_invalid_entries_neither_kept_nor_suppressing():
    boxes = [[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]]
    assert run(boxes, [0.99, 0.5, 0.4], [0, 0, 0], valid=[False, True, True]) == [1, 2]
    assert run(boxes, [0.9, 0.8, 0.7], [0, 0, 0], valid=[False, False, False]) == []


def test_max_out_keeps_the_best():
    boxes = [[i * 20, 0, i * 20 + 10, 10] for i in range(10)]  # disjoint: all would be kept
    scores = np.linspace(0.1, 0.9, 10)
    assert run(boxes, scores, [0] * 10, max_out=4) == [9, 8, 7, 6]


@pytest.mark.parametrize("seed,thr", [(0, 0.5), (1, 0.6), (2, 0.3)])
def test_matches_numpy_reference(seed, thr):
    def case(r):
        n = 300
        centres = r.uniform(0, 100, (12, 2))[r.integers(0, 12, n)] + r.normal(0, 4, (n, 2))
        wh = r.uniform(5, 30, (n, 2))
        boxes = np.concatenate([centres - wh / 2, centres + wh / 2], 1).astype(F)
        scores = np.round(r.uniform(0, 1, n), 2).astype(F)  # rounding makes many exact score ties
        labels = r.integers(0, 3, n).astype(np.int32)
        valid = r.random(n) < 0.9
        want = np.flatnonzero(valid)[ref.nms_numpy(boxes[valid], scores[valid], labels[valid], thr)]
        return (boxes, scores, labels, valid), want

    r = np.random.default_rng(seed)
    cases = [case(r), case(r)]  # two different images in one vmapped batch: none may leak into the other
    res = _nms_batch(*(np.stack(x) for x in zip(*(c[0] for c in cases), strict=True)), np.float32(thr))
    for i, (_, want) in enumerate(cases):
        assert len(want) > 40  # the cut at max_out is exercised
        np.testing.assert_array_equal(np.asarray(res.keep[i]), want[:40])
        assert int(res.num_kept[i]) == 40
