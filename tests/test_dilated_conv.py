"""Dilated convolutions computed undilated over interleaved sub-images (`conv.dilated_as_batched`, and for the
weight gradient only, `conv.dilated_conv_batched_wgrad`) against PyTorch's dilated `conv2d`: values and gradients
in float64, so any difference beyond rounding is a wrong index."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cankd_jax.compute import conv_form, conv_form_for, dilated_conv, dilated_conv_form, real_share
from cankd_jax.models.conv import conv2d, conv_as_tap_matmuls


class _Conv(nn.Module):
    features: int
    kernel_size: int
    dilation: int
    groups: int = 1
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        return conv2d(x, self.features, self.kernel_size, name="conv", stride=self.stride, dilation=self.dilation,
                      groups=self.groups, use_bias=True, dtype=jnp.float64, param_dtype=jnp.float64)


def _torch_conv(x, kernel, bias, m: _Conv):
    """PyTorch's dilated conv2d on the same (NHWC, HWIO) arrays, its output and the gradients of sum(y * w)."""
    xt = torch.tensor(np.transpose(x, (0, 3, 1, 2)), requires_grad=True)
    kt = torch.tensor(np.transpose(kernel, (3, 2, 0, 1)), requires_grad=True)
    bt = torch.tensor(bias, requires_grad=True)
    y = F.conv2d(xt, kt, bt, stride=m.stride, padding=m.dilation * (m.kernel_size // 2), dilation=m.dilation,
                 groups=m.groups)
    weights = torch.tensor(np.random.default_rng(1).standard_normal(tuple(y.shape)))
    (y * weights).sum().backward()
    return (np.transpose(y.detach().numpy(), (0, 2, 3, 1)), np.transpose(xt.grad.numpy(), (0, 2, 3, 1)),
            np.transpose(kt.grad.numpy(), (2, 3, 1, 0)), bt.grad.numpy(), np.transpose(weights.numpy(), (0, 2, 3, 1)))


# (H, W, dilation, kernel, groups): sizes that d divides and that it does not, d larger than the map (mmseg's
# ASPP dilations 12/24/36 on small maps), a 5x5 kernel, and grouped / depthwise convs (MobileNetV2-d8).
CASES = [(8, 16, 2, 3, 1), (9, 13, 2, 3, 1), (7, 5, 4, 3, 1), (8, 8, 12, 3, 1), (10, 6, 36, 3, 1),
         (11, 6, 3, 5, 1), (9, 7, 2, 3, 2), (6, 9, 4, 3, 6)]


def _check_against_torch(m: _Conv, h: int, w: int, *, training_forward: bool = False):
    with jax.enable_x64():
        x = np.random.default_rng(0).standard_normal((2, h, w, 6))
        variables = m.init(jax.random.key(0), jnp.asarray(x))
        kernel, bias = (np.asarray(variables["params"]["conv"][n]) for n in ("kernel", "bias"))
        y_ref, gx_ref, gk_ref, gb_ref, weights = _torch_conv(x, kernel, bias, m)

        def loss(v, x):
            return jnp.sum(m.apply(v, x) * weights)

        # Jitted: one program per case compiles faster than dispatching a 7x7 kernel's 49 taps op by op.
        y = jax.jit(m.apply)(variables, jnp.asarray(x))
        gv, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, jnp.asarray(x))
        if training_forward:  # the output a differentiated pass computes, where a form computes it otherwise
            y_train = jax.jit(lambda v, x: jax.vjp(m.apply, v, x)[0])(variables, jnp.asarray(x))
            np.testing.assert_allclose(y_train, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-12, atol=1e-11)
    np.testing.assert_allclose(gv["params"]["conv"]["kernel"], gk_ref, rtol=1e-12, atol=1e-11)
    np.testing.assert_allclose(gv["params"]["conv"]["bias"], gb_ref, rtol=1e-12, atol=1e-11)


@pytest.mark.parametrize("form", ["batched", "wgrad"])
@pytest.mark.parametrize("h, w, d, k, groups", CASES)
def test_batched_dilated_conv_matches_torch(h, w, d, k, groups, form):
    with dilated_conv(form):
        _check_against_torch(_Conv(features=6, kernel_size=k, dilation=d, groups=groups), h, w)


# (H, W, dilation, kernel, stride): the dilated cases above, strides 2 and 3 on even and odd sizes (a stem's and a
# downsampling block's 3x3, a 7x7 stem), a dilation the map is narrower than in one direction only.
TAP_CASES = [(8, 16, 2, 3, 1), (9, 13, 2, 3, 1), (8, 8, 12, 3, 1), (10, 6, 36, 3, 1), (11, 6, 3, 5, 1),
             (8, 9, 1, 3, 2), (9, 9, 1, 3, 2), (13, 11, 1, 7, 2), (10, 7, 2, 3, 3), (4, 20, 6, 3, 1)]


