"""Deformable convolution (`cankd_jax.models.deform_conv`) against mmcv's own ops (`mmcv.ops.deform_conv2d`,
`modulated_deform_conv2d`, `DeformConv2dPack`, `ModulatedDeformConv2dPack`), which run here on the PyTorch ports of
mmcv's CPU kernels (`tests/mmcv_ext.py`, themselves held against literal transcriptions in `test_mmcv_ext.py`):
values and the gradients w.r.t. input, offsets, mask, weight and bias."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mmcv_ext
from cankd_jax.interop.torch import export_state_dict, import_state_dict
from cankd_jax.models.deform_conv import (
    DeformConv2d, DeformConv2dPack, ModulatedDeformConv2d, ModulatedDeformConv2dPack, deform_conv2d, make_dcn,
)

mmcv_ext.install()
ops = pytest.importorskip("mmcv.ops", reason="mmcv-lite (the openmmlab test extra) is the reference")


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _kernel(w: torch.Tensor) -> np.ndarray:
    return w.detach().numpy().transpose(2, 3, 1, 0)


# c_in, c_out, size, k, stride, padding, dilation, groups, deform_groups, integer offsets
CASES = [
    (4, 6, 7, 3, 1, 1, 1, 1, 1, False),
    (4, 6, 8, 3, 2, 1, 1, 2, 2, False),
    (6, 4, 9, 3, 1, 2, 2, 2, 3, False),
    (4, 6, 6, 3, 1, 1, 1, 1, 2, True),  # points exactly on pixels, on -1 and on H: the kernels' boundaries
    (4, 4, 6, 1, 1, 0, 1, 1, 1, False),
]


@pytest.mark.parametrize("modulated", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "c{}o{}s{}k{}st{}p{}d{}g{}dg{}{}".format(*c[:9], "i" * c[9]))
def test_deform_conv2d_matches_mmcv(case, modulated):
    c, o, size, k, stride, pad, dil, groups, dg, integer = case
    rng = np.random.default_rng(sum(case[:9]) + modulated)
    ho = (size + 2 * pad - (dil * (k - 1) + 1)) // stride + 1
    x = torch.tensor(rng.normal(0, 1, (2, c, size, size)), dtype=torch.float32, requires_grad=True)
    off = rng.uniform(-3, 3, (2, 2 * dg * k * k, ho, ho))
    offset = torch.tensor(np.round(off) if integer else off, dtype=torch.float32, requires_grad=True)
    weight = torch.tensor(rng.normal(0, 0.3, (o, c // groups, k, k)), dtype=torch.float32, requires_grad=True)
    mask = torch.tensor(rng.uniform(0, 1, (2, dg * k * k, ho, ho)), dtype=torch.float32, requires_grad=True)
    bias = torch.tensor(rng.normal(0, 1, (o,)), dtype=torch.float32, requires_grad=True)
    if modulated:
        y = ops.modulated_deform_conv2d(x, offset, mask, weight, bias, stride, pad, dil, groups, dg)
    else:
        y = ops.deform_conv2d(x, offset, weight, stride, pad, dil, groups, dg)
    g = torch.tensor(rng.normal(0, 1, y.shape), dtype=torch.float32)
    (y * g).sum().backward()

    def f(x, offset, kernel, mask, bias):
        out = deform_conv2d(x, offset, kernel, mask if modulated else None, stride=stride, padding=pad,
                            dilation=dil, groups=groups, deform_groups=dg)
        out = out + bias if modulated else out
        return jnp.sum(out * _nhwc(g)), out

    grads, out = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))(
        _nhwc(x), _nhwc(offset), _kernel(weight), _nhwc(mask), bias.detach().numpy())
    tol = dict(rtol=1e-5, atol=2e-5)  # sums of C*k*k products in another order: float32 rounding
    np.testing.assert_allclose(out, _nhwc(y), **tol)
    np.testing.assert_allclose(grads[0], _nhwc(x.grad), **tol)
    np.testing.assert_allclose(grads[1], _nhwc(offset.grad), **tol)
    np.testing.assert_allclose(grads[2], _kernel(weight.grad), **tol)
    assert np.abs(_nhwc(offset.grad)).sum() > 0
    if modulated:
        np.testing.assert_allclose(grads[3], _nhwc(mask.grad), **tol)
        np.testing.assert_allclose(grads[4], bias.grad.numpy(), **tol)


@pytest.mark.parametrize("stride, dilation, groups", [(1, 1, 1), (2, 1, 2), (1, 2, 4)])
def test_zero_offsets_and_unit_mask_give_the_plain_convolution(stride, dilation, groups):
    """With every offset 0 (and mask 1) a deformable conv samples the regular grid: it is `lax.conv`."""
    rng = np.random.default_rng(stride + 3 * dilation + groups)
    x = jnp.asarray(rng.normal(0, 1, (2, 9, 9, 8)), jnp.float32)
    kernel = jnp.asarray(rng.normal(0, 1, (3, 3, 8 // groups, 8)), jnp.float32)
    pad = dilation
    ho = (9 + 2 * pad - 2 * dilation - 1) // stride + 1
    expected = jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(pad, pad)] * 2, rhs_dilation=(dilation,) * 2,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
                                            precision="highest")
    got = deform_conv2d(x, jnp.zeros((2, ho, ho, 18 * 2)), kernel, jnp.ones((2, ho, ho, 18)), stride=stride,
                        padding=pad, dilation=dilation, groups=groups, deform_groups=2)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


class _Wrap(nn.Module):
    """A pack as a one-layer network (the interop traces `model.init(key, x, train=False)`)."""

    kind: str
    fields: tuple

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        return make_dcn(self.kind, name="conv", **dict(self.fields))(x)


@pytest.mark.parametrize("modulated", [False, True], ids=["DCN", "DCNv2"])
@pytest.mark.parametrize("k, stride, pad, dil, dg", [(3, 1, 1, 1, 1), (3, 2, 2, 2, 2), (1, 1, 0, 1, 1)])
def test_packs_import_mmcv_weights_and_match_it(modulated, k, stride, pad, dil, dg):
    """mmcv's packs with non-zero offset convs (so the offsets and the mask matter): strict import of their keys
    (`weight`, `bias`, `conv_offset.weight`, `conv_offset.bias`), the same output and input gradient, and the
    export gives mmcv's state dict back."""
    torch.manual_seed(k + stride + dg)
    cls = ops.ModulatedDeformConv2dPack if modulated else ops.DeformConv2dPack
    ref = torch.nn.Sequential()
    ref.add_module("conv", cls(4, 6, k, stride=stride, padding=pad, dilation=dil, deform_groups=dg))
    with torch.no_grad():
        ref.conv.conv_offset.weight.normal_(0, 0.5)
        ref.conv.conv_offset.bias.normal_(0, 0.5)
        if modulated:
            ref.conv.bias.normal_(0, 1)
    model = _Wrap("DCNv2" if modulated else "DCN", tuple(dict(features=6, kernel_size=k, stride=stride, padding=pad,
                                                              dilation=dil, deform_groups=dg).items()))
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    variables, report = import_state_dict(model, ref.state_dict(), sample=jnp.zeros((2, 8, 8, 4)))
    assert not report.missing and not report.unexpected
    y = ref(x)
    g = torch.randn(y.shape)
    (y * g).sum().backward()
    out, vjp = jax.vjp(lambda v: model.apply(variables, v), _nhwc(x))
    np.testing.assert_allclose(out, _nhwc(y), rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(vjp(_nhwc(g))[0], _nhwc(x.grad), rtol=1e-5, atol=2e-5)
    exported = export_state_dict(model, variables, sample=jnp.zeros((2, 8, 8, 4)))
    assert set(exported) == set(ref.state_dict())
    for key, value in ref.state_dict().items():
        np.testing.assert_array_equal(np.asarray(exported[key]), value.numpy(), err_msg=key)


def test_fresh_packs_are_plain_convolutions_and_init_as_mmcv():
    """A fresh pack's `conv_offset` is zero (a plain conv; v2's mask is sigmoid(0) = 1/2), and the kernel's
    spread is mmcv's: v1 kaiming_uniform (bound sqrt(6 / fan_in)), v2 U(+-1/sqrt(C k k))."""
    x = jnp.asarray(np.random.default_rng(0).normal(0, 1, (1, 6, 6, 32)), jnp.float32)
    for cls, bound in ((DeformConv2dPack, np.sqrt(6 / (32 * 9))), (ModulatedDeformConv2dPack, 1 / np.sqrt(32 * 9))):
        layer = cls(features=64, kernel_size=3, padding=1)
        params = layer.init(jax.random.key(1), x)["params"]
        assert not np.any(params["conv_offset"]["kernel"]) and not np.any(params["conv_offset"]["bias"])
        kernel = np.asarray(params["kernel"])
        assert kernel.shape == (3, 3, 32, 64) and np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
        plain = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(1, 1)] * 2,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")
        scale = 0.5 if cls is ModulatedDeformConv2dPack else 1.0
        np.testing.assert_allclose(layer.apply({"params": params}, x), scale * plain, rtol=1e-5, atol=1e-5)


