"""DINO's denoising queries and losses against mmdetection 3.3 itself.

- `CdnQueryGenerator` (dynamic groups from `num_dn_queries`, label noise 0.5, box noise 1.0) with its random
  draws replayed from ours (its `torch.rand_like` / `torch.randint_like` calls answered in order with our
  `DnNoise`, mapped to its flat query order): the noised labels, the inverse-sigmoid boxes and the attention
  mask of the slots this batch uses; the slots past them are cut off from everything. Exact, but for the
  boxes (float32 rounding of the same expressions, 1e-6).
- `DINOHead.loss_by_feat` of mmdet's own `dino-4scale_r50_8xb2-12e_coco.py` head (Hungarian matching on every
  decoder layer and the encoder's proposals, the denoising targets): all 3 x (2 + 1 + 2) terms and their
  gradients with respect to every prediction, for a batch whose images have 3, 1 and 0 objects, padded to 5 in
  scattered places. Tolerance 1e-5 relative (float32 sums of a few hundred terms).
"""

from __future__ import annotations

import contextlib
import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import openmmlab_reference as mr
from cankd_jax.detection import dino as dd
from conftest import assert_close

pytestmark = pytest.mark.skipif(mr.available() is not None, reason=str(mr.available()))

K, Q, NUM_DN, G, LAYERS = 6, 20, 8, 5, 2
IMG_SHAPES = np.array([[100, 140], [90, 120], [120, 80]], np.float32)
VALID = np.array([[False, True, False, True, True], [True, False, False, False, False], [False] * 5])


def _gt(seed=0):
    rng = np.random.default_rng(seed)
    boxes = np.zeros((3, G, 4), np.float32)
    for i, (h, w) in enumerate(IMG_SHAPES):
        x1, y1 = rng.uniform(0, w * 0.6, G), rng.uniform(0, h * 0.6, G)
        boxes[i] = np.stack([x1, y1, x1 + rng.uniform(5, w * 0.4, G), y1 + rng.uniform(5, h * 0.4, G)], 1)
    labels = rng.integers(0, K, (3, G)).astype(np.int32)
    return boxes, labels


def _samples(boxes, labels):
    from mmdet.structures import DetDataSample

    out = []
    for i, (h, w) in enumerate(IMG_SHAPES):
        s = DetDataSample(metainfo=mr.img_meta((h, w), (h, w), (120, 140), (1.0, 1.0)))
        s.gt_instances = mr.gt_instances(boxes[i][VALID[i]], labels[i][VALID[i]])
        out.append(s)
    return out


def _flat_to_slot(layout):
    """mmdet's flat denoising order (copy c of the batch's concatenated objects) -> our (image, slot)."""
    m = int(layout.max_objects)
    pairs = [(i, j) for i in range(3) for j in range(int(VALID[i].sum()))]
    return [(i, m * c + j) for c in range(2 * int(layout.num_groups)) for i, j in pairs]


@contextlib.contextmanager
def _replayed(noise, layout):
    """mmdet's generator draws, in its call order, taken from ours."""
    where = _flat_to_slot(layout)
    rows, cols = np.array([w[0] for w in where]), np.array([w[1] for w in where])
    p = torch.from_numpy(np.asarray(noise.p)[rows, cols])
    new = np.asarray(noise.new_label)[rows, cols]
    sign01 = torch.from_numpy((np.asarray(noise.sign)[rows, cols] + 1) / 2)
    part = torch.from_numpy(np.asarray(noise.part)[rows, cols])
    rand_like = iter([p, part])
    chosen = torch.nonzero(p < 0.25).view(-1)
    randint_like = iter([torch.from_numpy(new[chosen.numpy()]).long(), sign01.float()])
    with mock.patch.object(torch, "rand_like", side_effect=lambda *a, **k: next(rand_like)), \
            mock.patch.object(torch, "randint_like", side_effect=lambda *a, **k: next(randint_like)):
        yield


