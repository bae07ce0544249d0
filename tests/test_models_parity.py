"""Flax networks against the PyTorch ones in torch_models_reference.py, in float32.

Every BatchNorm carries random non-trivial statistics and affine parameters,
and the PyTorch weights come over through the state-dict importer (so each
test also checks that the keys line up). Narrow widths keep it fast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_models_reference as ref
from cankd_jax import models
from cankd_jax.interop.torch_models import export_state_dict, import_state_dict, load_resnet
from conftest import assert_close, nchw, nhwc
from models_helpers import NARROW

torch.manual_seed(0)


def _images(shape=(2, 64, 64, 3), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _torch_forward(module, x):
    with torch.no_grad():
        out = module.eval()(x)
    if isinstance(out, (list, tuple)):
        return [nhwc(t) for t in out]
    return {k: nhwc(v) if v.ndim == 4 else v.numpy() for k, v in out.items()}


def _apply(model, variables, x):
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)


def _assert_features(ours: dict, theirs: dict, names=None) -> None:
    names = names or sorted(theirs)
    assert set(names) <= set(ours), f"missing features {set(names) - set(ours)}"
    for name in names:
        assert_close(ours[name], theirs[name], what=name)


def test_resnet18_classifier_matches_torchvision_layout():
    tm = ref.randomize_(ref.ResNet(18, num_classes=10, stem_width=16, base_width=16))
    model, variables = load_resnet(tm.state_dict(), depth=18, stem_width=16, base_width=16)
    assert model.num_classes == 10 and not model.deep_stem
    x = _images()
    _assert_features(_apply(model, variables, x), _torch_forward(tm, nchw(x)))


def test_resnet18_train_mode_matches_batch_statistics_and_running_updates():
    tm = ref.randomize_(ref.ResNet(18, **NARROW))
    model = models.ResNet(depth=18, **NARROW)
    variables, _ = import_state_dict(model, tm.state_dict())
    x = _images((2, 64, 64, 3))
    out, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    tm.train()
    with torch.no_grad():
        expected = tm(nchw(x))
    assert_close(out["layer4"], nhwc(expected["layer4"]), what="layer4 (train mode)")
    # Every running statistic after one step, compared through the exporter's PyTorch keys.
    ours = export_state_dict(model, {"params": variables["params"], "batch_stats": upd["batch_stats"]})
    for key, value in tm.state_dict().items():
        if "running" in key or "num_batches" in key:
            assert_close(ours[key], value.numpy(), what=key)


def test_resnet50_matches_torchvision_layout():
    tm = ref.randomize_(ref.ResNet(50, num_classes=7, **NARROW))
    model, variables = load_resnet(tm.state_dict(), depth=50, **NARROW)
    x = _images()
    _assert_features(_apply(model, variables, x), _torch_forward(tm, nchw(x)))


def test_resnext_grouped_bottleneck_matches():
    fields = dict(groups=4, width_per_group=4, stage_blocks=(1, 1, 1, 1), **NARROW)
    tm = ref.randomize_(ref.ResNet(50, **fields))
    model, variables = load_resnet(tm.state_dict(), depth=50, **fields)
    assert variables["params"]["layer1.0"]["conv2"]["kernel"].shape == (3, 3, 4, 16)  # width 16 in 4 groups
    x = _images((1, 32, 32, 3))
    _assert_features(_apply(model, variables, x), _torch_forward(tm, nchw(x)))


@pytest.mark.parametrize("depth, blocks", [(18, None), (50, (1, 1, 2, 2))])
def test_v1c_d8_matches_mmseg(depth, blocks):
    fields = dict(stage_blocks=blocks, **NARROW)
    tm = ref.randomize_(ref.ResNet(depth, deep_stem=True, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), **fields))
    model = models.make_model(f"resnet{depth}_v1c_d8", **fields)
    # The mmseg checkpoint layout: backbone.stem.0 ... read out of a segmenter's state dict.
    sd = {f"backbone.{k}": v for k, v in tm.state_dict().items()}
    variables, report = import_state_dict(model, sd, key_prefixes={"": "backbone."})
    assert "stem.3.weight" in report.loaded and not report.missing
    x = _images()
    out = _apply(model, variables, x)
    assert out["layer4"].shape[1:3] == (8, 8)
    _assert_features(out, _torch_forward(tm, nchw(x)))


FPN_CASES = [
    dict(add_extra_convs=False, start_level=0, num_outs=5),
    dict(add_extra_convs="on_input", start_level=1, num_outs=5, relu_before_extra_convs=True),
    dict(add_extra_convs="on_output", start_level=1, num_outs=5),
    dict(add_extra_convs="on_lateral", start_level=0, num_outs=6, relu_before_extra_convs=True),
]


@pytest.mark.parametrize("case", FPN_CASES, ids=lambda c: str(c["add_extra_convs"]))
def test_fpn_matches_mmdet_on_odd_sizes(case):
    chans = (8, 16, 24, 32)
    # 800x1333-like: the coarser map is not exactly half the finer one, so upsampling goes by size.
    sizes = ((13, 21), (7, 11), (4, 6), (2, 3))
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(2, h, w, c)).astype(np.float32) for (h, w), c in zip(sizes, chans)]
    tm = ref.randomize_(ref.FPN(list(chans), 16, **case))
    model = models.FPN(out_channels=16, **case)
    variables, _ = import_state_dict(model, tm.state_dict(), sample=xs)
    ours = jax.jit(lambda v, xs: model.apply(v, xs, train=False))(variables, xs)
    theirs = _torch_forward(tm, [nchw(x) for x in xs])
    assert len(ours) == len(theirs) == case["num_outs"]
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a, b, what=f"level {i}")


HEAD_CASES = [
    ("aspp", lambda: ref.ASPPHead(16, 8, 5, dilations=(1, 2, 3, 5)), lambda: models.ASPPHead(5, 8, dilations=(1, 2, 3, 5))),
    ("aspp_default", lambda: ref.ASPPHead(16, 8, 5), lambda: models.ASPPHead(5, 8)),
    ("psp", lambda: ref.PSPHead(16, 8, 5), lambda: models.PSPHead(5, 8)),
    ("fcn", lambda: ref.FCNHead(16, 8, 5), lambda: models.FCNHead(5, 8)),
    ("fcn_aux", lambda: ref.FCNHead(16, 8, 5, num_convs=1, concat_input=False),
     lambda: models.FCNHead(5, 8, num_convs=1, concat_input=False)),
]


@pytest.mark.parametrize("name, make_torch, make_flax", HEAD_CASES, ids=[c[0] for c in HEAD_CASES])
def test_decode_heads_match_mmseg(name, make_torch, make_flax):
    # 10x14 is divisible by neither 3 nor 6: PSP's pooling bins overlap, as in PyTorch.
    x = _images((2, 10, 14, 16), seed=2)
    tm, model = ref.randomize_(make_torch()), make_flax()
    variables, _ = import_state_dict(model, tm.state_dict(), sample=x)
    _assert_features(_apply(model, variables, x), _torch_forward(tm, nchw(x)))


def test_pspnet_segmenter_matches_mmseg_encoder_decoder():
    tm = ref.randomize_(ref.EncoderDecoder(
        ref.ResNet(18, deep_stem=True, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), **NARROW),
        ref.PSPHead(64, 16, 5), ref.FCNHead(32, 8, 5, num_convs=1, concat_input=False)))
    model = models.make_model("pspnet", backbone="resnet18_v1c_d8", num_classes=5, backbone_kwargs=NARROW)
    variables, _ = import_state_dict(model, tm.state_dict())
    x = _images((2, 48, 40, 3))
    out = _apply(model, variables, x)
    assert out["logits"].shape == (2, 48, 40, 5) and out["logits"].dtype == jnp.float32
    _assert_features(out, _torch_forward(tm, nchw(x)))


def test_retinanet_trunk_matches_mmdet_backbone_and_neck():
    tm = torch.nn.Module()
    tm.backbone = ref.ResNet(18, **NARROW)
    tm.neck = ref.FPN([8, 16, 32, 64], 16, num_outs=5, start_level=1, add_extra_convs="on_input")
    ref.randomize_(tm)
    model = models.make_model("retinanet_fpn", backbone="resnet18", backbone_kwargs=NARROW, out_channels=16)
    variables, _ = import_state_dict(model, tm.state_dict())
    x = _images((1, 64, 96, 3))
    out = _apply(model, variables, x)
    with torch.no_grad():
        feats = tm.backbone.eval()(nchw(x))
        pyramid = tm.neck.eval()([feats[f"layer{i}"] for i in range(1, 5)])
    for k, level in enumerate(pyramid):
        assert_close(out[f"fpn.p{3 + k}"], nhwc(level), what=f"fpn.p{3 + k}")