def test_bfloat16_columns_stay_close_to_float32():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(0, 1, (1, 8, 8, 16)), jnp.float32)
    offset = jnp.asarray(rng.uniform(-2, 2, (1, 8, 8, 18)), jnp.float32)
    kernel = jnp.asarray(rng.normal(0, 0.1, (3, 3, 16, 8)), jnp.float32)
    full = deform_conv2d(x, offset, kernel, padding=1)
    half = deform_conv2d(x.astype(jnp.bfloat16), offset, kernel, padding=1, dtype=jnp.bfloat16)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(half.astype(jnp.float32), full, atol=0.05 * float(jnp.abs(full).max()))


@pytest.mark.parametrize("change, message", [
    (dict(offset=(1, 6, 6, 17)), r"offset must be \(B, Ho, Wo, 2 \* deform_groups \* kh \* kw\) = \(1, 6, 6, 18\)"),
    (dict(mask=(1, 6, 6, 8)), r"mask must be \(B, Ho, Wo, deform_groups \* kh \* kw\) = \(1, 6, 6, 9\)"),
    (dict(x=(1, 6, 6, 5)), r"needs C = 4 input channels"),
    (dict(x=(1, 1, 1, 4), offset=(1, 1, 1, 18)), r"too small"),
    (dict(deform_groups=3), r"do not split into deform_groups=3"),
])
def test_bad_shapes_are_named(change, message):
    shapes = dict(x=(1, 6, 6, 4), offset=(1, 6, 6, 18), mask=None, deform_groups=1)
    shapes.update(change)
    mask = None if shapes["mask"] is None else jnp.zeros(shapes["mask"])
    with pytest.raises(ValueError, match=message):
        deform_conv2d(jnp.zeros(shapes["x"]), jnp.zeros(shapes["offset"]), jnp.zeros((3, 3, 4, 8)), mask,
                      padding=1 if shapes["x"][1] > 1 else 0, deform_groups=shapes["deform_groups"])
    with pytest.raises(ValueError, match="unknown deformable conv type 'DCNv3'"):
        make_dcn("DCNv3", features=4, kernel_size=3)


