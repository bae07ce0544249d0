"""The networks' contracts: named features with their shapes and strides, the registry,
frozen stages and norm_eval as the optimizer sees them, bfloat16, initialisation, errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cankd_jax import models
from conftest import assert_close
from models_helpers import NARROW, jit_init, reference_fcn_segmenter, variables_from



def _shapes(model, shape, **kwargs):
    """Output shapes without computing anything."""
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False, **kwargs)[0], x)


@pytest.mark.parametrize("name, fields", [
    ("resnet18", dict(num_classes=10)),
    ("resnet50", {}),
    ("resnet101_v1c_d8", {}),
    ("resnext101_32x4d", dict(base_width=32, stem_width=16)),
])
@pytest.mark.parametrize("hw", [(64, 96), (65, 47)])
def test_resnet_features_have_documented_shapes_and_strides(name, fields, hw):
    model = models.make_model(name, **{**NARROW, **fields})
    out = _shapes(model, (2, *hw, 3))
    strides, channels = model.feature_strides(), model.feature_channels()
    assert set(out) == set(channels)
    for feat, stride in strides.items():
        # PyTorch rounds up at every stride-2 step: the size is ceil(H / stride).
        assert out[feat].shape == (2, math.ceil(hw[0] / stride), math.ceil(hw[1] / stride), channels[feat]), feat
    if "d8" in name:
        assert strides["layer3"] == strides["layer4"] == 8
    if "num_classes" in fields:
        assert out["logits"].shape == (2, 10) and out["pool"].shape == (2, channels["layer4"])


def test_resnet_widths_match_the_real_networks():
    ch = models.make_model("resnet50").feature_channels()
    assert (ch["stem"], ch["layer1"], ch["layer4"]) == (64, 256, 2048)
    assert models.make_model("resnet18").feature_channels()["layer4"] == 512
    x101 = models.make_model("resnext101_32x4d")
    assert x101.stage_widths()[0] == (64, 128) and x101.stage_widths()[3] == (512, 1024)  # 32 groups x 4 (x 2^i)


@pytest.mark.parametrize("name, first, last", [("fpn", 2, 6), ("retinanet_fpn", 3, 7)])
def test_trunk_levels_are_named_by_stride(name, first, last):
    model = models.make_model(name, backbone="resnet50", backbone_kwargs=NARROW, out_channels=16)
    out = _shapes(model, (1, 100, 167, 3))
    levels = [k for k in out if k.startswith("fpn.")]
    assert levels == [f"fpn.p{k}" for k in range(first, last + 1)]
    for k in range(first, last + 1):
        assert out[f"fpn.p{k}"].shape == (1, math.ceil(100 / 2**k), math.ceil(167 / 2**k), 16)
    assert {"stem", "layer1", "layer4"} <= set(out)


@pytest.mark.parametrize("head", ["fcn", "deeplabv3", "pspnet"])
def test_segmenter_features(head):
    model = models.make_model(head, backbone="resnet18_v1c_d8", num_classes=5, backbone_kwargs=NARROW)
    out = _shapes(model, (2, 64, 48, 3))
    assert out["logits"].shape == out["aux_logits"].shape == (2, 64, 48, 5)
    assert out["logits"].dtype == jnp.float32
    assert out["head.logits"].shape == (2, 8, 6, 5) and out["aux.logits"].shape == (2, 8, 6, 5)
    # mmseg's widths: a quarter of layer4 / layer3 channels.
    assert out["head.feature"].shape[-1] == 64 // 4 and out["aux.feature"].shape[-1] == 32 // 4
    assert out["layer4"].shape == (2, 8, 6, 64)
    no_aux = models.make_model(head, backbone="resnet18_v1c_d8", num_classes=5, backbone_kwargs=NARROW, aux_channels=0)
    assert "aux_logits" not in _shapes(no_aux, (1, 32, 32, 3))


def test_registry_names_and_errors():
    names = models.model_names()
    for required in ("resnet18", "resnet50", "resnet101", "resnext101_32x4d", "resnext101_64x4d",
                     "resnet18_v1c_d8", "resnet101_v1c_d8", "deeplabv3", "pspnet", "fcn", "fpn"):
        assert required in names
    m = models.make_model("resnet101_v1c_d8")
    assert (m.depth, m.deep_stem, m.strides, m.dilations) == (101, True, (1, 2, 1, 1), (1, 1, 2, 4))
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*resnet18"):
        models.make_model("resnet19")
    with pytest.raises(ValueError, match="no option.*base_widht"):
        models.make_model("resnet50", base_widht=8)
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        models.make_model("pspnet", backbone="vgg16", num_classes=3)
    with pytest.raises(ValueError, match="head 'pspnet' has no option.*bins"):
        models.make_model("pspnet", num_classes=3, head_kwargs=dict(bins=(1, 2)))


def test_make_network_from_a_config_block():
    cfg = ml_collections.ConfigDict(dict(
        name="pspnet", backbone="resnet18_v1c_d8", backbone_kwargs=dict(base_width=8, stem_width=8), head_channels=16,
        frozen_stages=1, norm_eval=False, dtype="bfloat16", checkpoint="", pretrained=""))
    net = models.make_network(cfg, num_classes=7)
    assert isinstance(net, models.Segmenter) and net.decode_head.channels == 16
    assert net.backbone.frozen_stages == 1 and net.backbone.dtype == jnp.bfloat16
    labels = models.frozen_labels(net, cfg)
    params = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))["params"]
    assert labels(params)["backbone"]["layer1.0"]["conv1"]["kernel"] == "frozen"
    assert models.frozen_labels(models.make_network(dict(name="resnet18"), num_classes=3)) is None
    with pytest.raises(ValueError, match="unknown field.*head_chanels"):
        models.make_network(dict(name="fcn", backbone="resnet18_v1c_d8", head_chanels=3), num_classes=3)


def test_bad_inputs_and_fields_raise_clear_errors():
    r18 = models.ResNet(depth=18, **NARROW)
    with pytest.raises(ValueError, match=r"NHWC.*rank 3"):
        _shapes(r18, (32, 32, 3))
    with pytest.raises(ValueError, match=r"3 channels.*NCHW"):
        _shapes(r18, (1, 3, 32, 32))
    with pytest.raises(ValueError, match="floating"):
        jax.eval_shape(lambda x: r18.init(jax.random.key(0), x, train=False), jnp.zeros((1, 32, 32, 3), jnp.uint8))
    with pytest.raises(ValueError, match="unknown depth 19"):
        models.ResNet(depth=19)
    with pytest.raises(ValueError, match="ResNeXt.*bottleneck"):
        models.ResNet(depth=18, groups=32, width_per_group=4)
    with pytest.raises(ValueError, match="frozen_stages"):
        models.ResNet(depth=50, frozen_stages=5)
    with pytest.raises(ValueError, match="dilations needs 4"):
        models.ResNet(depth=50, dilations=(1, 2, 4))
    with pytest.raises(ValueError, match="add_extra_convs"):
        models.FPN(add_extra_convs="on_top")
    with pytest.raises(ValueError, match="num_outs=2"):
        jax.eval_shape(lambda: models.FPN(num_outs=2).init(jax.random.key(0), [jnp.zeros((1, 8, 8, 4))] * 3,
                                                           train=False))
    seg = models.Segmenter(models.ResNet(depth=18, **NARROW), models.FCNHead(3, 4), decode_in="layer5")
    with pytest.raises(ValueError, match="'layer5'.*layer4"):
        _shapes(seg, (1, 32, 32, 3))
    # Counts that gave logits of no class, a ZeroDivisionError in an initialiser or an error inside XLA, and a
    # dropout ratio that zeroed every training logit.
    for bad in (0, -1, "3", 2.0):
        with pytest.raises(ValueError, match=f"ResNet: num_classes must be an integer >= 1 .* got {bad!r}"):
            models.make_model("resnet18", num_classes=bad)
        with pytest.raises(ValueError, match=f"segmenter 'fcn': num_classes must be an integer >= 1, got {bad!r}"):
            models.make_model("fcn", backbone="resnet18_v1c_d8", num_classes=bad)
        with pytest.raises(ValueError, match=f"detector 'retinanet': num_classes must be .* got {bad!r}"):
            models.make_model("retinanet", backbone="resnet18", num_classes=bad)
    with pytest.raises(ValueError, match="segmenter 'pspnet': num_classes must be an integer >= 1, got None"):
        models.make_network({"name": "pspnet", "backbone": "resnet18_v1c_d8"}, num_classes=None)
    for field in ("in_channels", "stem_width", "base_width"):
        with pytest.raises(ValueError, match=f"ResNet: {field} must be an integer >= 1, got 0"):
            models.ResNet(depth=18, **{field: 0})
    for ratio in (1.5, 1, -0.1, "0.1"):
        with pytest.raises(ValueError, match=f"dropout_ratio must be a number in \\[0, 1\\).* got {ratio!r}"):
            models.make_model("fcn", backbone="resnet18_v1c_d8", num_classes=3, dropout_ratio=ratio)
    with pytest.raises(ValueError, match="network config dtype 'bfloat61' is not a float dtype"):
        models.make_network({"name": "resnet18", "dtype": "bfloat61"}, num_classes=3)
    with pytest.raises(ValueError, match="network config dtype 'int8' is not a float dtype"):
        models.make_network({"name": "resnet18", "dtype": "int8"}, num_classes=3)


def _seg_step_setup(**backbone_fields):
    model = models.make_model("fcn", backbone="resnet18_v1c_d8", num_classes=3, channels=16,
                              backbone_kwargs={**NARROW, "stage_blocks": (1, 1, 1, 1), **backbone_fields})
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = variables_from(model, reference_fcn_segmenter())

    def loss(params, stats):
        out, upd = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"],
                               rngs={"dropout": jax.random.key(2)})
        return jnp.mean(out["logits"] ** 2) + jnp.mean(out["aux_logits"] ** 2), upd["batch_stats"]

    return model, variables, jax.jit(jax.value_and_grad(loss, has_aux=True))


def _leaves_by_key(tree):
    return {".".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_frozen_stages_get_no_update_from_sgd_with_weight_decay_and_momentum():
    model, variables, grad_fn = _seg_step_setup(frozen_stages=1)
    params, stats = variables["params"], variables["batch_stats"]
    labels = models.frozen_param_labels(model, params)
    sgd = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1, momentum=0.9))
    tx = optax.multi_transform({"trainable": sgd, "frozen": optax.set_to_zero()}, labels)

    @jax.jit
    def step(params, stats, opt_state):
        (_, stats), grads = grad_fn(params, stats)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, grads

    new_params, new_stats, opt_state = params, stats, tx.init(params)
    for _ in range(2):  # the second step carries momentum
        new_params, new_stats, opt_state, grads = step(new_params, new_stats, opt_state)
    before, after, grads = _leaves_by_key(params), _leaves_by_key(new_params), _leaves_by_key(grads)
    frozen = [k for k in before if k.startswith(("backbone.stem.", "backbone.layer1."))]
    assert frozen and all(_leaves_by_key(labels)[k] == "frozen" for k in frozen)
    for k in before:
        if k in frozen:
            # No gradient reaches them (the backbone stops it, as PyTorch's requires_grad=False),
            # so only weight decay could have moved them: the optimizer must skip them entirely.
            assert np.array_equal(before[k], after[k]), f"{k} moved"
            assert not np.any(grads[k]), f"{k} got a gradient through the frozen boundary"
        else:
            assert not np.array_equal(before[k], after[k]), f"{k} did not train"
    # Frozen stages also keep their BatchNorm statistics (mmcv puts them in eval mode).
    s0, s1 = _leaves_by_key(stats), _leaves_by_key(new_stats)
    for k in s0:
        changed = not np.array_equal(s0[k], s1[k])
        assert changed != k.startswith(("backbone.stem.", "backbone.layer1.")), k


def test_norm_eval_keeps_running_statistics_but_trains_scale():
    model, variables, grad_fn = _seg_step_setup(norm_eval=True)
    (_, new_stats), grads = grad_fn(variables["params"], variables["batch_stats"])
    s0, s1 = _leaves_by_key(variables["batch_stats"]), _leaves_by_key(new_stats)
    for k in s0:
        assert np.array_equal(s0[k], s1[k]) == k.startswith("backbone."), k
    g = _leaves_by_key(grads)
    assert float(jnp.abs(g["backbone.layer2.0.bn1.scale"]).max()) > 0
    assert models.frozen_prefixes(model) == ()


def test_teacher_is_frozen_entirely():
    model = models.make_model("resnet18", **NARROW)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))["params"]
    assert set(jax.tree.leaves(models.param_labels(params, models.ALL))) == {"frozen"}


def test_bfloat16_compute_with_float32_params_stays_close():
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    fields = dict(backbone="resnet18_v1c_d8", num_classes=3, backbone_kwargs={**NARROW, "stage_blocks": (1, 1, 1, 1)})
    f32 = models.make_model("fcn", **fields)
    bf16 = models.make_model("fcn", dtype=jnp.bfloat16, **fields)
    variables = variables_from(f32, reference_fcn_segmenter())
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(
        jax.eval_shape(lambda: bf16.init(jax.random.key(0), x, train=False))["params"]))
    a, b = (jax.jit(lambda v, x, m=m: m.apply(v, x, train=False))(variables, x) for m in (f32, bf16))
    assert b["layer4"].dtype == jnp.bfloat16 and b["logits"].dtype == jnp.float32
    for name in ("layer4", "logits"):
        ref = np.asarray(a[name], np.float32)
        err = np.abs(np.asarray(b[name], np.float32) - ref).max() / np.abs(ref).max()
        assert err < 0.05, f"{name}: bf16 relative error {err:.3f}"


def test_initialisation_follows_the_pytorch_networks():
    v = jit_init(models.Bottleneck(planes=256), jnp.zeros((1, 4, 4, 1024)))
    p = v["params"]
    k = np.asarray(p["conv2"]["kernel"])  # (3, 3, 256, 256): kaiming normal, fan_out = 256 * 9
    assert abs(k.std() - math.sqrt(2 / (256 * 9))) < 0.02 * math.sqrt(2 / (256 * 9))
    assert abs(k.mean()) < 1e-3
    assert np.all(np.asarray(p["bn2"]["scale"]) == 1) and np.all(np.asarray(p["bn3"]["bias"]) == 0)
    assert_close(v["batch_stats"]["bn1"]["var"], np.ones(256))
    head = jit_init(models.ASPPHead(num_classes=3, channels=256), jnp.zeros((1, 4, 4, 8)))["params"]
    cls = np.asarray(head["conv_seg"]["kernel"])  # mmseg: N(0, 0.01^2), zero bias
    assert abs(cls.std() - 0.01) < 0.002 and np.all(np.asarray(head["conv_seg"]["bias"]) == 0)


def test_network_config_names_the_backbone_options_backbone_kwargs():
    net = models.make_network(dict(name="fcn", backbone="resnet18_v1c_d8", backbone_kwargs=dict(base_width=8)),
                              num_classes=3)
    assert net.backbone.base_width == 8
    with pytest.raises(ValueError, match="the backbone's options are `backbone_kwargs`.*not `kwargs`"):
        models.make_network(dict(name="fcn", backbone="resnet18_v1c_d8", kwargs=dict(base_width=8)), num_classes=3)
