"""RepPoints (moment, GroupNorm neck and head) against mmdetection 3.3 itself: mmdet's own
`reppoints-moment_r50_fpn-gn_head-gn_2x_coco.py`, shrunk for the CPU (widths, classes, GroupNorm groups: 8 of
the 32 neck / head channels), with seeded non-trivial weights, its deformable convs running on the ports of
mmcv's kernels. The same two images, padded batch and ground truth as `test_mmdet_parity.py`; the two must
agree on the strict import, the head outputs in both modes, the targets of both stages, the loss terms and
their gradients (w.r.t. the head outputs and the moment transfer), and `predict_by_feat`.

Tolerances: 2e-5 relative on head outputs, 1e-5 on losses and gradients, boxes as `test_mmdet_parity.py`;
labels, weights, positives and the detections' classes and order are exact.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch

import openmmlab_reference as mr
from cankd_jax import models
from cankd_jax.detection import reppoints as rp
from cankd_jax.interop import torch as interop
from cankd_jax.train.tasks import DetectionTask
from conftest import assert_close
from test_mmdet_parity import IMG_SHAPES, SCALES, _assert_same_detections, _our_labels, _their_gt

pytestmark = pytest.mark.skipif(mr.available() is not None, reason=str(mr.available()))

K, FPN_CH, POINT_CH = 5, 32, 16
CONFIG = "reppoints/reppoints-moment_r50_fpn-gn_head-gn_2x_coco.py"
OVERRIDES = {"model.backbone.base_channels": 16, "model.neck.in_channels": [64, 128, 256, 512],
             "model.neck.out_channels": FPN_CH, "model.neck.norm_cfg.num_groups": 8,
             "model.bbox_head.in_channels": FPN_CH, "model.bbox_head.feat_channels": FPN_CH,
             "model.bbox_head.point_feat_channels": POINT_CH, "model.bbox_head.norm_cfg.num_groups": 8,
             "model.bbox_head.num_classes": K}
KEYS_TRAIN = ("cls_scores", "pts_preds_init", "pts_preds_refine")
KEYS_EVAL = ("cls_scores", "bbox_preds")


@functools.lru_cache(maxsize=None)
def case() -> dict:
    tm, cfg = mr.build(CONFIG, OVERRIDES, seed=0)
    mr.perturb_(tm, seed=1)
    with torch.no_grad():  # a moment transfer away from 0, so that exp() and its gradient are exercised
        tm.bbox_head.moment_transfer.copy_(torch.tensor([0.3, -0.2]))
    model = models.make_model("reppoints", num_classes=K, backbone_kwargs=dict(base_width=16, stem_width=16),
                              neck_kwargs=dict(out_channels=FPN_CH, num_groups=8),
                              head_kwargs=dict(feat_channels=FPN_CH, point_feat_channels=POINT_CH, num_groups=8))
    variables, report = interop.import_state_dict(model, tm.state_dict())
    x = np.random.default_rng(2).normal(size=(2, 160, 224, 3)).astype(np.float32) * 2
    test_cfg = cfg.model.test_cfg
    task = DetectionTask(num_classes=K, detector="reppoints", nms_pre=test_cfg.nms_pre, score_thr=test_cfg.score_thr,
                         max_per_img=test_cfg.max_per_img).for_detector(model, {})
    labels = _our_labels()

    @jax.jit
    def infer(v, x):
        out = model.apply(v, x, train=False)
        return out, task.detect(out, IMG_SHAPES, SCALES)

    @jax.jit
    def train(v, x):
        out, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
        heads = {k: out[k] for k in (*KEYS_TRAIN, "moment_transfer")}
        (_, terms), grads = jax.value_and_grad(lambda h: (lambda t: (sum(t[1].values()), t[1]))(
            task.loss(h, labels)), has_aux=True)(heads)
        return heads, terms, grads, task.targets(heads, labels)

    ours_eval, dets = infer(variables, x)
    ours_train, terms, grads, targets = train(variables, x)
    return dict(tm=tm, cfg=cfg, model=model, variables=variables, report=report, x=x, task=task,
                ours_eval=ours_eval, dets=dets, ours_train=ours_train, terms=terms, grads=grads, targets=targets)


def _heads(tm, x, train: bool):
    tm.train(train)
    with torch.set_grad_enabled(train):
        return tm.bbox_head(tm.extract_feat(mr.nchw(x)))


def test_import_is_strict_and_export_gives_back_the_state_dict():
    c = case()
    assert not c["report"].missing and not c["report"].unexpected
    theirs = c["tm"].state_dict()
    assert "bbox_head.moment_transfer" in theirs and "neck.fpn_convs.4.gn.weight" in theirs
    exported = interop.export_state_dict(c["model"], c["variables"])
    assert set(exported) == set(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)


@pytest.mark.parametrize("train", [False, True])
def test_head_outputs(train):
    c = case()
    theirs = _heads(c["tm"], c["x"], train)
    ours = c["ours_train"] if train else c["ours_eval"]
    for key, levels in zip(KEYS_TRAIN if train else KEYS_EVAL, theirs, strict=True):
        for level, (a, b) in enumerate(zip(ours[key], levels, strict=True)):
            assert_close(a, mr.nhwc(b), rtol=2e-5, what=f"{key}[{level}] train={train}")


def _their_targets(c):
    """mmdet's `get_targets` results of both stages, recorded while its own `loss_by_feat` runs."""
    head = c["tm"].bbox_head
    recorded = {}
    original = head.get_targets

    def recording(*args, stage="init", **kwargs):
        out = original(*args, stage=stage, **kwargs)
        recorded[stage] = out
        return out

    head.get_targets = recording
    try:
        gts, ignore, metas = _their_gt()
        outs = [[t.detach() for t in levels] for levels in _heads(c["tm"], c["x"], True)]
        head.loss_by_feat(*outs, gts, metas, ignore)
    finally:
        del head.get_targets
    return recorded