def test_module_classes_take_offsets_and_masks():
    """`DeformConv2d` / `ModulatedDeformConv2d` take the offsets (and mask) as arguments, as RepPoints' head does."""
    x = jnp.ones((1, 5, 5, 4))
    off = jnp.zeros((1, 5, 5, 18))
    v1 = DeformConv2d(features=3, kernel_size=3, padding=1)
    v2 = ModulatedDeformConv2d(features=3, kernel_size=3, padding=1)
    p1 = v1.init(jax.random.key(0), x, off)
    p2 = v2.init(jax.random.key(0), x, off, jnp.ones((1, 5, 5, 9)))
    assert set(p1["params"]) == {"kernel"} and set(p2["params"]) == {"kernel", "bias"}
    assert v2.apply(p2, x, off, jnp.ones((1, 5, 5, 9))).shape == (1, 5, 5, 3)


@pytest.mark.slow  # heavy: a whole (narrowed) deformable ResNeXt against mmdet
def test_resnext_with_deformable_stages_matches_mmdet():
    """mmdet's own `ResNeXt` with the X101-DCN teacher's settings (`dcn=dict(type='DCN', deform_groups=1,
    fallback_on_stride=False), stage_with_dcn=(False, True, True, True)`, frozen_stages=1, norm_eval), narrowed
    to depth 50, 4 groups and 16 base channels: strict import of its keys (`layer2.0.conv2.weight`,
    `layer2.0.conv2.conv_offset.*`, ...), every stage's output, and the gradient of every trainable parameter."""
    import openmmlab_reference as mr

    if mr.available():
        pytest.skip(mr.available())
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope

    from cankd_jax import models

    cfg = dict(type="ResNeXt", depth=50, groups=4, base_width=4, base_channels=16, stem_channels=16,
               out_indices=(0, 1, 2, 3), frozen_stages=1, norm_eval=True, style="pytorch",
               dcn=dict(type="DCN", deform_groups=1, fallback_on_stride=False), stage_with_dcn=(False, True, True, True))
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope("mmdet"):
        tm = MODELS.build(cfg)
    mr.perturb_(tm, 1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # offsets that depend on the input: about +-0.5 px, some points across the border
        for name, m in tm.named_modules():
            if name.endswith("conv_offset"):
                m.weight.copy_(0.02 * torch.randn(m.weight.shape, generator=g))
    tm.train()  # norm_eval keeps the BatchNorms on their running statistics, as our train=True with norm_eval
    model = models.make_model("resnext101_32x4d_dcn", depth=50, groups=4, base_width=16, stem_width=16,
                              frozen_stages=1, norm_eval=True)
    variables, report = import_state_dict(model, tm.state_dict(), sample=jnp.zeros((2, 64, 64, 3)))
    assert not report.missing and not report.unexpected
    assert "layer4.2.conv2.conv_offset.weight" in report.loaded and "layer1.0.conv2.conv_offset.weight" not in tm.state_dict()

    x = np.random.default_rng(3).normal(0, 1, (2, 64, 64, 3)).astype(np.float32)
    theirs = tm(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    weights = [np.random.default_rng(4 + i).normal(size=t.shape).astype(np.float32) for i, t in enumerate(theirs)]
    sum((t * torch.from_numpy(w)).sum() for t, w in zip(theirs, weights)).backward()

    def loss(params):
        out = model.apply({**variables, "params": params}, jnp.asarray(x), train=True)
        feats = [out[f"layer{i}"] for i in range(1, 5)]
        return sum(jnp.sum(f * w.transpose(0, 2, 3, 1)) for f, w in zip(feats, weights)), feats

    grads, feats = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    for i, (f, t) in enumerate(zip(feats, theirs)):
        np.testing.assert_allclose(f, _nhwc(t), rtol=1e-4, atol=1e-4, err_msg=f"layer{i + 1}")
    exported = export_state_dict(model, {**variables, "params": grads}, sample=jnp.zeros((2, 64, 64, 3)))
    checked = 0
    for key, param in tm.named_parameters():
        if param.grad is None:  # frozen: the stem and layer1 (ours get a zero gradient there)
            assert not np.any(np.asarray(exported[key])), key
            continue
        scale = float(param.grad.abs().max())
        np.testing.assert_allclose(np.asarray(exported[key]), param.grad.numpy(), rtol=2e-4, atol=2e-4 * scale,
                                   err_msg=key)
        checked += key.endswith("conv_offset.weight")
    assert checked == 13  # every deformable block's offset conv (4 + 6 + 3 blocks)