@pytest.mark.parametrize("h, w, d, k, stride", TAP_CASES)
def test_tap_matmul_conv_matches_torch(h, w, d, k, stride):
    with dilated_conv("native"), conv_form("taps"):
        _check_against_torch(_Conv(features=6, kernel_size=k, dilation=d, stride=stride), h, w)


@pytest.mark.parametrize("h, w, d, k, stride", [TAP_CASES[1], TAP_CASES[4], TAP_CASES[7], TAP_CASES[8]])
def test_tap_forward_conv_matches_torch(h, w, d, k, stride):
    """The taps' forward pass (tested above on every case) with XLA's gradients: a dilation the size does not
    divide, one wider than the map, a strided 7x7, a stride-3 dilated conv."""
    with dilated_conv("native"), conv_form("tap_forward"):
        _check_against_torch(_Conv(features=6, kernel_size=k, dilation=d, stride=stride), h, w)


@pytest.mark.parametrize("h, w, d, k, stride", [TAP_CASES[i] for i in (1, 2, 4, 7, 8, 9)])
def test_im2col_conv_matches_torch(h, w, d, k, stride):
    """'im2col': the taps' forward pass where nothing is differentiated (tested above on every case), and under a
    gradient one matmul over the input's shifted copies, its output and both gradients: a dilation the size does
    not divide, one wider than the map, a 5x5, a strided 7x7, a stride-3 dilated conv, a dilation the map is
    narrower than in one direction."""
    with dilated_conv("native"), conv_form("im2col"):
        _check_against_torch(_Conv(features=6, kernel_size=k, dilation=d, stride=stride), h, w,
                             training_forward=True)


def test_real_share_counts_the_reads_on_real_pixels():
    """By hand: the real share of the kernel's rows times that of its columns."""
    # A 3x3 over 4 x 5 (padding 1): taps at offsets -1, 0, +1 read a real row for 3, 4, 3 of the 4 output rows,
    # a real column for 4, 5, 4 of the 5 output columns.
    assert real_share((4, 5), 3, 1, 1) == pytest.approx((10 / 12) * (13 / 15))
    # Dilation 12 over 8 rows: only the centre tap reads a real row; the map's 16 columns: 4 + 16 + 4 of 48.
    assert real_share((8, 16), 3, 1, 12) == pytest.approx((1 / 3) * (24 / 48))
    # Stride 2 over 9: outputs 0..4 read rows 2r - 1, 2r, 2r + 1: 4, 5 and 4 of 5 are real.
    assert real_share((9, 9), 3, 2, 1) == pytest.approx((13 / 15) ** 2)
    assert real_share((16, 32), 1, 1, 1) == 1.0


def test_wide_taps_choose_by_channels_and_padding(monkeypatch):
    """'wide_taps': convolutions from 256 input channels run their forward pass as tap matmuls; their gradients
    too where at least a quarter of the native reads fall on padding (a dilation wide for the map); elsewhere
    one im2col matmul in training where they keep at least half their channels, XLA's gradient convolutions
    where they narrow them more; thinner and grouped ones stay XLA convolutions. Read off the compiled programs:
    no convolution left in a 'taps' or an 'im2col' one, the gradients' convolutions only in a 'tap_forward' one.
    'auto' is 'wide_taps' on CPUs only."""
    padded, plain = ((16, 16), 3, 1, 12), ((16, 16), 3, 1, 1)  # real shares 0.25 and 0.92
    with conv_form("wide_taps"):
        assert conv_form_for(padded[0], 256, *padded[1:], 1, 256) == "taps"
        assert conv_form_for(plain[0], 256, *plain[1:], 1, 128) == "im2col"
        assert conv_form_for(plain[0], 256, *plain[1:], 1, 127) == "tap_forward"
        assert conv_form_for(padded[0], 255, *padded[1:], 1, 256) == "native"
        assert conv_form_for(padded[0], 256, *padded[1:], 2, 256) == "native"
    assert jax.default_backend() == "cpu"
    assert conv_form_for(plain[0], 256, *plain[1:], 1, 8) == "tap_forward"
    with conv_form("native"):
        assert conv_form_for(padded[0], 256, *padded[1:], 1, 256) == "native"
    with monkeypatch.context() as m:
        m.setattr(jax, "default_backend", lambda: "gpu")
        assert conv_form_for(padded[0], 256, *padded[1:], 1, 256) == "native"

    def programs(m, c):
        x = jnp.ones((1, 16, 16, c))
        v = m.init(jax.random.key(0), x)
        grad = jax.jit(jax.grad(lambda v, x: jnp.sum(m.apply(v, x) ** 2), argnums=(0, 1)))
        return jax.jit(m.apply).lower(v, x).as_text(), grad.lower(v, x).as_text()

    for form in ("wide_taps", "auto"):
        with conv_form(form):
            forward, grad = programs(_Conv(features=8, kernel_size=3, dilation=12), 256)
            assert "convolution" not in forward and "convolution" not in grad
            for stride in (1, 2):
                forward, grad = programs(_Conv(features=8, kernel_size=3, dilation=1, stride=stride), 256)
                assert "convolution" not in forward and grad.count("stablehlo.convolution") == 2
                forward, grad = programs(_Conv(features=128, kernel_size=3, dilation=1, stride=stride), 256)
                assert "convolution" not in forward and "convolution" not in grad
            assert "convolution" in programs(_Conv(features=8, kernel_size=3, dilation=12), 128)[0]
            assert "convolution" in programs(_Conv(features=256, kernel_size=3, dilation=1, groups=256), 256)[0]
    with conv_form("native"):
        assert "convolution" in programs(_Conv(features=8, kernel_size=3, dilation=12), 256)[0]


