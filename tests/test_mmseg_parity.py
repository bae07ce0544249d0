"""The paper's segmenters against mmsegmentation 1.2.2 itself (`openmmlab_reference.py`).

DeepLabV3 and PSPNet on ResNet-18-d8 (the students) and DeepLabV3 on ResNet-101-d8 (the teacher, at a
quarter of the width), each built by mmseg from its own Cityscapes config file with the class count and
head widths shrunk (`OVERRIDES`), given seeded non-trivial weights and BatchNorm statistics, and strictly
imported into ours. Two settings are changed on both sides, neither changing what is computed on one
device: SyncBN becomes BN (the same statistics with one process; SyncBN needs a process group), and the
heads' dropout (a random draw, PyTorch's, which no other framework reproduces) is off. They must agree on:

- the decode and auxiliary heads' logits in inference mode (BatchNorm on running statistics), all three,
  and in training mode (batch statistics) for the two students (the R101 teacher only ever runs in
  inference mode; in training mode its 33 blocks of batch statistics grow float32 rounding to 1e-3);
- the students' decode and auxiliary cross-entropy losses (logits resized to the labels, label 255 ignored,
  the auxiliary head's weight 0.4) and their gradients with respect to the logits.
"""

from __future__ import annotations

import copy
import functools

import jax
import numpy as np
import pytest
import torch

import openmmlab_reference as mr
from cankd_jax import models
from cankd_jax.interop import torch as interop
from cankd_jax.train.tasks import SegmentationTask
from conftest import assert_close

pytestmark = pytest.mark.skipif(mr.available() is not None, reason=str(mr.available()))

K = 5
# name -> (mmseg config, extra overrides, our network config block)
SEGMENTERS = {
    "deeplabv3_r18": ("deeplabv3/deeplabv3_r18-d8_4xb2-80k_cityscapes-512x1024.py", {"model.decode_head.channels": 16},
                      dict(name="deeplabv3", backbone="resnet18_v1c_d8", head_channels=16, aux_channels=8)),
    "pspnet_r18": ("pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py", {"model.decode_head.channels": 16},
                   dict(name="pspnet", backbone="resnet18_v1c_d8", head_channels=16, aux_channels=8)),
    "deeplabv3_r101": ("deeplabv3/deeplabv3_r101-d8_4xb2-80k_cityscapes-512x1024.py",
                       {"model.backbone.base_channels": 16, "model.backbone.stem_channels": 16,
                        "model.decode_head.in_channels": 512, "model.auxiliary_head.in_channels": 256,
                        "model.decode_head.channels": 16},
                       dict(name="deeplabv3", backbone="resnet101_v1c_d8", head_channels=16, aux_channels=8,
                            backbone_kwargs=dict(base_width=16, stem_width=16))),
}
BN = dict(type="BN", requires_grad=True)
OVERRIDES = {"model.backbone.norm_cfg": BN, "model.decode_head.norm_cfg": BN, "model.auxiliary_head.norm_cfg": BN,
             "model.decode_head.num_classes": K, "model.auxiliary_head.num_classes": K,
             "model.auxiliary_head.channels": 8, "model.decode_head.dropout_ratio": 0.0,
             "model.auxiliary_head.dropout_ratio": 0.0}
STUDENTS = ("deeplabv3_r18", "pspnet_r18")
SIZE = (64, 96)  # d8: 8 x 12 maps, where the ASPP's dilations 12 / 24 / 36 reach past the border


def _labels(seed=3) -> np.ndarray:
    r = np.random.default_rng(seed)
    labels = r.integers(0, K, (2, *SIZE)).astype(np.int32)
    labels[r.random(labels.shape) < 0.15] = 255  # ignored pixels
    return labels


@functools.lru_cache(maxsize=None)
def case(name: str) -> dict:
    config, extra, ours_cfg = SEGMENTERS[name]
    tm, cfg = mr.build_segmentor(config, {**OVERRIDES, **extra}, seed=0)
    mr.perturb_(tm, seed=1)
    model = models.make_network(dict(ours_cfg, dropout_ratio=0.0), num_classes=K)
    variables, report = interop.import_state_dict(model, tm.state_dict())
    x = np.random.default_rng(2).normal(size=(2, *SIZE, 3)).astype(np.float32)
    labels = _labels()
    task = SegmentationTask(num_classes=K, aux_weight=cfg.model.auxiliary_head.loss_decode.loss_weight)

    @jax.jit
    def run(v, x):
        infer = model.apply(v, x, train=False)
        out, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
        small = {"logits": out["head.logits"], "aux_logits": out["aux.logits"]}

        def loss(small):
            # The task reads full-size logits; the network resizes its heads' (bilinear, align_corners=False).
            full = {k: models.resize_bilinear(v, SIZE) for k, v in small.items()}
            return task.loss(full, labels)

        (_, terms), grads = jax.value_and_grad(loss, has_aux=True)(small)
        return infer, out, terms, grads

    infer, train, terms, grads = run(variables, x)
    return dict(tm=tm, cfg=cfg, report=report, x=x, labels=labels, infer=infer, train=train, terms=terms,
                grads=grads)


def _heads(tm, x, train: bool):
    """mmseg's decode and auxiliary logits; in training mode on a copy (PyTorch's BatchNorm updates its running
    statistics in place, which the later inference-mode comparisons read)."""
    if train:
        tm = copy.deepcopy(tm)
    tm.train(train)
    with torch.set_grad_enabled(train):
        feats = tm.extract_feat(mr.nchw(x))
        return tm.decode_head(feats), tm.auxiliary_head(feats)


@pytest.mark.parametrize("name, train", [(n, False) for n in SEGMENTERS] + [(n, True) for n in STUDENTS])
def test_heads(name, train):
    c = case(name)
    assert not c["report"].missing and not c["report"].unexpected
    decode, aux = _heads(c["tm"], c["x"], train)
    ours = c["train"] if train else c["infer"]
    assert_close(ours["head.logits"], mr.nhwc(decode), rtol=2e-5, what=f"decode train={train}")
    assert_close(ours["aux.logits"], mr.nhwc(aux), rtol=2e-5, what=f"aux train={train}")


@pytest.mark.parametrize("name", STUDENTS)
def test_losses_and_their_gradients(name):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    c = case(name)
    samples = []
    for lab in c["labels"]:
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=torch.from_numpy(lab[None].astype(np.int64)))
        samples.append(s)
    decode, aux = (t.detach().requires_grad_(True) for t in _heads(c["tm"], c["x"], train=True))
    theirs_decode = c["tm"].decode_head.loss_by_feat(decode, samples)["loss_ce"]
    theirs_aux = c["tm"].auxiliary_head.loss_by_feat(aux, samples)["loss_ce"]
    assert_close(c["terms"]["seg"], theirs_decode.detach().numpy(), rtol=1e-5, what="decode loss")
    assert_close(c["terms"]["aux"], theirs_aux.detach().numpy(), rtol=1e-5, what="aux loss (x 0.4)")
    (theirs_decode + theirs_aux).backward()
    assert_close(c["grads"]["logits"], mr.nhwc(decode.grad), rtol=1e-5, what="d loss / d decode logits")
    assert_close(c["grads"]["aux_logits"], mr.nhwc(aux.grad), rtol=1e-5, what="d loss / d aux logits")