def test_targets_of_both_stages():
    c = case()
    t = c["targets"]
    theirs = _their_targets(c)
    cat = lambda levels: np.concatenate([x.numpy() for x in levels], axis=1)  # noqa: E731  per level (B, n_l, ...)
    *_, bbox_gt_init, _, weights_init, avg_init = theirs["init"]
    pos_init = cat(weights_init)[..., 0] > 0
    np.testing.assert_array_equal(np.asarray(t.pos_init), pos_init)
    np.testing.assert_array_equal(np.asarray(t.bbox_gt_init)[pos_init], cat(bbox_gt_init)[pos_init])
    assert int(pos_init.sum()) == int(avg_init) >= 12  # one location per gt (none stolen here)
    labels, label_weights, bbox_gt_refine, _, weights_refine, avg_refine = theirs["refine"]
    np.testing.assert_array_equal(np.asarray(t.labels), cat(labels))
    np.testing.assert_array_equal(np.asarray(t.label_weights), cat(label_weights))
    pos = cat(weights_refine)[..., 0] > 0
    np.testing.assert_array_equal(np.asarray(t.pos_refine), pos)
    np.testing.assert_allclose(np.asarray(t.bbox_gt_refine)[pos], cat(bbox_gt_refine)[pos], rtol=0, atol=0)
    assert int(pos.sum()) == int(avg_refine) and (cat(label_weights) == 0).any()  # ignored proposals exist


def test_losses_and_their_gradients():
    c = case()
    gts, ignore, metas = _their_gt()
    head = c["tm"].bbox_head
    head.zero_grad()
    outs = [[t.detach().requires_grad_(True) for t in levels] for levels in _heads(c["tm"], c["x"], True)]
    losses = head.loss_by_feat(*outs, gts, metas, ignore)
    totals = {k: sum(v) for k, v in losses.items()}
    assert set(totals) == set(c["terms"]) == {"loss_cls", "loss_pts_init", "loss_pts_refine"}
    for key, value in totals.items():
        assert_close(c["terms"][key], value.detach().numpy(), rtol=1e-5, what=key)
        assert float(value.detach()) > 0, key
    sum(totals.values()).backward()
    for key, levels in zip(KEYS_TRAIN, outs, strict=True):
        for level, t in enumerate(levels):
            assert_close(c["grads"][key][level], mr.nhwc(t.grad), rtol=1e-5, what=f"d loss / d {key}[{level}]")
    # the parameter's gradient is moment_mul (0.01) of the mixed value's, which the head outputs
    assert_close(np.asarray(c["grads"]["moment_transfer"]) * head.moment_mul, head.moment_transfer.grad.numpy(),
                 rtol=1e-5, what="d loss / d moment_transfer")