@functools.lru_cache(maxsize=None)
def _cdn_case():
    from mmdet.models.layers.transformer.dino_layers import CdnQueryGenerator

    boxes, labels = _gt()
    layout = dd.dn_layout(jnp.asarray(VALID), NUM_DN)
    d = dd.num_dn_slots(NUM_DN, G)
    noise = dd.dn_noise(jax.random.key(7), 3, d, K)
    ours = dd.cdn_queries(noise, layout, boxes, labels, IMG_SHAPES, num_matching_queries=Q)
    torch.manual_seed(0)
    gen = CdnQueryGenerator(num_classes=K, embed_dims=8, num_matching_queries=Q, label_noise_scale=0.5,
                            box_noise_scale=1.0, group_cfg=dict(dynamic=True, num_dn_queries=NUM_DN))
    with _replayed(noise, layout), torch.no_grad():
        label_q, bbox_q, mask, meta = gen(_samples(boxes, labels))
    table = gen.label_embedding.weight.detach()
    eq = (label_q[:, :, None, :] == table[None, None]).all(-1)
    their_labels = torch.where(eq.any(-1), eq.float().argmax(-1), torch.full(eq.shape[:2], -1)).numpy()
    return dict(layout=layout, noise=noise, ours=ours, labels=their_labels, boxes=bbox_q.numpy(), mask=mask.numpy(),
                meta=meta, gt=(boxes, labels), d=d)


def test_denoising_queries_match_mmdet():
    c = _cdn_case()
    used = c["meta"]["num_denoising_queries"]
    assert used == 2 * 3 * (NUM_DN // 3) == 12 and c["meta"]["num_denoising_groups"] == int(c["layout"].num_groups)
    ours = c["ours"]
    np.testing.assert_array_equal(np.asarray(ours.labels)[:, :used], c["labels"])
    assert np.all(np.asarray(ours.labels)[:, used:] == -1)
    assert_close(np.asarray(ours.boxes)[:, :used], c["boxes"], rtol=1e-6, what="noised boxes")
    keep = np.r_[0:used, c["d"]:c["d"] + Q]
    mask = np.asarray(ours.attn_mask)
    for b in range(3):
        np.testing.assert_array_equal(mask[b][np.ix_(keep, keep)], c["mask"])
    # the slots this batch does not use see only themselves and are seen by nobody
    gone = np.r_[used:c["d"]]
    assert np.all(mask[:, gone][:, :, np.r_[0:gone[0], gone[-1] + 1:c["d"] + Q]])
    assert np.all(mask[:, :, gone][:, np.r_[0:gone[0], gone[-1] + 1:c["d"] + Q]])
    assert not np.any(mask[:, gone, gone])
    # some labels were replaced and some kept, so both branches of the label noise ran
    p = np.asarray(c["noise"].p)[:, :used][np.asarray(c["layout"].gt)[:, :used] >= 0]
    assert (p < 0.25).any() and (p >= 0.25).any()


def _their_head():
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    cfg = Config.fromfile(f"{mr.CONFIGS}/dino/dino-4scale_r50_8xb2-12e_coco.py").model
    head_cfg = cfg.bbox_head
    head_cfg.update(num_classes=K, share_pred_layer=False, num_pred_layer=LAYERS + 1, as_two_stage=True,
                    train_cfg=cfg.train_cfg, test_cfg=cfg.test_cfg)
    with DefaultScope.overwrite_default_scope("mmdet"):
        return MODELS.build(head_cfg)


def _predictions(c, seed=1):
    """Outputs as DINO's head gives them, some matching queries near an object so the matching means
    something: (ours with D static slots, theirs with the used ones)."""
    rng = np.random.default_rng(seed)
    d, used = c["d"], c["meta"]["num_denoising_queries"]
    cls = rng.normal(-1.5, 1.5, (LAYERS, 3, d + Q, K)).astype(np.float32)
    box = (1 / (1 + np.exp(-rng.normal(0, 1.2, (LAYERS, 3, d + Q, 4))))).astype(np.float32)
    boxes, _ = c["gt"]
    for i in range(3):
        h, w = IMG_SHAPES[i]
        for j in np.flatnonzero(VALID[i]):
            x1, y1, x2, y2 = boxes[i, j] / [w, h, w, h]
            box[:, i, d + rng.integers(Q)] = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1] + rng.normal(0, .02, 4)
    enc_cls = rng.normal(-1.5, 1.5, (3, Q, K)).astype(np.float32)
    enc_box = (1 / (1 + np.exp(-rng.normal(0, 1.2, (3, Q, 4))))).astype(np.float32)
    ours = dict(cls_scores=cls, bbox_preds=box, enc_cls_scores=enc_cls, enc_bbox_preds=enc_box)
    keep = np.r_[0:used, d:d + Q]
    theirs = dict(cls_scores=cls[:, :, keep], bbox_preds=box[:, :, keep], enc_cls_scores=enc_cls,
                  enc_bbox_preds=enc_box)
    return ours, theirs, keep


