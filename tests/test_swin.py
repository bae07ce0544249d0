"""Swin Transformer against mmdetection 3.3 itself: the backbone and FPN of its own
`swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py` (Mask R-CNN Swin-S, the CanKD teacher of the Swin ->
RetinaNet row), narrowed (embed_dims 48 and FPN width 32 instead of 96 / 256, 4 blocks in stage 3 instead of
18: the same computation per block), with seeded random weights, strictly imported into
`make_model('fpn', backbone='swin_small')`.

The input (2 x 3 x 102 x 141) is a multiple of neither the patch nor the window, so every padding mmdet does runs
(the patch embedding's, each block's window padding, each patch merging's odd sizes), and the last stage's
4 x 5 map is smaller than one 7 x 7 window but shifted all the same, as mmdet does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import openmmlab_reference as mr
from cankd_jax import models
from cankd_jax.interop import torch_models as interop
from cankd_jax.models.swin import SwinTransformer, relative_position_index, shift_mask
from conftest import assert_close

pytestmark = pytest.mark.skipif(mr.available() is not None, reason=str(mr.available()))

CONFIG = "swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py"
NARROW = dict(embed_dims=48, depths=(2, 2, 4, 2))
OVERRIDES = {"model.backbone.embed_dims": 48, "model.backbone.depths": [2, 2, 4, 2],
             # stochastic depth draws differently in PyTorch and JAX: off for the train-mode comparison
             "model.backbone.drop_path_rate": 0.0,
             "model.neck.in_channels": [48, 96, 192, 384], "model.neck.out_channels": 32}
SHAPE = (2, 102, 141, 3)


def _perturb_(module: torch.nn.Module, seed: int) -> None:
    # torch's defaults leave LayerNorm at 1 / 0 and the bias tables at 0: give every term a seeded value.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            elif hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.copy_(torch.randn(m.relative_position_bias_table.shape, generator=g))
            elif isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


@pytest.fixture(scope="module")
def case():
    tm, _ = mr.build(CONFIG, OVERRIDES, seed=0)
    trunk = torch.nn.ModuleDict({"backbone": tm.backbone, "neck": tm.neck})
    mr.perturb_(trunk, seed=1)
    _perturb_(trunk, seed=2)
    model = models.make_model("fpn", backbone="swin_small", backbone_kwargs=dict(NARROW, drop_path_rate=0.0),
                              out_channels=32)
    state = {k: v for k, v in trunk.state_dict().items()}
    variables, report = interop.import_state_dict(model, state)
    x = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    return tm, trunk, model, variables, report, x


def _theirs(tm, x, train: bool):
    tm.train(train)
    feats = tm.backbone(mr.nchw(x))
    return list(feats), list(tm.neck(feats))


def test_import_is_strict_and_export_gives_back_the_state_dict(case):
    tm, trunk, model, variables, report, _ = case
    state = trunk.state_dict()
    assert len(report.loaded) + len(interop.torch_buffers(model)) == len(state) and not report.unexpected
    assert sum(k.endswith("relative_position_index") for k in state) == sum(NARROW["depths"])
    exported = interop.export_state_dict(model, variables)
    assert sorted(exported) == sorted(state)
    for key, value in state.items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)


@pytest.mark.parametrize("train", [False, True])
def test_stage_and_neck_outputs(case, train):
    tm, _, model, variables, _, x = case
    with torch.no_grad():
        feats, pyramid = _theirs(tm, x, train)
    ours = jax.jit(lambda v, x: model.apply(v, x, train=train))(variables, jnp.asarray(x))
    for i, f in enumerate(feats):
        assert_close(ours[f"layer{i + 1}"], mr.nhwc(f), what=f"stage {i}")
    for name, p in zip(model.level_names(), pyramid):
        assert_close(ours[name], mr.nhwc(p), what=name)


def test_gradients_of_every_parameter(case):
    tm, trunk, model, variables, _, x = case
    weights = [np.random.default_rng(10 + i).normal(size=s).astype(np.float32)
               for i, s in enumerate(mr.nhwc(p).shape for p in _theirs(tm, x, True)[1])]
    trunk.zero_grad()
    _, pyramid = _theirs(tm, x, True)
    sum((p * mr.nchw(w)).sum() for p, w in zip(pyramid, weights)).backward()

    def loss(params):
        out = model.apply({"params": params}, jnp.asarray(x), train=True)
        return sum(jnp.sum(out[n] * w) for n, w in zip(model.level_names(), weights))

    grads = interop.export_state_dict(model, {"params": jax.jit(jax.grad(loss))(variables["params"])})
    for key, param in trunk.named_parameters():
        assert_close(grads[key], param.grad.numpy(), rtol=2e-4, what=key)


def test_release_keys_convert_as_mmdets_converter(case, tmp_path):
    from mmdet.models.backbones.swin import swin_converter

    # The original release's names for the narrowed Swin-S, made from mmdet's by the inverse renaming, with
    # its classifier, final norm and attention-mask buffers, which mmdet's loader leaves unused.
    tm = case[0]
    g = torch.Generator().manual_seed(3)
    release = {}
    for key, value in tm.backbone.state_dict().items():
        if key.endswith("relative_position_index") or key.startswith("norm"):
            continue
        key = (key.replace("stages.", "layers.").replace("attn.w_msa.", "attn.").replace("ffn.layers.0.0.", "mlp.fc1.")
               .replace("ffn.layers.1.", "mlp.fc2.").replace("patch_embed.projection.", "patch_embed.proj."))
        release[key] = torch.randn(value.shape, generator=g)
    release.update({"norm.weight": torch.ones(384), "norm.bias": torch.zeros(384), "head.weight": torch.ones(10, 384),
                    "head.bias": torch.zeros(10), "layers.0.blocks.1.attn_mask": torch.zeros(4, 49, 49)})
    theirs = {k: v.numpy() for k, v in swin_converter(release).items()
              if not k.startswith("backbone.norm.") and not k.endswith("attn_mask")}
    ours = interop.swin_release_to_mmdet(release)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    # and load into the backbone, all but the output norms, which the release has not (mmdet starts them afresh)
    backbone = models.make_model("swin_small", **NARROW)
    shapes = jax.eval_shape(lambda k: backbone.init(k, jnp.zeros((1, 32, 32, 3)), train=False), jax.random.key(0))
    init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    expected, report = interop.import_state_dict(backbone, ours, key_prefixes={"": "backbone."}, strict=False,
                                                 init_variables=init)
    assert not report.unexpected and sorted(report.missing) == sorted(
        f"backbone.norm{i}.{leaf} (model key norm{i}.{leaf})" for i in range(4) for leaf in ("weight", "bias"))
    # a student's `pretrained` .pth in the release's names (the DINO Swin-B student's) is converted on reading
    import ml_collections
    from flax import traverse_util

    from cankd_jax.train.weights import load_pretrained

    torch.save({"model": release}, tmp_path / "swin_release.pth")
    cfg = ml_collections.ConfigDict(dict(pretrained=str(tmp_path / "swin_release.pth"), pretrained_prefixes=[("", "")]))
    loaded = load_pretrained(cfg, backbone, jnp.zeros((1, 32, 32, 3)))
    flat = traverse_util.flatten_dict(expected)
    assert len(loaded) == len(flat) - 8  # all but the output norms
    for key, value in loaded.items():
        np.testing.assert_array_equal(value, flat[key], err_msg=str(key))


def test_relative_position_index_and_shift_mask_are_mmdets(case):
    tm, _, _, _, _, x = case
    w_msa = tm.backbone.stages[0].blocks[1].attn.w_msa  # a shifted block of stage 1
    np.testing.assert_array_equal(relative_position_index(7), w_msa.relative_position_index.numpy())
    seen = []
    handle = w_msa.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["mask"]), with_kwargs=True)
    try:
        with torch.no_grad():
            _theirs(tm, x, False)
    finally:
        handle.remove()
    # stage 1 is 26 x 36 (102 x 141 over 4, rounded up), padded to 28 x 42: 4 x 6 windows
    np.testing.assert_array_equal(shift_mask(28, 42, 7, 3).reshape(24, 49, 49), seen[0].numpy())


def test_a_changed_buffer_and_bad_fields_are_named(case):
    _, trunk, model, _, _, _ = case
    state = dict(trunk.state_dict())
    key = next(k for k in state if k.endswith("relative_position_index"))
    state[key] = torch.flip(state[key], (0,))
    with pytest.raises(ValueError, match="constant buffers other than this configuration's.*relative_position_index"):
        interop.import_state_dict(model, state)
    with pytest.raises(ValueError, match="stage 1 has 48 channels, which 5 heads do not divide"):
        SwinTransformer(embed_dims=48, num_heads=(5, 6, 12, 24))
    with pytest.raises(ValueError, match="norm_eval=True keeps BatchNorm statistics"):
        models.make_model("fpn", backbone="swin_tiny", norm_eval=True)
    with pytest.raises(ValueError, match="SwinTransformer.*channels"):
        models.make_model("swin_tiny").init(jax.random.key(0), jnp.zeros((1, 32, 32, 4)), train=False)


def test_the_dagger_neck_from_a_swin_teacher_loads_what_mmengine_loads(case, tmp_path, caplog):
    """The authors' Swin -> RetinaNet student takes `neck.` from the Mask R-CNN checkpoint through mmengine's
    non-strict loader, which skips every tensor of another shape: ours (`student.inherit` with
    `inherit_skip_mismatched`, as configs/coco.py:teacher=mask_rcnn_swin_s,dagger=true sets it) must load the same
    tensors, and say what it skipped."""
    import logging

    import ml_collections
    from mmdet.models.necks import FPN as TorchFPN
    from mmengine.runner.checkpoint import load_state_dict

    from cankd_jax.train.weights import load_pretrained

    _, trunk, _, _, _, _ = case
    path = str(tmp_path / "mask_rcnn_swin.pth")
    interop.save_pth(trunk.state_dict(), path, meta={})
    teacher_neck = {k[len("neck."):]: v for k, v in trunk.state_dict().items() if k.startswith("neck.")}

    # mmdet's RetinaNet neck (narrowed as the student below) through mmengine's loader
    torch.manual_seed(0)
    ref = TorchFPN(in_channels=[32, 64, 128, 256], out_channels=32, start_level=1, add_extra_convs="on_input",
                   num_outs=5)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    load_state_dict(ref, teacher_neck, strict=False)
    ref_loaded = {k for k, v in ref.state_dict().items() if not torch.equal(v, before[k])}
    # per tensor: the 3x3 output convs of the first three levels, and the biases (not the weights) of the
    # laterals and of the C5 extra conv, whose input widths differ
    assert ref_loaded == ({f"fpn_convs.{i}.conv.{p}" for i in range(3) for p in ("weight", "bias")}
                          | {f"lateral_convs.{i}.conv.bias" for i in range(3)} | {"fpn_convs.3.conv.bias"})

    student = models.make_model("retinanet", backbone="resnet50", num_classes=3,
                                backbone_kwargs=dict(base_width=8, stem_width=8), neck_kwargs=dict(out_channels=32),
                                head_kwargs=dict(feat_channels=32, stacked_convs=1))
    cfg = ml_collections.ConfigDict(dict(inherit=path, inherit_prefixes=[("neck.", "neck.")],
                                         inherit_skip_mismatched=True))
    with caplog.at_level(logging.WARNING):
        loaded = load_pretrained(cfg, student, jnp.zeros((1, 64, 64, 3)))
    layout = interop.state_dict_layout(student, sample=jnp.zeros((1, 64, 64, 3)))
    ours = {key for key, slot in layout.items() if (slot.collection, *slot.path) in loaded}
    assert ours == {f"neck.{k}" for k in ref_loaded}
    for key in ours:
        slot = layout[key]
        np.testing.assert_array_equal(interop._KINDS[slot.kind].from_flax(np.asarray(loaded[(slot.collection, *slot.path)])),
                                      teacher_neck[key[len("neck."):]].numpy(), err_msg=key)
    skipped = caplog.text
    assert "skipped for their shape" in skipped and "neck.lateral_convs.0.conv.weight" in skipped
    assert "neck.fpn_convs.3.conv.weight" in skipped


@pytest.mark.parametrize("frozen_stages", [0, 2])
def test_frozen_stages_freeze_what_mmdets_freeze_stages_freezes(frozen_stages):
    from mmdet.models.backbones import SwinTransformer as TorchSwin

    # one block per stage: freezing goes by stage, and every stage still has its parts (a shifted block aside)
    shallow = dict(embed_dims=48, depths=(1, 1, 1, 1))
    tm = TorchSwin(**shallow, num_heads=(3, 6, 12, 24), frozen_stages=frozen_stages, out_indices=(1, 2, 3))
    tm.train()  # mmdet freezes in train()
    theirs = {k for k, p in tm.named_parameters() if not p.requires_grad}
    ours = SwinTransformer(**shallow, frozen_stages=frozen_stages, out_indices=(1, 2, 3))
    keys = interop.state_dict_layout(ours)
    assert {k for k in keys if k.startswith(ours.frozen_prefixes())} == theirs
    if frozen_stages == 0:
        return
    # and no gradient crosses into them
    variables = jax.jit(lambda k: ours.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(0))
    grads = jax.jit(jax.grad(lambda p: sum(jnp.sum(f) for f in ours.apply(
        {"params": p}, jnp.ones((1, 32, 32, 3)), train=True, rngs={"dropout": jax.random.key(1)}).values())))(
        variables["params"])
    flat = interop.export_state_dict(ours, {"params": grads})
    assert all(not np.any(flat[k]) for k in theirs) and any(np.any(flat[k]) for k in flat if k not in theirs)


def test_bfloat16_compute_keeps_float32_parameters_and_follows_float32(case):
    _, _, model, variables, _, x = case
    bf16 = models.make_model("fpn", backbone="swin_small", out_channels=32, dtype=jnp.bfloat16,
                             backbone_kwargs=dict(NARROW, drop_path_rate=0.0))
    f32 = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(x))
    low = jax.jit(lambda v, x: bf16.apply(v, x, train=False))(variables, jnp.asarray(x))
    for name in ("layer1", "layer4", "fpn.p2", "fpn.p6"):
        assert low[name].dtype == jnp.bfloat16
        err = np.abs(np.asarray(low[name], np.float32) - np.asarray(f32[name]))
        # bfloat16 keeps 8 bits of mantissa: errors of a few percent of the map's scale after 10 blocks
        assert err.max() < 0.08 * np.abs(np.asarray(f32[name])).max(), name