def test_predict():
    c = case()
    _, _, metas = _their_gt()
    theirs = c["tm"].bbox_head.predict_by_feat(*_heads(c["tm"], c["x"], False), batch_img_metas=metas, rescale=True)
    assert all(len(r.scores) == c["cfg"].model.test_cfg.max_per_img for r in theirs)
    _assert_same_detections(c["dets"], theirs)


def test_points_to_boxes_is_the_moment_box():
    """Nine points on a 3 x 3 grid of spacing d: centre, and half extents std * exp(transfer) with the
    unbiased std sqrt(6 d^2 / 8)."""
    d, cx, cy = 2.0, 5.0, -3.0
    grid = np.array([(cy + dy * d, cx + dx * d) for dy in (-1, 0, 1) for dx in (-1, 0, 1)], np.float32).reshape(-1)
    box = np.asarray(rp.points_to_boxes(grid, np.array([0.5, -0.5], np.float32)))
    std = np.sqrt(6 * d * d / 8)
    np.testing.assert_allclose(box, [cx - std * np.exp(0.5), cy - std * np.exp(-0.5), cx + std * np.exp(0.5),
                                     cy + std * np.exp(-0.5)], rtol=1e-6)


@pytest.mark.slow  # heavy: a whole (narrowed) deformable ResNeXt against mmdet
def test_x101_dcn_teacher_trunk_reads_mmdets_checkpoint_strictly():
    """The teacher's trunk (`reppoints_fpn` on `resnext101_32x4d_dcn`) against mmdet's own
    `reppoints-moment_x101-dconv-c3-c5_fpn-gn_head-gn_2x_coco.py` (narrowed: 16 base channels, 4 groups, FPN 32
    wide with 8 GroupNorm groups): only `backbone.*` and `neck.*` of the detector's state dict are read, strictly
    (the head's keys listed as ignored), and P3-P7 equal mmdet's `extract_feat` in inference mode."""
    tm, _ = mr.build("reppoints/reppoints-moment_x101-dconv-c3-c5_fpn-gn_head-gn_2x_coco.py",
                     {**OVERRIDES, "model.backbone.groups": 4}, seed=3)
    mr.perturb_(tm, seed=4)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, m in tm.named_modules():
            if name.endswith("conv_offset"):
                m.weight.copy_(0.02 * torch.randn(m.weight.shape, generator=g))
    trunk = models.make_model("reppoints_fpn", backbone="resnext101_32x4d_dcn",
                              backbone_kwargs=dict(groups=4, base_width=16, stem_width=16),
                              out_channels=FPN_CH, num_groups=8)
    variables, report = interop.import_state_dict(trunk, tm.state_dict())
    assert not report.missing and not report.unexpected
    assert report.ignored and all(k.startswith("bbox_head.") for k in report.ignored)
    assert "backbone.layer3.22.conv2.conv_offset.weight" in report.loaded
    x = np.random.default_rng(6).normal(size=(1, 96, 128, 3)).astype(np.float32)
    tm.eval()
    with torch.no_grad():
        theirs = tm.extract_feat(mr.nchw(x))
    ours = jax.jit(lambda v, x: trunk.apply(v, x, train=False))(variables, x)
    for k, t in zip(range(3, 8), theirs, strict=True):
        assert_close(ours[f"fpn.p{k}"], mr.nhwc(t), rtol=2e-5, what=f"fpn.p{k}")
