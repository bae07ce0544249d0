"""The stand-in for mmcv's compiled kernels (`mmcv_ext.py`) against literal transcriptions of mmcv 2.1's C++
(`mmcv/ops/csrc/pytorch/cpu/*.cpp`, shipped with mmcv-lite): the same loops, element by element, in float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmcv_ext


def nms_cpu_transcribed(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int) -> torch.Tensor:
    """`nms_cpu` of mmcv/ops/csrc/pytorch/cpu/nms.cpp, statement by statement (float32 scalars throughout)."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.long)
    x1, y1, x2, y2 = (boxes.select(1, i).contiguous().numpy() for i in range(4))
    f = np.float32
    areas = (torch.from_numpy(x2) - torch.from_numpy(x1) + offset) * (torch.from_numpy(y2) - torch.from_numpy(y1)
                                                                      + offset)
    areas = areas.numpy()
    order_t = scores.sort(0, descending=True)[1]
    order = order_t.numpy()
    nboxes = boxes.size(0)
    select = np.ones(nboxes, bool)
    thr = f(iou_threshold)
    for _i in range(nboxes):
        if not select[_i]:
            continue
        i = order[_i]
        ix1, iy1, ix2, iy2, iarea = x1[i], y1[i], x2[i], y2[i], areas[i]
        for _j in range(_i + 1, nboxes):
            if not select[_j]:
                continue
            j = order[_j]
            xx1 = max(ix1, x1[j])
            yy1 = max(iy1, y1[j])
            xx2 = min(ix2, x2[j])
            yy2 = min(iy2, y2[j])
            w = max(f(0.0), f(xx2 - xx1 + f(offset)))
            h = max(f(0.0), f(yy2 - yy1 + f(offset)))
            inter = f(w * h)
            ovr = f(inter / f(iarea + areas[j] - inter))
            if ovr > thr:
                select[_j] = False
    return order_t.masked_select(torch.from_numpy(select))


def _boxes(n: int, seed: int, clustered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    r = np.random.default_rng(seed)
    if clustered:  # few clusters of jittered boxes: many overlaps near every threshold
        centres = r.uniform(20, 200, (4, 2))[r.integers(0, 4, n)] + r.normal(0, 6, (n, 2))
    else:
        centres = r.uniform(0, 150, (n, 2))  # spread out, yet overlapping often
    wh = r.uniform(4, 60, (n, 2))
    boxes = np.concatenate([centres - wh / 2, centres + wh / 2], 1).astype(np.float32)
    scores = r.uniform(0, 1, n).astype(np.float32)
    if seed % 3 == 0:  # ties in the scores: the order is whatever the kernel's sort gives, on both sides
        scores[: n // 2] = scores[0]
    return torch.from_numpy(boxes), torch.from_numpy(scores)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("iou_threshold, offset", [(0.5, 0), (0.6, 0), (0.3, 1), (0.7, 1)])
def test_nms_matches_the_transcribed_kernel(seed, iou_threshold, offset):
    clustered = seed % 2 == 0
    boxes, scores = _boxes(120, seed, clustered=clustered)
    expected = nms_cpu_transcribed(boxes, scores, iou_threshold, offset)
    got = mmcv_ext.nms(boxes, scores, iou_threshold=iou_threshold, offset=offset)
    assert got.dtype == torch.long and 5 < len(expected) <= 120
    if clustered:  # overlapping boxes were suppressed: the inner loop acted
        assert len(expected) < 115
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_nms_empty_and_unported_kernels():
    assert mmcv_ext.nms(torch.zeros((0, 4)), torch.zeros((0,)), iou_threshold=0.5, offset=0).shape == (0,)
    with pytest.raises(NotImplementedError, match="mmcv._ext.roi_align_forward: this mmcv CPU kernel has no port"):
        mmcv_ext.roi_align_forward(torch.zeros(1))