def test_tap_matmul_conv_names_what_it_does_not_take():
    x, k = jnp.ones((1, 6, 6, 4)), jnp.ones((3, 3, 2, 4))
    with pytest.raises(ValueError, match="feature_group_count=2"):
        conv_as_tap_matmuls(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                            feature_group_count=2)
    with pytest.raises(ValueError, match="padding='SAME'"):
        conv_as_tap_matmuls(x, jnp.ones((3, 3, 4, 4)), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    with pytest.raises(ValueError, match="unknown convolution form 'fast'"):
        with conv_form("fast"):
            pass


def test_forms_share_parameters_and_agree():
    """'native' and 'batched' trace different programs over the same parameters (same tree, same shapes) and
    give the same output; the batched program holds no dilated convolution, the native one does."""
    m = _Conv(features=4, kernel_size=3, dilation=4)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 12, 10, 3)), jnp.float32)
    with jax.enable_x64():
        with dilated_conv("batched"):
            batched = m.init(jax.random.key(0), x.astype(jnp.float64))
            y_batched = m.apply(batched, x.astype(jnp.float64))
            batched_text = jax.jit(m.apply).lower(batched, x.astype(jnp.float64)).as_text()
        with dilated_conv("native"):
            native = m.init(jax.random.key(0), x.astype(jnp.float64))
            y_native = m.apply(native, x.astype(jnp.float64))
            native_text = jax.jit(m.apply).lower(native, x.astype(jnp.float64)).as_text()
    assert jax.tree.map(jnp.shape, batched) == jax.tree.map(jnp.shape, native)
    np.testing.assert_allclose(y_batched, y_native, rtol=1e-12, atol=1e-12)
    assert "rhs_dilate = [4, 4]" in native_text
    assert "rhs_dilate = [1, 1]" in batched_text and "rhs_dilate = [4, 4]" not in batched_text


def test_wgrad_form_rewrites_the_weight_gradient_only():
    """'wgrad': the forward pass is the native dilated convolution; in the gradient program the input gradient
    keeps the dilation (lhs-dilated transposed form) while the weight gradient is an undilated VALID convolution
    over sub-images, so no convolution there has a kernel-sized window strided by d."""
    m = _Conv(features=4, kernel_size=3, dilation=4)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 12, 10, 3)), jnp.float32)
    with dilated_conv("wgrad"):
        v = m.init(jax.random.key(0), x)
        forward = jax.jit(m.apply).lower(v, x).as_text()
        grad = jax.jit(jax.grad(lambda v, x: jnp.sum(m.apply(v, x) ** 2), argnums=(0, 1))).lower(v, x).as_text()
    with dilated_conv("native"):
        native_grad = jax.jit(jax.grad(lambda v, x: jnp.sum(m.apply(v, x) ** 2), argnums=(0, 1))).lower(v, x)
    assert forward.count("stablehlo.convolution") == 1 and "rhs_dilate = [4, 4]" in forward
    assert "window = {stride = [4, 4]" in native_grad.as_text()  # the window XLA writes the weight gradient with
    assert "window = {stride = [4, 4]" not in grad and "rhs_dilate = [4, 4]" in grad


def test_auto_form_by_backend():
    """'auto' (the default) is batched on GPUs only: on XLA:CPU the batched form is 5.6x slower (README)."""
    assert dilated_conv_form() == ("batched" if jax.default_backend() == "gpu" else "native")
    with dilated_conv("batched"):
        assert dilated_conv_form() == "batched"
    assert dilated_conv_form() == ("batched" if jax.default_backend() == "gpu" else "native")


def test_strided_dilated_conv_stays_native():
    """A strided dilated conv (no network of ours has one) is not rewritten, and still matches PyTorch."""
    with jax.enable_x64(), dilated_conv("batched"):
        m = _Conv(features=5, kernel_size=3, dilation=2, stride=2)
        x = np.random.default_rng(0).standard_normal((1, 11, 9, 4))
        v = m.init(jax.random.key(0), jnp.asarray(x))
        y = m.apply(v, jnp.asarray(x))
    y_ref = _torch_conv(x, np.asarray(v["params"]["conv"]["kernel"]), np.asarray(v["params"]["conv"]["bias"]), m)[0]
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)


def test_unknown_form_is_refused():
    with pytest.raises(ValueError, match="unknown dilated convolution form 'fast'.*auto, batched, wgrad, native"):
        with dilated_conv("fast"):
            pass
