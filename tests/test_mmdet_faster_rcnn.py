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
from flax import traverse_util

import openmmlab_reference as mr
from cankd_jax import models
from cankd_jax.detection.rcnn import RCNN_TEST_CFG, rcnn_postprocess
from cankd_jax.detection.rpn import RPN_TEST_PROPOSALS, proposal_rois, proposals
from cankd_jax.interop import torch as interop
from conftest import assert_close

# The slow tier: building mmdet's Faster R-CNN and Cascade Mask R-CNN and sampling their training batch takes about
# a minute here, which the quick tier (<= 5 minutes) cannot hold; CI runs both tiers.
pytestmark = [pytest.mark.skipif(mr.available() is not None, reason=str(mr.available())), pytest.mark.slow]

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


# ---------------------------------------------------------------------------------------------------------------
# Training: targets, sampling fed from mmdet, losses and their gradients with respect to the heads' outputs.

G = 12  # padded ground-truth rows


def _gt():
    r = np.random.default_rng(5)
    out = []
    for (h, w), n in zip(IMG_SHAPES, (9, 6)):
        wh = np.exp(r.uniform(np.log(8), np.log(0.7 * min(h, w)), (n, 2)))
        xy = r.uniform(0, 1, (n, 2)) * ([w, h] - wh)
        out.append((np.concatenate([xy, xy + wh], 1).astype(np.float32), r.integers(0, K, n)))
    return out


GT = _gt()


