"""A stand-in for `mmcv._ext`, the compiled kernels that mmcv-lite leaves out, so mmdetection 3.3 imports and runs
on the CPU as the tests' reference.

Each function here is a PyTorch port of mmcv 2.1's CPU kernel (mmcv-lite ships the C++ sources under
`mmcv/ops/csrc/pytorch/cpu/`), written to follow it operation by operation, and is itself checked against a
literal per-element transcription of that C++ (`tests/test_mmcv_ext.py`). Kernels not ported yet raise
`NotImplementedError` naming themselves when called; they exist as attributes because mmcv's op modules check
at import time that every kernel they use is present (`mmcv.utils.ext_loader.load_ext`).

`install()` registers this module as `mmcv._ext`; call it before mmcv.ops or mmdet is imported.
"""

from __future__ import annotations

import sys

import torch

PORTED = ("nms",)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int) -> torch.Tensor:
    """`nms_cpu` (mmcv/ops/csrc/pytorch/cpu/nms.cpp): indices of the kept boxes, highest score first.

    As the kernel: areas `(x2 - x1 + offset) * (y2 - y1 + offset)`; the order from `scores.sort(0, descending)`;
    walking that order, each still-selected box deselects every later selected box whose overlap
    `inter / (area_i + area_j - inter)` exceeds `iou_threshold` (float32 arithmetic throughout). The inner
    loop over later boxes is done for all of them at once, which gives the same result: a box's own
    selection is only read before any later box is visited, and a deselected box deselects nothing.
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.long)
    x1, y1, x2, y2 = (boxes.select(1, i).contiguous() for i in range(4))
    areas = (x2 - x1 + offset) * (y2 - y1 + offset)
    order = scores.sort(0, descending=True)[1]
    n = boxes.size(0)
    select = torch.ones(n, dtype=torch.bool)
    for _i in range(n):
        if not select[_i]:
            continue
        i = order[_i]
        j = order[_i + 1:]
        xx1 = torch.maximum(x1[i], x1[j])
        yy1 = torch.maximum(y1[i], y1[j])
        xx2 = torch.minimum(x2[i], x2[j])
        yy2 = torch.minimum(y2[i], y2[j])
        w = torch.clamp(xx2 - xx1 + offset, min=0.0)
        h = torch.clamp(yy2 - yy1 + offset, min=0.0)
        inter = w * h
        ovr = inter / (areas[i] + areas[j] - inter)
        select[_i + 1:] &= ~(ovr > iou_threshold)
    return order.masked_select(select)


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def not_ported(*args, **kwargs):
        raise NotImplementedError(f"mmcv._ext.{name}: this mmcv CPU kernel has no port in tests/mmcv_ext.py yet "
                                  f"(ported: {', '.join(PORTED)})")

    not_ported.__name__ = name
    return not_ported


def install() -> None:
    """Make `import mmcv._ext` find this module (idempotent)."""
    sys.modules.setdefault("mmcv._ext", sys.modules[__name__])