def test_losses_and_gradients_match_mmdet():
    c = _cdn_case()
    ours_in, theirs_in, keep = _predictions(c)
    boxes, labels = c["gt"]
    head = _their_head()
    samples = _samples(boxes, labels)
    t = {k: torch.tensor(v, requires_grad=True) for k, v in theirs_in.items()}
    want = head.loss_by_feat(t["cls_scores"], t["bbox_preds"], t["enc_cls_scores"], t["enc_bbox_preds"],
                             [s.gt_instances for s in samples], [s.metainfo for s in samples], c["meta"])
    sum(want.values()).backward()

    def losses(inputs):
        return dd.dino_losses(inputs, jnp.asarray(boxes), jnp.asarray(labels), jnp.asarray(VALID),
                              jnp.asarray(IMG_SHAPES), num_classes=K, num_dn=c["d"], layout=c["layout"])

    got = jax.jit(losses)(ours_in)
    assert sorted(got) == sorted(want) and len(got) == 3 * (LAYERS + 1 + LAYERS)
    for k, v in want.items():
        assert_close(got[k], v.item(), rtol=1e-5, what=k)
    grads = jax.jit(jax.grad(lambda x: sum(losses(x).values())))(ours_in)
    for k, v in t.items():
        g = np.asarray(grads[k])
        g_used = g[:, :, keep] if k in ("cls_scores", "bbox_preds") else g
        assert_close(g_used, v.grad.numpy(), rtol=1e-5, what=f"d/d{k}")
        if k in ("cls_scores", "bbox_preds"):  # the slots this batch does not use get no gradient
            assert not np.any(np.delete(g, keep, axis=2))


def test_postprocess_matches_mmdet_predict_by_feat():
    """`predict_by_feat` of mmdet's DINO head on the last decoder layer (300 best (query, class) pairs, boxes to
    the image, clipped, rescaled by the scale factor) against `dino_postprocess`, boxes partly outside the
    images so the clipping shows."""
    from mmdet.structures import DetDataSample

    rng = np.random.default_rng(11)
    q, layers = 80, 2
    cls = rng.normal(-2, 1.5, (layers, 3, q, K)).astype(np.float32)
    box = np.concatenate([rng.uniform(0.05, 0.95, (layers, 3, q, 2)), rng.uniform(0.05, 0.9, (layers, 3, q, 2))],
                         -1).astype(np.float32)
    scale = np.array([[0.5, 0.5], [1.25, 1.2], [0.8, 0.75]], np.float32)
    metas = [DetDataSample(metainfo=mr.img_meta(s, s, (120, 140), f)).metainfo for s, f in zip(IMG_SHAPES, scale)]
    head = _their_head()
    head.test_cfg = dict(max_per_img=300)
    with torch.no_grad():
        want = head.predict_by_feat(torch.from_numpy(cls), torch.from_numpy(box), metas, rescale=True)
    got = jax.jit(lambda c, b: dd.dino_postprocess(c, b, jnp.asarray(IMG_SHAPES), jnp.asarray(scale)))(cls[-1], box[-1])
    for i, w in enumerate(want):
        np.testing.assert_array_equal(np.asarray(got.labels[i]), w.labels.numpy())
        assert_close(got.scores[i], w.scores.numpy(), rtol=1e-6, what="scores")
        assert_close(got.boxes[i], w.bboxes.numpy(), rtol=1e-6, what="boxes")
    assert np.any(np.asarray(got.boxes)[..., 2] == IMG_SHAPES[:, 1, None] / scale[:, 0, None])  # some were clipped
    with pytest.raises(ValueError, match="max_per_img=500 exceeds the 80 queries x 6 classes"):
        dd.dino_postprocess(cls[-1], box[-1], IMG_SHAPES, scale, max_per_img=500)
