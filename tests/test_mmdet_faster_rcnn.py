"""Faster R-CNN's networks and test-time path against mmdetection 3.3 itself (`openmmlab_reference.py`).

mmdet builds `faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py` (widths and the class count shrunk for the CPU:
`OVERRIDES`, nothing that changes what is computed), with seeded non-trivial weights, strictly imported into
`make_model('faster_rcnn')`. On two images of different sizes in one padded batch the two agree on:

- the pyramid P2-P6 and the RPN's outputs per level;
- the proposals (`test_cfg.rpn`: top 1000 per level, decode, size filter, NMS 0.7 within each level, 1000 per
  image): the same boxes in the same order, the same objectness;
- the box head's logits and deltas for mmdet's own RoIs (RoIAlign through mmcv's kernel, `mmcv_ext.py`);
- the detections (`test_cfg.rcnn`: softmax, class-specific decode, score 0.05, class-aware NMS 0.5, 100 per
  image, rescaled to the original images): the same detections in the same order.

Tolerances as `test_mmdet_parity.py`: 2e-5 relative on network outputs, 1e-3 pixels on boxes, 1e-5 on the
RPN's scores; 5e-5 on the detections' scores, softmax probabilities whose logits (up to ~5 here) agree to 2e-5
relative, so a probability may move by ~1e-4 of itself; counts, order and labels exact.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import openmmlab_reference as mr
from cankd_jax import models
from cankd_jax.detection.rcnn import RCNN_TEST_CFG, rcnn_postprocess
from cankd_jax.detection.rpn import RPN_TEST_PROPOSALS, proposal_rois, proposals
from cankd_jax.interop import torch as interop
from conftest import assert_close

pytestmark = pytest.mark.skipif(mr.available() is not None, reason=str(mr.available()))

K = 5
FPN_CH = 32
OVERRIDES = {"model.backbone.base_channels": 16, "model.neck.in_channels": [64, 128, 256, 512],
             "model.neck.out_channels": FPN_CH, "model.rpn_head.in_channels": FPN_CH,
             "model.rpn_head.feat_channels": FPN_CH, "model.roi_head.bbox_roi_extractor.out_channels": FPN_CH,
             "model.roi_head.bbox_head.in_channels": FPN_CH, "model.roi_head.bbox_head.fc_out_channels": 64,
             "model.roi_head.bbox_head.num_classes": K}
BATCH_SHAPE = (160, 224)
IMG_SHAPES = np.array([[150, 220], [120, 150]], np.float32)
PAD_SHAPES = np.array([[160, 224], [128, 160]], np.float32)
SCALES = np.array([[1.5, 1.5], [0.8, 0.75]], np.float32)


@functools.lru_cache(maxsize=None)
def case() -> dict:
    tm, cfg = mr.build("faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py", OVERRIDES, seed=0)
    mr.perturb_(tm, seed=1)
    with torch.no_grad():  # the box head's fully connected layers: larger than PyTorch's default init
        g = torch.Generator().manual_seed(2)
        for m in tm.roi_head.bbox_head.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
                m.bias.copy_(0.1 * torch.randn(m.out_features, generator=g))
    tm.eval()
    model = models.make_model("faster_rcnn", num_classes=K, backbone_kwargs=dict(base_width=16, stem_width=16),
                              neck_kwargs=dict(out_channels=FPN_CH), head_kwargs=dict(feat_channels=FPN_CH),
                              roi_head_kwargs=dict(fc_out_channels=64))
    variables, report = interop.import_state_dict(model, tm.state_dict())
    x = np.random.default_rng(2).normal(size=(2, *BATCH_SHAPE, 3)).astype(np.float32) * 2
    metas = [mr.img_meta(s, p, BATCH_SHAPE, f) for s, p, f in zip(IMG_SHAPES, PAD_SHAPES, SCALES)]

    with torch.no_grad():
        feats = tm.extract_feat(mr.nchw(x))
        rpn_cls, rpn_reg = tm.rpn_head(feats)
        props = tm.rpn_head.predict_by_feat(rpn_cls, rpn_reg, batch_img_metas=metas, cfg=cfg.model.test_cfg.rpn,
                                            rescale=False)
        from mmdet.structures.bbox import bbox2roi
        rois = bbox2roi([p.bboxes for p in props])
        head = tm.roi_head._bbox_forward(feats, rois)
        dets = tm.roi_head.predict_bbox(feats, metas, [p.clone() for p in props], cfg.model.test_cfg.rcnn,
                                        rescale=True)

    @jax.jit
    def ours(v, x, their_rois):
        out = model.apply(v, x, train=False)
        p = proposals(out["rpn_cls_scores"], out["rpn_bbox_preds"], IMG_SHAPES, cfg=RPN_TEST_PROPOSALS)
        roi, valid = proposal_rois(p)
        head_out = model.apply(v, x, train=False, rois=roi)
        b, m = p.valid.shape
        d = rcnn_postprocess(p.boxes, p.valid, head_out["roi_cls_scores"].reshape(b, m, -1),
                             head_out["roi_bbox_preds"].reshape(b, m, -1), IMG_SHAPES, SCALES, cfg=RCNN_TEST_CFG)
        on_theirs = model.apply(v, x, train=False, rois=their_rois)
        return out, p, d, on_theirs

    out, p, d, on_theirs = ours(variables, x, jnp.asarray(rois.numpy()))
    return dict(tm=tm, report=report, feats=feats, rpn=(rpn_cls, rpn_reg), props=props, head=head, dets=dets,
                out=out, p=p, d=d, on_theirs=on_theirs)


def test_strict_import_of_mmdet_state_dict():
    c = case()
    assert not c["report"].missing and not c["report"].unexpected
    assert any(k.startswith("roi_head.bbox_head.shared_fcs.1") for k in c["report"].loaded)


def test_pyramid_and_rpn_outputs():
    c = case()
    for level, feat in enumerate(c["feats"]):
        assert_close(c["out"][f"fpn.p{level + 2}"], mr.nhwc(feat), rtol=2e-5)
    for ours, theirs in ((c["out"]["rpn_cls_scores"], c["rpn"][0]), (c["out"]["rpn_bbox_preds"], c["rpn"][1])):
        assert len(ours) == len(theirs) == 5
        for a, t in zip(ours, theirs):
            assert_close(a, mr.nhwc(t), rtol=2e-5)


def test_proposals():
    c = case()
    for i, theirs in enumerate(c["props"]):
        n = int(c["p"].num_valid[i])
        assert n == len(theirs) > 100  # enough proposals that NMS decided many of them
        np.testing.assert_allclose(np.asarray(c["p"].boxes[i, :n]), theirs.bboxes.numpy(), atol=1e-3, rtol=0)
        np.testing.assert_allclose(np.asarray(c["p"].scores[i, :n]), theirs.scores.numpy(), atol=1e-5, rtol=0)
        assert not np.asarray(c["p"].valid[i, n:]).any()


def test_box_head_on_mmdets_rois():
    c = case()
    assert_close(c["on_theirs"]["roi_cls_scores"], c["head"]["cls_score"].numpy(), rtol=2e-5)
    assert_close(c["on_theirs"]["roi_bbox_preds"], c["head"]["bbox_pred"].numpy(), rtol=2e-5)


def test_detections():
    c = case()
    for i, theirs in enumerate(c["dets"]):
        n = int(c["d"].num_valid[i])
        assert n == len(theirs) > 10
        np.testing.assert_array_equal(np.asarray(c["d"].labels[i, :n]), theirs.labels.numpy())
        np.testing.assert_allclose(np.asarray(c["d"].scores[i, :n]), theirs.scores.numpy(), atol=5e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(c["d"].boxes[i, :n]), theirs.bboxes.numpy(), atol=1e-3, rtol=0)