def _recording(sampler):
    """Wrap an mmdet sampler so that each call's `SamplingResult` is kept, in call order (one per image)."""
    seen = []
    original = sampler.sample

    def sample(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append(result)
        return result

    sampler.sample = sample
    return seen


def _mask(n: int, index: torch.Tensor) -> np.ndarray:
    m = np.zeros(n, bool)
    m[index.numpy()] = True
    return m


@functools.lru_cache(maxsize=None)
def train_case() -> dict:
    from mmdet.structures.bbox import bbox2roi

    from cankd_jax.detection.rcnn import candidate_assignment, rcnn_loss, rcnn_sample_single
    from cankd_jax.detection.rpn import RPN_ANCHORS, RPN_TRAIN_PROPOSALS, rpn_loss, rpn_targets_single
    from cankd_jax.detection.samplers import Sample

    c = case()
    tm, feats = c["tm"], c["feats"]
    cfg = mr.build("faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py", OVERRIDES, seed=0)[1]
    metas = [mr.img_meta(s, p, BATCH_SHAPE, f) for s, p, f in zip(IMG_SHAPES, PAD_SHAPES, SCALES)]
    gts = [mr.gt_instances(b, l) for b, l in GT]
    rpn_gts = [mr.gt_instances(b, np.zeros_like(l)) for b, l in GT]  # mmdet's RPN sees class 0 only
    torch.manual_seed(0)

    # The RPN's loss, on leaf copies of its outputs.
    cls = [t.detach().clone().requires_grad_(True) for t in c["rpn"][0]]
    reg = [t.detach().clone().requires_grad_(True) for t in c["rpn"][1]]
    rpn_samples = _recording(tm.rpn_head.sampler)
    rpn_losses = tm.rpn_head.loss_by_feat(cls, reg, rpn_gts, metas)
    (sum(rpn_losses["loss_rpn_cls"]) + sum(rpn_losses["loss_rpn_bbox"])).backward()
    # The training proposals and the box head's loss on mmdet's sampled RoIs.
    with torch.no_grad():
        props = tm.rpn_head.predict_by_feat(c["rpn"][0], c["rpn"][1], batch_img_metas=metas,
                                            cfg=cfg.model.train_cfg.rpn_proposal, rescale=False)
    roi_samples, assigns = [], []
    for i in range(2):
        p = props[i].clone()
        p.priors = p.pop("bboxes")
        assign = tm.roi_head.bbox_assigner.assign(p, gts[i], None)
        assigns.append(assign.gt_inds.clone())
        roi_samples.append(tm.roi_head.bbox_sampler.sample(assign, p, gts[i]))
    rois = bbox2roi([s.priors for s in roi_samples])
    with torch.no_grad():
        head = tm.roi_head._bbox_forward(feats, rois)
    cls_score = head["cls_score"].detach().clone().requires_grad_(True)
    bbox_pred = head["bbox_pred"].detach().clone().requires_grad_(True)
    targets = tm.roi_head.bbox_head.get_targets(roi_samples, cfg.model.train_cfg.rcnn)
    roi_losses = tm.roi_head.bbox_head.loss(cls_score, bbox_pred, rois, *targets)
    (roi_losses["loss_cls"] + roi_losses["loss_bbox"]).backward()

    # Ours: the RPN's targets from mmdet's sampled anchors (indices into the anchors valid on each image).
    sizes = [tuple(t.shape[2:]) for t in c["rpn"][0]]
    anchors = np.concatenate(RPN_ANCHORS.grid_anchors(sizes))
    a = anchors.shape[0]
    boxes = np.zeros((2, G, 4), np.float32)
    labels = np.zeros((2, G), np.int32)
    valid = np.zeros((2, G), bool)
    for i, (b, l) in enumerate(GT):
        boxes[i, :len(b)], labels[i, :len(b)], valid[i, :len(b)] = b, l, True
    rpn_t = []
    for i in range(2):
        flags = np.concatenate([np.asarray(f) for f in RPN_ANCHORS.valid_flags(sizes, PAD_SHAPES[i])])
        where = np.flatnonzero(flags)
        s = rpn_samples[i]
        sample = Sample(jnp.asarray(_mask(a, torch.from_numpy(where[s.pos_inds.numpy()]))),
                        jnp.asarray(_mask(a, torch.from_numpy(where[s.neg_inds.numpy()]))))
        rpn_t.append(rpn_targets_single(anchors, flags, boxes[i], valid[i], sample=sample))
    rpn_t = jax.tree.map(lambda *x: jnp.stack(x), *rpn_t)
    cls_ours = jnp.concatenate([jnp.asarray(mr.nhwc(t.detach())).reshape(2, -1) for t in c["rpn"][0]], 1)
    reg_ours = jnp.concatenate([jnp.asarray(mr.nhwc(t.detach())).reshape(2, -1, 4) for t in c["rpn"][1]], 1)
    rpn_ours, rpn_grads = jax.value_and_grad(lambda cl, rg: sum(rpn_loss(cl, rg, rpn_t).values()), argnums=(0, 1))(
        cls_ours, reg_ours)
    rpn_terms = rpn_loss(cls_ours, reg_ours, rpn_t)

    # Ours: the training proposals, the candidates' assignment, the box head's targets from mmdet's sample.
    out = c["out"]
    ours_props = jax.jit(lambda o: proposals(o["rpn_cls_scores"], o["rpn_bbox_preds"], IMG_SHAPES,
                                             cfg=RPN_TRAIN_PROPOSALS))(out)
    m = ours_props.boxes.shape[1]
    samples, gt_inds = [], []
    for i in range(2):
        _, inds = candidate_assignment(ours_props.boxes[i], ours_props.valid[i], boxes[i], valid[i])
        gt_inds.append(np.asarray(inds))
        g_i, s = len(GT[i][0]), roi_samples[i]

        def ours_index(j: np.ndarray) -> np.ndarray:  # mmdet's (gts, then proposals) -> our (G slots, M slots)
            return np.where(j < g_i, j, G + j - g_i)

        sample = Sample(jnp.asarray(_mask(G + m, torch.from_numpy(ours_index(s.pos_inds.numpy())))),
                        jnp.asarray(_mask(G + m, torch.from_numpy(ours_index(s.neg_inds.numpy())))))
        samples.append(rcnn_sample_single(ours_props.boxes[i], ours_props.valid[i], boxes[i], labels[i], valid[i],
                                          num_classes=K, sample=sample))
    samples = jax.tree.map(lambda *x: jnp.stack(x), *samples)
    # mmdet's head outputs, laid out in our slots (each image's sampled RoIs first, in the same order).
    slots = samples.valid.shape[1]
    rows = np.full((2 * slots,), -1)
    start = 0
    for i, s in enumerate(roi_samples):
        n = len(s.pos_inds) + len(s.neg_inds)
        rows[i * slots:i * slots + n] = np.arange(start, start + n)
        start += n
    take = np.maximum(rows, 0)
    cls_in = jnp.where(rows[:, None] >= 0, jnp.asarray(cls_score.detach().numpy())[take], 0.0)
    reg_in = jnp.where(rows[:, None] >= 0, jnp.asarray(bbox_pred.detach().numpy())[take], 0.0)
    roi_ours, roi_grads = jax.value_and_grad(lambda cl, rg: sum(rcnn_loss(cl, rg, samples).values()),
                                             argnums=(0, 1))(cls_in, reg_in)
    roi_terms = rcnn_loss(cls_in, reg_in, samples)
    return dict(rpn_losses=rpn_losses, cls=cls, reg=reg, rpn_terms=rpn_terms, rpn_grads=rpn_grads, props=props,
                ours_props=ours_props, assigns=assigns, gt_inds=gt_inds, roi_samples=roi_samples, samples=samples,
                rois=rois, targets=targets, roi_losses=roi_losses, cls_score=cls_score, bbox_pred=bbox_pred,
                roi_terms=roi_terms, roi_grads=roi_grads, rows=rows)


def test_training_proposals():
    t = train_case()
    for i, theirs in enumerate(t["props"]):
        n = int(t["ours_props"].num_valid[i])
        assert n == len(theirs) > 100
        np.testing.assert_allclose(np.asarray(t["ours_props"].boxes[i, :n]), theirs.bboxes.numpy(), atol=1e-3, rtol=0)


def test_rpn_loss_and_gradients():
    t = train_case()
    for ours, theirs in (("loss_rpn_cls", "loss_rpn_cls"), ("loss_rpn_bbox", "loss_rpn_bbox")):
        np.testing.assert_allclose(float(t["rpn_terms"][ours]), float(sum(t["rpn_losses"][theirs])), rtol=1e-5)
    assert float(sum(t["rpn_losses"]["loss_rpn_bbox"])) > 0  # positives were sampled
    g_cls = np.concatenate([mr.nhwc(x.grad).reshape(2, -1) for x in t["cls"]], 1)
    g_reg = np.concatenate([mr.nhwc(x.grad).reshape(2, -1, 4) for x in t["reg"]], 1)
    assert_close(t["rpn_grads"][0], g_cls, rtol=1e-5)
    assert_close(t["rpn_grads"][1], g_reg, rtol=1e-5)


def test_candidate_assignment_matches_mmdet():
    """On the same proposals (mmdet's training proposals equal ours, above), the max-IoU assignment of every
    proposal: mmdet's gt_inds (0 negative, i + 1 positive of gt i) against ours (BACKGROUND, i)."""
    t = train_case()
    for i, theirs in enumerate(t["assigns"]):
        n = len(theirs)
        ours = t["gt_inds"][i][G:G + n]
        np.testing.assert_array_equal(np.where(ours >= 0, ours + 1, 0), theirs.numpy())
        assert (theirs.numpy() > 0).any() and (theirs.numpy() == 0).any()


def test_rcnn_targets_loss_and_gradients():
    t = train_case()
    labels, label_weights, bbox_targets, bbox_weights = (np.asarray(x) for x in t["targets"])
    rows = t["rows"]
    used = rows >= 0
    s = t["samples"]
    assert int(np.sum(np.asarray(s.valid))) == len(labels)
    np.testing.assert_array_equal(np.asarray(s.labels).reshape(-1)[used], labels)
    # Our RoIs are our proposals, which match mmdet's to 1e-3 px (decoding in another order of float32 ops);
    # a delta target moves by that over (box size x std 0.1 / 0.2), so by up to ~2e-3 for 5-px boxes.
    np.testing.assert_allclose(np.asarray(s.boxes).reshape(-1, 4)[used], t["rois"][:, 1:].numpy(), atol=1e-3, rtol=0)
    np.testing.assert_allclose(np.asarray(s.bbox_targets).reshape(-1, 4)[used], bbox_targets, atol=2e-3, rtol=0)
    for name in ("loss_cls", "loss_bbox"):
        np.testing.assert_allclose(float(t["roi_terms"][name]), float(t["roi_losses"][name]), rtol=1e-5)
    assert float(t["roi_losses"]["loss_bbox"]) > 0
    assert_close(np.asarray(t["roi_grads"][0])[used], t["cls_score"].grad.numpy(), rtol=1e-5)
    assert_close(np.asarray(t["roi_grads"][1])[used], t["bbox_pred"].grad.numpy(), rtol=1e-5)
    assert not np.asarray(t["roi_grads"][0])[~used].any()  # unused slots take no part


def test_cascade_teacher_trunk_and_dagger_load_what_mmdet_and_mmengine_load(tmp_path):
    """mmdet's Cascade Mask R-CNN (its own config file, shrunk as above) as the cmrcnn_x101 teacher: its
    `backbone.*` and `neck.*` load strictly into the `cascade_rcnn_fpn` trunk (the heads' keys listed as ignored),
    which gives mmdet's P2-P6. And configs/coco.py:detector=faster_rcnn,teacher=cmrcnn_x101,dagger=true starts the
    student's neck and box head from it as the authors' dagger config does: mmengine's `PretrainedInit` with
    `prefix='neck.'` and `prefix='roi_head.bbox_head.0'` into mmdet's Faster R-CNN. The same tensors load, to the
    bit; the class-agnostic `fc_reg` (4 outputs, not 4 x K) is skipped by both."""
    from mmengine.model.weight_init import PretrainedInit

    from cankd_jax.config_arg import load_config
    from cankd_jax.train.weights import load_pretrained

    overrides = {k: v for k, v in OVERRIDES.items() if not k.startswith("model.roi_head.bbox_head")}
    overrides.update({f"model.roi_head.bbox_head.{i}.{k}": v for i in range(3)
                      for k, v in (("in_channels", FPN_CH), ("fc_out_channels", 64), ("num_classes", K))})
    overrides.update({"model.roi_head.mask_roi_extractor.out_channels": FPN_CH,
                      "model.roi_head.mask_head.in_channels": FPN_CH, "model.roi_head.mask_head.num_classes": K})
    teacher, _ = mr.build("cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py", overrides, seed=3)
    mr.perturb_(teacher, seed=4)
    teacher.eval()
    path = str(tmp_path / "cascade.pth")
    torch.save({"state_dict": teacher.state_dict()}, path)

    trunk = models.make_model("cascade_rcnn_fpn", backbone="resnet50",
                              backbone_kwargs=dict(base_width=16, stem_width=16), out_channels=FPN_CH)
    trunk_vars, report = interop.load_checkpoint(path, trunk)
    assert not report.missing and not report.unexpected
    assert any(k.startswith("roi_head.bbox_head.2.") for k in report.ignored)
    x = np.random.default_rng(6).normal(size=(1, 96, 128, 3)).astype(np.float32)
    with torch.no_grad():
        theirs_p = teacher.extract_feat(mr.nchw(x))
    ours_p = trunk.apply(trunk_vars, jnp.asarray(x), train=False)
    for k, t in zip(range(2, 7), theirs_p, strict=True):
        assert_close(ours_p[f"fpn.p{k}"], mr.nhwc(t), rtol=2e-5)

    theirs, _ = mr.build("faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py", OVERRIDES, seed=5)
    before = {k: v.clone() for k, v in theirs.state_dict().items()}
    PretrainedInit(checkpoint=path, prefix="neck.")(theirs.neck)
    PretrainedInit(checkpoint=path, prefix="roi_head.bbox_head.0")(theirs.roi_head.bbox_head)
    after = theirs.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}

    cfg = load_config("configs/coco.py", "detector=faster_rcnn,teacher=cmrcnn_x101,dagger=true")
    model = models.make_model("faster_rcnn", num_classes=K, backbone_kwargs=dict(base_width=16, stem_width=16),
                              neck_kwargs=dict(out_channels=FPN_CH), head_kwargs=dict(feat_channels=FPN_CH),
                              roi_head_kwargs=dict(fc_out_channels=64))
    sample = jnp.zeros((1, 64, 64, 3), jnp.float32)
    loaded = load_pretrained(cfg.student, model, sample, teacher_cfg=dict(checkpoint=path))
    layout = interop.state_dict_layout(model, sample=sample)
    ours = {key for key, slot in layout.items() if (slot.collection, *slot.path) in loaded}
    assert ours == changed and any(k.startswith("roi_head.bbox_head.shared_fcs") for k in ours)
    assert not any("fc_reg" in k or k.startswith(("rpn_head.", "backbone.")) for k in ours)
    variables = traverse_util.flatten_dict(jax.eval_shape(lambda: model.init(jax.random.key(0), sample, train=False)))
    variables = {k: loaded.get(k, np.zeros(a.shape, a.dtype)) for k, a in variables.items()}
    exported = interop.export_state_dict(model, traverse_util.unflatten_dict(variables), sample=sample)
    for key in ours:
        np.testing.assert_array_equal(exported[key], after[key].numpy(), err_msg=key)
