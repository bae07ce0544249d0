"""The caffe-style ResNet and mmseg's MobileNetV2 against their PyTorch formulations
(torch_detection_models_reference.py), state-dict round trips, teacher trunks, the registry and frozen
parameters. Narrow widths, one block per stage, small images. (RetinaNet and FCOS against mmdetection itself:
test_mmdet_parity.py.)"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

import torch_detection_models_reference as dref
import torch_models_reference as ref
from cankd_jax import models
from cankd_jax.interop import torch as interop
from conftest import assert_close, nchw, nhwc
from models_helpers import NARROW, jit_init

BLOCKS = (1, 1, 1, 1)
FPN_CH, HEAD_CH, GROUPS, K = 16, 16, 4, 3  # GroupNorm(4) on the 16-channel tiny head; 3 classes
STACKED = 2  # convs per head tower (mmdet's 4 in the layout test): half the compile time
BACKBONE = dict(stage_blocks=BLOCKS, **NARROW)  # bottleneck widths 32 / 64 / 128 / 256


def _images(shape=(2, 64, 96, 3), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _torch_backbone(caffe: bool):
    bb = ref.ResNet(50, **BACKBONE)
    return dref.caffe_style_(bb) if caffe else bb


def torch_retinanet(seed=0):
    neck = ref.FPN([32, 64, 128, 256], FPN_CH, num_outs=5, start_level=1, add_extra_convs="on_input")
    head = dref.RetinaHead(K, FPN_CH, HEAD_CH, stacked_convs=STACKED)
    return dref.randomize_detection_(dref.SingleStageDetector(_torch_backbone(False), neck, head), seed)


def torch_fcos(seed=0, **head):
    neck = ref.FPN([32, 64, 128, 256], FPN_CH, num_outs=5, start_level=1, add_extra_convs="on_output",
                   relu_before_extra_convs=True)
    fields = {"norm_on_bbox": True, "centerness_on_reg": False, "conv_bias": True, **head}  # the registry's FCOS
    fcos_head = dref.FCOSHead(K, FPN_CH, HEAD_CH, stacked_convs=STACKED, num_groups=GROUPS, **fields)
    return dref.randomize_detection_(dref.SingleStageDetector(_torch_backbone(True), neck, fcos_head), seed)


def retinanet(**head):
    return models.make_model("retinanet", backbone="resnet50", num_classes=K, backbone_kwargs=BACKBONE,
                             neck_kwargs=dict(out_channels=FPN_CH),
                             head_kwargs={"feat_channels": HEAD_CH, "stacked_convs": STACKED, **head})


def fcos(backbone="resnet50_caffe", **head):
    return models.make_model("fcos", backbone=backbone, num_classes=K, backbone_kwargs=BACKBONE,
                             neck_kwargs=dict(out_channels=FPN_CH),
                             head_kwargs={"feat_channels": HEAD_CH, "num_groups": GROUPS, "stacked_convs": STACKED,
                                          **head})


W = 0.25  # MobileNetV2 widen factor: layer7 80 channels, layer5 24


def torch_mobilenet_deeplabv3(seed=0):
    bb = dref.MobileNetV2(W, strides=(1, 2, 2, 1, 1, 1, 1), dilations=(1, 1, 1, 2, 2, 4, 4))
    return ref.randomize_(ref.EncoderDecoder(bb, ref.ASPPHead(80, 16, 5), ref.FCNHead(24, 8, 5, num_convs=1,
                                                                                       concat_input=False),
                                             decode_in="layer7", aux_in="layer5"), seed)


def mobilenet_deeplabv3():
    return models.make_model("deeplabv3", backbone="mobilenet_v2_d8", num_classes=5, channels=16, aux_channels=8,
                             backbone_kwargs=dict(widen_factor=W))


def _torch_forward(module, x, train=False):
    module.train(train)
    with torch.no_grad():
        out = module(nchw(x))
    return {k: [nhwc(t) for t in v] if isinstance(v, list) else nhwc(v) for k, v in out.items()}


def _apply(model, variables, x, train=False):
    if train:
        fn = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0])
    else:
        fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return fn(variables, x)


def _assert_outputs(ours, theirs):
    assert set(theirs) <= set(ours), f"missing outputs {set(theirs) - set(ours)}"
    for name, expected in theirs.items():
        if isinstance(expected, list):
            assert isinstance(ours[name], tuple) and len(ours[name]) == len(expected), name
            for level, (a, b) in enumerate(zip(ours[name], expected)):
                assert_close(a, b, what=f"{name}[{level}]")
        else:
            assert_close(ours[name], expected, what=name)


# --- parity -----------------------------------------------------------------------------------------------


def test_caffe_style_resnet_puts_the_stride_on_the_first_1x1_conv():
    tm = ref.randomize_(_torch_backbone(True))
    assert tm.layer2[0].conv1.stride == (2, 2) and tm.layer2[0].conv2.stride == (1, 1)
    model = models.make_model("resnet50_caffe", **BACKBONE)
    assert (model.style, model.norm_eval, model.norm_requires_grad) == ("caffe", True, False)
    variables, _ = interop.import_state_dict(model, tm.state_dict())
    x = _images((1, 65, 47, 3))  # odd sizes: the strided 1x1 conv reads every other pixel from the first
    _assert_outputs(_apply(model, variables, x), _torch_forward(tm, x))


def test_mobilenet_v2_deeplabv3_matches_mmseg():
    tm, model = torch_mobilenet_deeplabv3(), mobilenet_deeplabv3()
    assert (model.decode_in, model.aux_in) == ("layer7", "layer5")
    variables, _ = interop.import_state_dict(model, tm.state_dict())
    x = _images((2, 65, 49, 3))
    ours = _apply(model, variables, x)
    assert ours["layer7"].shape == (2, 9, 7, 80) and ours["layer5"].shape == (2, 9, 7, 24)
    _assert_outputs(ours, _torch_forward(tm, x))


# --- state dicts ------------------------------------------------------------------------------------------


def _assert_same_state_dict(ours, theirs):
    assert sorted(ours) == sorted(theirs), f"keys differ: {sorted(set(ours) ^ set(theirs))[:6]}"
    for k, v in theirs.items():
        expected = v.numpy()
        assert ours[k].shape == expected.shape and ours[k].dtype == expected.dtype, k
        assert np.array_equal(ours[k], expected), k


@pytest.mark.parametrize("case", ["retinanet", "fcos", "fcos_conv_bias", "mobilenet_v2_deeplabv3"])
def test_import_then_export_is_the_identity(case):
    tm, model = {
        "retinanet": lambda: (torch_retinanet(), retinanet()),
        "fcos": lambda: (torch_fcos(), fcos()),
        "fcos_conv_bias": lambda: (torch_fcos(conv_bias=True), fcos(conv_bias=True)),
        "mobilenet_v2_deeplabv3": lambda: (torch_mobilenet_deeplabv3(), mobilenet_deeplabv3()),
    }[case]()
    sd = tm.state_dict()
    variables, report = interop.import_state_dict(model, sd)
    assert not report.missing and not report.unexpected and not report.ignored and len(report.loaded) == len(sd)
    _assert_same_state_dict(interop.export_state_dict(model, variables), sd)


def test_layout_uses_mmdet_and_mmseg_keys():
    det = interop.state_dict_layout(fcos(stacked_convs=4))
    for key in ("backbone.layer2.0.conv1.weight", "neck.fpn_convs.4.conv.bias", "bbox_head.cls_convs.3.conv.weight",
                "bbox_head.cls_convs.0.gn.weight", "bbox_head.reg_convs.2.gn.bias", "bbox_head.conv_cls.bias",
                "bbox_head.conv_reg.weight", "bbox_head.conv_centerness.weight", "bbox_head.scales.4.scale"):
        assert key in det, key
    assert "bbox_head.cls_convs.0.conv.bias" in det  # the authors' student: tower biases beside GroupNorm
    # mmdet's conv_bias='auto' (its own FCOS checkpoints): no bias before a GroupNorm.
    assert "bbox_head.cls_convs.0.conv.bias" not in interop.state_dict_layout(fcos(stacked_convs=4, conv_bias=None))
    assert det["bbox_head.scales.0.scale"].torch_shape == ()
    assert det["bbox_head.conv_cls.weight"].torch_shape == (K, HEAD_CH, 3, 3)
    retina = interop.state_dict_layout(retinanet(stacked_convs=4))
    assert retina["bbox_head.retina_cls.weight"].torch_shape == (9 * K, HEAD_CH, 3, 3)
    assert retina["bbox_head.retina_reg.bias"].torch_shape == (36,)
    assert "bbox_head.cls_convs.0.conv.bias" in retina and "bbox_head.reg_convs.3.conv.weight" in retina
    seg = interop.state_dict_layout(mobilenet_deeplabv3())
    for key in ("backbone.conv1.conv.weight", "backbone.conv1.bn.running_var", "backbone.layer1.0.conv.1.bn.bias",
                "backbone.layer2.0.conv.2.conv.weight", "backbone.layer7.0.conv.1.conv.weight"):
        assert key in seg, key
    assert "backbone.layer1.0.conv.2.conv.weight" not in seg  # expand ratio 1: no expansion conv
    hidden = 6 * 16  # layer5.0 expands layer4's 16 channels (64 x 0.25)
    assert seg["backbone.layer5.0.conv.1.conv.weight"].torch_shape == (hidden, 1, 3, 3)  # depthwise


def test_teacher_trunk_reads_backbone_and_neck_of_any_detector(tmp_path):
    tm = torch_fcos()
    sd = tm.state_dict()
    detector_vars, _ = interop.import_state_dict(fcos(), sd)
    trunk = models.make_model("fcos_fpn", backbone="resnet50_caffe", backbone_kwargs=BACKBONE, out_channels=FPN_CH)
    variables, report = interop.import_state_dict(trunk, sd)  # strict on backbone.* and neck.*
    head_keys = sorted(k for k in sd if k.startswith("bbox_head."))
    assert report.ignored == tuple(head_keys) and not report.unexpected and not report.missing
    assert len(report.loaded) == len(sd) - len(head_keys)
    assert jax.tree.all(jax.tree.map(np.array_equal, variables["params"]["neck"], detector_vars["params"]["neck"]))
    # Read as a whole network (no prefixes), the head's keys are unexpected: a strict load refuses, a partial one
    # reports them.
    with pytest.raises(ValueError, match=r"unexpected keys: bbox_head\.cls_convs\.0\.conv\.bias, "
                                         r"bbox_head\.cls_convs\.0\.conv\.weight"):
        interop.import_state_dict(trunk, sd, key_prefixes={"": ""})
    _, loose = interop.import_state_dict(trunk, sd, key_prefixes={"": ""}, strict=False)
    assert loose.unexpected == tuple(head_keys)
    # A GFL checkpoint (other head, neck with extra convs on P5 and no ReLU) into the gfl_fpn trunk, from a .pth.
    gfl = torch.nn.Module()
    gfl.backbone = ref.ResNet(50, **BACKBONE)
    gfl.neck = ref.FPN([32, 64, 128, 256], FPN_CH, num_outs=5, start_level=1, add_extra_convs="on_output")
    gfl.bbox_head = torch.nn.Module()
    gfl.bbox_head.gfl_cls = torch.nn.Conv2d(FPN_CH, K, 3, padding=1)
    gfl.bbox_head.gfl_reg = torch.nn.Conv2d(FPN_CH, 4 * 17, 3, padding=1)
    path = tmp_path / "gfl_r101.pth"
    torch.save({"meta": {}, "state_dict": ref.randomize_(gfl).state_dict()}, path)
    gfl_trunk = models.make_model("gfl_fpn", backbone="resnet50", backbone_kwargs=BACKBONE, out_channels=FPN_CH)
    loaded = interop.load_pytorch_network(str(path), gfl_trunk)
    assert np.array_equal(np.asarray(loaded["params"]["neck"]["fpn_convs.4"]["conv"]["bias"]),
                          gfl.state_dict()["neck.fpn_convs.4.conv.bias"].numpy())
    _, report = interop.load_checkpoint(str(path), gfl_trunk)
    assert report.ignored == ("bbox_head.gfl_cls.bias", "bbox_head.gfl_cls.weight", "bbox_head.gfl_reg.bias",
                              "bbox_head.gfl_reg.weight")


def test_detector_key_problems_are_named():
    sd = dict(torch_fcos().state_dict())
    model = fcos()
    bad = {**sd, "bbox_head.conv_cls.weight": torch.zeros(K + 1, HEAD_CH, 3, 3)}
    with pytest.raises(ValueError, match=r"bbox_head\.conv_cls\.weight \(4, 16, 3, 3\) \(expected \(3, 16, 3, 3\)\)"):
        interop.import_state_dict(model, bad)
    with pytest.raises(ValueError, match=r"bbox_head\.scales\.2\.scale \(1,\) \(expected \(\)\)"):
        interop.import_state_dict(model, {**sd, "bbox_head.scales.2.scale": torch.ones(1)})
    no_gn = {k: v for k, v in sd.items() if k != "bbox_head.reg_convs.1.gn.weight"}
    with pytest.raises(ValueError, match=r"missing keys: bbox_head\.reg_convs\.1\.gn\.weight"):
        interop.import_state_dict(model, no_gn)
    # mmdet's own FCOS checkpoints (conv_bias='auto': no tower biases) into the default (authors') head: its tower
    # biases are missing from them, which a strict import names (a dagger run's partial load keeps them initialised).
    with pytest.raises(ValueError, match=r"missing keys: bbox_head\.cls_convs\.0\.conv\.bias"):
        interop.import_state_dict(model, torch_fcos(conv_bias="auto").state_dict())


# --- registry, freezing, initialisation --------------------------------------------------------------------


def _shapes(model, shape, dtype=jnp.float32):
    x = jax.ShapeDtypeStruct(shape, dtype)
    return jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0], x)


def test_registry_builds_detectors_by_name():
    names = models.model_names()
    for required in ("retinanet", "fcos", "fcos_fpn", "gfl_fpn", "retinanet_fpn", "resnet50_caffe",
                     "resnet101_caffe", "resnext101_64x4d", "mobilenet_v2", "mobilenet_v2_d8"):
        assert required in names, required
    f = models.make_model("fcos", num_classes=80)
    assert isinstance(f, models.FCOS) and f.backbone.style == "caffe" and f.backbone.frozen_stages == 1
    assert f.backbone.norm_eval and not f.backbone.norm_requires_grad
    assert (f.neck.add_extra_convs, f.neck.relu_before_extra_convs, f.neck.start_level) == ("on_output", True, 1)
    head = f.bbox_head
    assert (head.norm, head.num_groups, head.norm_on_bbox, head.centerness_on_reg, head.strides) == (
        "gn", 32, True, False, (8, 16, 32, 64, 128))
    x101 = models.make_model("fcos", backbone="resnext101_64x4d", num_classes=80).backbone
    assert (x101.style, x101.norm_requires_grad, x101.groups, x101.norm_eval) == ("pytorch", True, 64, True)
    r = models.make_model("retinanet", backbone="resnet101", num_classes=80)
    assert isinstance(r, models.RetinaNet) and r.bbox_head.num_anchors == 9 and r.backbone.depth == 101
    assert (r.neck.add_extra_convs, r.backbone.style, r.backbone.norm_eval) == ("on_input", "pytorch", True)
    out = _shapes(retinanet(), (1, 64, 64, 3))
    assert [k for k in out if k.startswith("fpn.")] == [f"fpn.p{k}" for k in range(3, 8)]
    out = _shapes(fcos(), (1, 64, 64, 3))
    assert len(out["centernesses"]) == 5 and out["centernesses"][4].shape == (1, 1, 1, 1)
    low = models.make_model("fcos", num_classes=K, backbone_kwargs=BACKBONE, dtype=jnp.bfloat16,
                            neck_kwargs=dict(out_channels=FPN_CH),
                            head_kwargs=dict(feat_channels=HEAD_CH, num_groups=GROUPS))
    out = _shapes(low, (1, 64, 64, 3))
    assert out["cls_scores"][0].dtype == jnp.bfloat16 and out["bbox_preds"][0].dtype == jnp.float32


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown model 'fcos2'"):
        models.make_model("fcos2")
    with pytest.raises(ValueError, match=r"detector 'retinanet' head has no option.*num_anchor\b"):
        models.make_model("retinanet", num_classes=3, head_kwargs=dict(num_anchor=9))
    with pytest.raises(ValueError, match=r"detector 'fcos' has no option.*outchannels"):
        models.make_model("fcos", num_classes=3, neck_kwargs=dict(outchannels=16))
    with pytest.raises(ValueError, match=r"backbone 'resnet50_caffe' has no option.*widen_factor"):
        models.make_model("fcos", num_classes=3, backbone_kwargs=dict(widen_factor=1.0))
    with pytest.raises(ValueError, match="ResNet.*MobileNetV2"):
        models.make_model("retinanet", num_classes=3, backbone="mobilenet_v2")
    with pytest.raises(ValueError, match="style must be one of pytorch, caffe"):
        models.ResNet(depth=50, style="tf")
    with pytest.raises(ValueError, match="head's strides .* are not the neck levels' strides"):
        _shapes(fcos(strides=(4, 8, 16, 32, 64)), (1, 64, 64, 3))
    with pytest.raises(ValueError, match="10 channels .* num_groups=4"):
        models.ConvModule(10, 3, norm="gn", num_groups=4)
    with pytest.raises(ValueError, match="act must be"):
        models.ConvModule(8, 3, act="gelu")
    with pytest.raises(ValueError, match="MobileNetV2: dilations needs 7"):
        models.make_model("mobilenet_v2", dilations=(1, 2))


def test_make_network_builds_detectors_and_teacher_trunks_from_config_blocks():
    cfg = ml_collections.ConfigDict(dict(
        name="retinanet", backbone="resnet50", backbone_kwargs=dict(BACKBONE), neck_kwargs=dict(out_channels=FPN_CH),
        head_kwargs=dict(feat_channels=HEAD_CH), dtype="bfloat16", checkpoint="", pretrained=""))
    net = models.make_network(cfg, num_classes=7)
    assert isinstance(net, models.RetinaNet) and net.bbox_head.num_classes == 7 and net.neck.out_channels == FPN_CH
    assert (net.backbone.frozen_stages, net.backbone.norm_eval, net.backbone.dtype) == (1, True, jnp.bfloat16)
    teacher = models.make_network(dict(name="fcos_fpn", backbone="resnet101_caffe", neck_kwargs=dict(out_channels=32),
                                       frozen_stages=-1), num_classes=7)
    assert isinstance(teacher, models.DetectionTrunk) and teacher.backbone.depth == 101
    assert (teacher.backbone.style, teacher.backbone.frozen_stages, teacher.neck.out_channels) == ("caffe", -1, 32)
    seg = models.make_network(dict(name="deeplabv3", backbone="mobilenet_v2_d8"), num_classes=19)
    assert (seg.decode_head.channels, seg.auxiliary_head.channels, seg.decode_in) == (512, 256, "layer7")
    assert models.make_network(dict(name="resnet50_caffe"), num_classes=3).norm_eval  # the preset's, not a default
    with pytest.raises(ValueError, match="unknown field.*head_channels"):
        models.make_network(dict(name="fcos", head_channels=3), num_classes=3)
    with pytest.raises(ValueError, match="none of the segmenters.*detectors.*fcos.*trunks.*fcos_fpn"):
        models.make_network(dict(name="yolo"), num_classes=3)


def _labels_by_key(tree):
    return {".".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _params(model, shape=(1, 64, 64, 3)):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))["params"]


def test_frozen_stages_and_frozen_batchnorm_receive_no_updates():
    model = fcos()
    params = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), _params(model))
    labels = models.frozen_labels(model)(params)
    flat = _labels_by_key(labels)
    frozen = {k for k, v in flat.items() if v == "frozen"}
    # caffe backbone: stem + layer1 (frozen_stages=1) and every BatchNorm's scale/bias (requires_grad=False) ...
    assert {k for k in flat if k.startswith(("backbone.conv1.", "backbone.bn1.", "backbone.layer1."))} <= frozen
    bn = {k for k in flat if k.startswith("backbone.") and (".bn" in k or "downsample.1" in k)}
    assert bn and bn <= frozen and "backbone.layer4.0.downsample.1.scale" in bn
    # ... and nothing else: later convs, the neck and the head (GroupNorm, scales) train.
    trainable = set(flat) - frozen
    assert "backbone.layer2.0.conv1.kernel" in trainable and "backbone.layer4.0.downsample.0.kernel" in trainable
    assert all(not k.startswith("backbone.") or "conv" in k or "downsample.0" in k for k in trainable)
    assert {"bbox_head.scales.0.scale", "bbox_head.cls_convs.0.gn.scale", "neck.lateral_convs.0.conv.bias"} <= trainable
    sgd = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1, momentum=0.9))
    tx = optax.multi_transform({"trainable": sgd, "frozen": optax.set_to_zero()}, labels)
    grads = jax.tree.map(np.ones_like, params)

    @jax.jit
    def two_steps(params):
        state = tx.init(params)
        for _ in range(2):  # the second carries momentum
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params

    new = two_steps(params)
    before, after = _labels_by_key(params), _labels_by_key(new)
    for k in before:
        assert np.array_equal(before[k], after[k]) == (k in frozen), k
    # RetinaNet (pytorch style, trainable BatchNorm): only the stem and layer1 are frozen.
    r = retinanet()
    rl = _labels_by_key(models.frozen_labels(r)(_params(r)))
    assert rl["backbone.layer2.0.bn1.scale"] == "trainable" and rl["backbone.layer1.0.bn1.scale"] == "frozen"
    # norm_names() (what norm_requires_grad=False freezes) lists exactly the BatchNorm layers, whatever the layout.
    for name in ("resnet18_v1c_d8", "resnet50_caffe"):
        bb = models.make_model(name, stem_width=8, base_width=8, stage_blocks=(2, 1, 1, 1))
        layout = interop.state_dict_layout(bb, sample=jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
        assert set(bb.norm_names()) == {k[: -len(".running_mean")] for k in layout if k.endswith(".running_mean")}
    # MobileNetV2: conv1 and the first frozen_stages layers.
    mb = models.make_model("deeplabv3", backbone="mobilenet_v2_d8", num_classes=3, frozen_stages=2,
                           backbone_kwargs=dict(widen_factor=W))
    ml = _labels_by_key(models.frozen_labels(mb)(_params(mb, (1, 32, 32, 3))))
    assert {k for k, v in ml.items() if v == "frozen"} == {
        k for k in ml if k.startswith(("backbone.conv1.", "backbone.layer1.", "backbone.layer2."))}


def test_heads_initialise_as_mmdet():
    x = [jnp.zeros((1, 4, 4, 32)), jnp.zeros((1, 2, 2, 32))]
    retina = jit_init(models.RetinaHead(num_classes=5, feat_channels=32, stacked_convs=1), x)["params"]
    assert np.allclose(retina["retina_cls"]["bias"], -math.log(99.0), atol=1e-6)
    assert not np.any(retina["retina_reg"]["bias"]) and not np.any(retina["cls_convs.0"]["conv"]["bias"])
    k = np.asarray(retina["cls_convs.0"]["conv"]["kernel"])  # 3x3x32x32 draws of N(0, 0.01^2)
    assert abs(k.std() - 0.01) < 0.0005 and abs(k.mean()) < 5e-4
    head = jit_init(models.FCOSHead(num_classes=5, feat_channels=32, stacked_convs=1, strides=(8, 16)), x)["params"]
    assert [float(head[f"scales.{i}"]["scale"]) for i in range(2)] == [1.0, 1.0]
    assert np.all(np.asarray(head["cls_convs.0"]["gn"]["scale"]) == 1) and "bias" not in head["cls_convs.0"]["conv"]
    assert np.allclose(head["conv_cls"]["bias"], -math.log(99.0), atol=1e-6)
    assert not np.any(head["conv_centerness"]["bias"])
