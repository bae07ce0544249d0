"""Convolutions laid out as PyTorch's, and mmcv's ConvModule (conv + BatchNorm/GroupNorm + ReLU/ReLU6).

A 1x1 convolution is a matmul over channels (`layers.Conv1x1`), never a general
convolution; every other kernel size is a `flax.linen.Conv` with PyTorch's
symmetric padding `dilation * (k // 2)`, so output sizes match PyTorch's for
odd inputs and strides too. On GPUs a stride-1 dilated convolution runs undilated
over its input's interleaved sub-images (`dilated_as_batched`; `compute.dilated_conv`); under
`compute.conv_form` a convolution is a sum of per-tap matmuls (`conv_as_tap_matmuls`), in its gradients
too or in its forward pass only (`conv_tap_forward`), or in training one matmul over the input's shifted copies
(`conv_im2col`).
Default initialisation is the one the PyTorch networks start from: Kaiming-normal
over fan-out for convolutions (torchvision's ResNet, mmcv's ConvModule), BatchNorm
weight 1 and bias 0.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cankd_jax.compute import conv_form_for, dilated_conv_form
from cankd_jax.config_arg import is_count
from cankd_jax.layers import BatchNorm, Conv1x1, Dtype, Initializer, torch_bias_init

Array = jax.Array

# kaiming_normal_(mode='fan_out', nonlinearity='relu'): N(0, 2 / fan_out), fan_out = O * kh * kw
# (PyTorch does not divide by groups; neither does Flax for a (kh, kw, I/g, O) kernel).
kaiming_fan_out: Initializer = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# mmdet's FPN: xavier_uniform (gain 1) weights, zero biases.
xavier_uniform: Initializer = nn.initializers.xavier_uniform()


def conv2d(
    x: Array,
    features: int,
    kernel_size: int,
    *,
    name: str,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    use_bias: bool = False,
    kernel_init: Initializer = kaiming_fan_out,
    bias_init: Optional[Initializer] = None,
    dtype: Optional[Dtype] = None,
    param_dtype: Dtype = jnp.float32,
) -> Array:
    """`nn.Conv2d(C, features, kernel_size, stride, padding=dilation * (k // 2), dilation, groups)` on NHWC.

    Call from inside a compact method: the layer is created there under `name`.
    `(B, H, W, C) -> (B, H', W', features)` with PyTorch's size
    `H' = floor((H + 2 * pad - dilation * (k - 1) - 1) / stride) + 1`. Params: `kernel` `(C, features)` for 1x1, else `(k, k, C / groups,
    features)`; `bias (features,)` if `use_bias` (default init: PyTorch's
    fan-in uniform).
    """
    if kernel_size == 1 and groups == 1:
        if stride > 1:
            # A strided 1x1 conv (padding 0) reads exactly every stride-th pixel.
            x = x[:, ::stride, ::stride]
        return Conv1x1(features, use_bias=use_bias, kernel_init=kernel_init, bias_init=bias_init,
                       dtype=dtype, param_dtype=param_dtype, name=name)(x)
    pad = dilation * (kernel_size // 2)
    fan_in = (x.shape[-1] // groups) * kernel_size * kernel_size
    form = dilated_conv_form() if dilation > 1 and stride == 1 else "native"
    if form == "native":
        form = conv_form_for(x.shape[1:3], x.shape[-1], kernel_size, stride, dilation, groups, features)
    batched = form == "batched"
    conv = nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=stride,
        padding="VALID" if batched else ((pad, pad), (pad, pad)),
        kernel_dilation=1 if batched else dilation,
        feature_group_count=groups,
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=bias_init or torch_bias_init(fan_in),
        dtype=dtype,
        param_dtype=param_dtype,
        conv_general_dilated={"wgrad": dilated_conv_batched_wgrad, "taps": conv_as_tap_matmuls,
                              "tap_forward": conv_tap_forward, "im2col": conv_im2col}.get(form),
        name=name,
    )
    return dilated_as_batched(conv, x, kernel_size, dilation, pad) if batched else conv(x)


def dilated_as_batched(conv, x: Array, kernel_size: int, dilation: int, pad: int) -> Array:
    """A stride-1 convolution with dilation `d` and padding `pad`, computed as the undilated `conv` (VALID
    padding) over the d x d interleaved sub-images of the padded input ("space to batch"): the same products
    and sums, so the same result up to float rounding.

    Why: cuDNN has no fast kernel for dilated convolutions' weight gradient. XLA writes that gradient as a
    forward convolution with a feature-map-sized window and stride d, which cuDNN runs on its slow "indexed"
    implicit-GEMM kernels: on an H200 the six dilated convolutions of DeepLabV3-R18-d8's backward took 17.6
    of the paper's 60 ms step (`results/gpu/`). Undilated, they run on Hopper's fast kernels.

    `(B, H, W, C) -> (B, H + 2 pad - d (k - 1), W + 2 pad - d (k - 1), features)`. Output pixel
    (a d + r, b d + s) reads only sub-image (r, s) of the padded input, rows r, r + d, r + 2d, ... and
    columns likewise, so it is a k x k VALID convolution of that sub-image. The padded input is extended to
    a multiple of d (zeros, read by no kept output) and the surplus output rows and columns are cut off.
    """
    b, h, w, _ = x.shape
    d, span = dilation, dilation * (kernel_size - 1)
    out_h, out_w = h + 2 * pad - span, w + 2 * pad - span
    hp, wp = -(-(h + 2 * pad) // d) * d, -(-(w + 2 * pad) // d) * d
    x = _space_to_batch(jnp.pad(x, ((0, 0), (pad, hp - h - pad), (pad, wp - w - pad), (0, 0))), d)
    y = conv(x)
    _, yh, yw, f = y.shape
    y = y.reshape(b, d, d, yh, yw, f).transpose(0, 3, 1, 4, 2, 5).reshape(b, yh * d, yw * d, f)
    return y[:, :out_h, :out_w]


def conv_as_tap_matmuls(lhs: Array, rhs: Array, window_strides: Sequence[int], padding: Any, *,
                        lhs_dilation: Optional[Sequence[int]] = None, rhs_dilation: Optional[Sequence[int]] = None,
                        dimension_numbers: Any = None, feature_group_count: int = 1, precision: Any = None) -> Array:
    """`lax.conv_general_dilated` for an NHWC/HWIO convolution (any stride, dilation and explicit padding, no
    groups) written as the sum over the kernel's taps of one matmul each: tap (i, j) multiplies the input
    pixels it reads, a strided slice of the input, by its `(C, O)` kernel slice, and its products land on
    the output pixels that read a real (not padded) input pixel there. Padding is never materialised: a tap's
    slice is cut to the rows and columns it reaches, its product padded back with zeros, and a tap that
    reaches nothing (a dilation wider than the map) is left out. The products and sums of the convolution,
    in another order, so the same result up to float rounding; gradients are matmuls too.

    Why: on XLA:CPU these matmuls run at the GEMM rate, its convolutions (and their gradients) well below it
    (`compute.conv_form`). Signature of `lax.conv_general_dilated` (flax's `nn.Conv(conv_general_dilated=...)`).
    """
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if (dn != lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")) or feature_group_count != 1
            or tuple(lhs_dilation or (1, 1)) != (1, 1) or isinstance(padding, str)):
        raise ValueError(f"conv_as_tap_matmuls: an NHWC/HWIO convolution with explicit padding, no groups and "
                         f"no input dilation only; got dimension numbers {dimension_numbers}, "
                         f"feature_group_count={feature_group_count}, lhs_dilation={lhs_dilation}, padding={padding!r}")
    b, h, w, c = lhs.shape
    kh, kw, _, o = rhs.shape
    (sh, sw), (dh, dw) = tuple(window_strides), tuple(rhs_dilation or (1, 1))
    (pt, pb), (pl, pr) = padding
    ho, wo = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1

    def reach(offset: int, size: int, stride: int, out: int) -> tuple[int, int]:
        # Output indices r in [first, last] read input index r * stride + offset inside [0, size).
        return max(0, -(offset // stride)), min(out - 1, (size - 1 - offset) // stride)

    y = None
    for i in range(kh):
        r0, r1 = reach(i * dh - pt, h, sh, ho)
        for j in range(kw):
            c0, c1 = reach(j * dw - pl, w, sw, wo)
            if r0 > r1 or c0 > c1:
                continue
            top, left = r0 * sh + i * dh - pt, c0 * sw + j * dw - pl
            tap = lax.slice(lhs, (0, top, left, 0), (b, top + (r1 - r0) * sh + 1, left + (c1 - c0) * sw + 1, c),
                            (1, sh, sw, 1))
            part = jnp.einsum("bhwc,co->bhwo", tap, rhs[i, j], precision=precision)
            part = jnp.pad(part, ((0, 0), (r0, ho - 1 - r1), (c0, wo - 1 - c1), (0, 0)))
            y = part if y is None else y + part
    if y is None:  # every tap falls in the padding
        return jnp.zeros((b, ho, wo, o), jnp.result_type(lhs, rhs))
    return y


def conv_tap_forward(lhs: Array, rhs: Array, window_strides: Sequence[int], padding: Any, *,
                     lhs_dilation: Optional[Sequence[int]] = None, rhs_dilation: Optional[Sequence[int]] = None,
                     dimension_numbers: Any = None, feature_group_count: int = 1, precision: Any = None) -> Array:
    """`lax.conv_general_dilated` whose forward pass is `conv_as_tap_matmuls` and whose gradients (input and
    kernel) are XLA's own, those of `lax.conv_general_dilated`: the same function, so the same values and
    gradients up to float rounding. Takes what `conv_as_tap_matmuls` takes.

    Why: on XLA:CPU a wide convolution's forward pass runs faster as tap matmuls, its gradients slower (where
    padding is a small share of the reads), because the taps' backward pads and adds each tap's input gradient
    back and transposes each tap's cotangent for its kernel gradient (`results/train_speed/conv_cpu.md`)."""
    strides = tuple(window_strides)
    dilation = tuple(rhs_dilation or (1, 1))
    if isinstance(padding, str) or tuple(lhs_dilation or (1, 1)) != (1, 1):
        # conv_as_tap_matmuls names what it does not take.
        return conv_as_tap_matmuls(lhs, rhs, strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=dilation,
                                   dimension_numbers=dimension_numbers, feature_group_count=feature_group_count)
    pads = tuple(tuple(p) for p in padding)
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return _tap_forward(lhs, rhs, strides, pads, dilation, dn, feature_group_count, precision)


def _xla_conv(lhs, rhs, strides, pads, dilation, dn, groups, precision):
    return lax.conv_general_dilated(lhs, rhs, strides, pads, rhs_dilation=dilation, dimension_numbers=dn,
                                    feature_group_count=groups, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _tap_forward(lhs, rhs, strides, pads, dilation, dn, groups, precision):
    return conv_as_tap_matmuls(lhs, rhs, strides, pads, rhs_dilation=dilation, dimension_numbers=dn,
                               feature_group_count=groups, precision=precision)


def _tap_forward_fwd(lhs, rhs, strides, pads, dilation, dn, groups, precision):
    return _tap_forward(lhs, rhs, strides, pads, dilation, dn, groups, precision), (lhs, rhs)


def _tap_forward_bwd(strides, pads, dilation, dn, groups, precision, res, g):
    _, vjp = jax.vjp(lambda x, w: _xla_conv(x, w, strides, pads, dilation, dn, groups, precision), *res)
    return vjp(g)


_tap_forward.defvjp(_tap_forward_fwd, _tap_forward_bwd)


def conv_im2col(lhs: Array, rhs: Array, window_strides: Sequence[int], padding: Any, *,
                lhs_dilation: Optional[Sequence[int]] = None, rhs_dilation: Optional[Sequence[int]] = None,
                dimension_numbers: Any = None, feature_group_count: int = 1, precision: Any = None) -> Array:
    """`lax.conv_general_dilated` that is `conv_as_tap_matmuls` where it is not differentiated (a teacher's
    forward pass, an evaluation) and, where it is (training), one matmul of the `(k k C, O)` kernel with the
    input's k x k shifted copies side by side on the channel axis (im2col: `(B, H', W', k k C)`), whose gradients
    are two matmuls and the copies' cotangents added back in place. The same function, so the same values and
    gradients up to float rounding (the training and the inference forward pass round differently: in the last
    bits in float32, by a few roundings in bfloat16). Takes what `conv_as_tap_matmuls` takes.

    Why: on XLA:CPU, in training, its one matmul of depth k k C and two gradient matmuls beat both XLA's
    convolutions and the taps (each tap's product padded back to the map and summed) where the convolution keeps
    or widens its channels (the dlv3 student's 512-channel 3x3, forward + backward with its BatchNorm and ReLU:
    87 ms against 106 native and 116 'tap_forward'); where it narrows them (640 -> 128) its input-wide cotangent
    costs more than it saves (`results/train_speed/conv_cpu.md`). The copies are kept from the forward pass to
    the backward pass for the kernel's gradient: k k times the input of each such convolution, a CPU trade."""
    strides = tuple(window_strides)
    dilation = tuple(rhs_dilation or (1, 1))
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if (isinstance(padding, str) or tuple(lhs_dilation or (1, 1)) != (1, 1) or feature_group_count != 1
            or dn != lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))):
        # conv_as_tap_matmuls names what neither takes (the gradient path below would not trace it first).
        return conv_as_tap_matmuls(lhs, rhs, strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=dilation,
                                   dimension_numbers=dimension_numbers, feature_group_count=feature_group_count)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if min(min(p) for p in pads) < 0:  # a crop: the copies below pad with jnp.pad, which cannot cut
        raise ValueError(f"conv_im2col: padding must be non-negative, got {padding!r}")
    return _im2col(lhs, rhs, strides, pads, dilation, dn, feature_group_count, precision)


def _im2col_copies(lhs, kernel_shape, strides, pads, dilation):
    """`(B, H, W, C) -> (B, H', W', kh kw C)`: the input pixels each output pixel's taps read, tap by tap
    (NHWC/HWIO, no groups, padding >= 0). Linear in `lhs`."""
    b, h, w, c = lhs.shape
    kh, kw = kernel_shape[:2]
    (sh, sw), (dh, dw), ((pt, pb), (pl, pr)) = strides, dilation, pads
    ho, wo = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    return jnp.concatenate([lax.slice(x, (0, i * dh, j * dw, 0),
                                      (b, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
                            for i in range(kh) for j in range(kw)], axis=-1)


def _flat_kernel(rhs):
    # HWIO reshaped to (kh kw C, O) is ordered tap by tap, channels within: the copies' order.
    kh, kw, c, o = rhs.shape
    return rhs.reshape(kh * kw * c, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _im2col(lhs, rhs, strides, pads, dilation, dn, groups, precision):
    return conv_as_tap_matmuls(lhs, rhs, strides, pads, rhs_dilation=dilation, dimension_numbers=dn,
                               feature_group_count=groups, precision=precision)


def _im2col_fwd(lhs, rhs, strides, pads, dilation, dn, groups, precision):
    copies = _im2col_copies(lhs, rhs.shape, strides, pads, dilation)
    # The copies are kept for the kernel's gradient (XLA would merge copies made again with these anyway).
    return jnp.einsum("bhwk,ko->bhwo", copies, _flat_kernel(rhs), precision=precision), (lhs, copies, rhs)


def _im2col_bwd(strides, pads, dilation, dn, groups, precision, res, g):
    lhs, copies, rhs = res  # lhs for its shape only: its value is not read
    dw = jnp.einsum("bhwk,bhwo->ko", copies, g, precision=precision).reshape(rhs.shape)
    dcopies = jnp.einsum("bhwo,ko->bhwk", g, _flat_kernel(rhs), precision=precision).astype(copies.dtype)
    # Each copy's cotangent added back where it was read: the transpose of the copying.
    (dx,) = jax.linear_transpose(lambda x: _im2col_copies(x, rhs.shape, strides, pads, dilation), lhs)(dcopies)
    return dx.astype(lhs.dtype), dw.astype(rhs.dtype)


_im2col.defvjp(_im2col_fwd, _im2col_bwd)


def _space_to_batch(x: Array, d: int) -> Array:
    """`(B, h d, w d, C) -> (B d d, h, w, C)`: sub-image (r, s) holds rows r, r + d, ... and columns s, s + d, ..."""
    b, hd, wd, c = x.shape
    return x.reshape(b, hd // d, d, wd // d, d, c).transpose(0, 2, 4, 1, 3, 5).reshape(b * d * d, hd // d, wd // d, c)


def dilated_conv_batched_wgrad(lhs: Array, rhs: Array, window_strides: Sequence[int], padding: Any, *,
                               lhs_dilation: Sequence[int], rhs_dilation: Sequence[int], dimension_numbers: Any,
                               feature_group_count: int = 1, precision: Any = None) -> Array:
    """`lax.conv_general_dilated` for a stride-1 dilated NHWC/HWIO convolution whose forward pass and input
    gradient are XLA's dilated convolution ('native') and whose weight gradient is computed over the d x d
    interleaved sub-images of the padded input and of the output's cotangent (as `dilated_as_batched` does for
    the whole convolution): the slow cuDNN kernels are the weight gradient's only, so only it is rewritten and
    only two arrays are rearranged per convolution (four for 'batched'), none in a forward-only pass (teachers).
    Same products and sums as the native weight gradient, so the same result up to float rounding.

    Signature of `lax.conv_general_dilated` (flax `nn.Conv(conv_general_dilated=...)` passes its arguments so).
    """
    d = tuple(rhs_dilation)
    if (tuple(window_strides) != (1, 1) or tuple(lhs_dilation) != (1, 1) or d[0] != d[1]
            or isinstance(padding, str)):
        raise ValueError(f"dilated_conv_batched_wgrad: a stride-1 conv with equal dilations and explicit padding "
                         f"only; got strides {window_strides}, lhs_dilation {lhs_dilation}, rhs_dilation {d}, "
                         f"padding {padding!r}")
    pads = tuple(tuple(p) for p in padding)
    return _wgrad_conv(lhs, rhs, d[0], pads, feature_group_count, precision, dimension_numbers)


def _native(lhs, rhs, d, pads, groups, precision, dn):
    return _xla_conv(lhs, rhs, (1, 1), pads, (d, d), dn, groups, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _wgrad_conv(lhs, rhs, d, pads, groups, precision, dn):
    return _native(lhs, rhs, d, pads, groups, precision, dn)


def _wgrad_conv_fwd(lhs, rhs, d, pads, groups, precision, dn):
    return _native(lhs, rhs, d, pads, groups, precision, dn), (lhs, rhs)


def _wgrad_conv_bwd(d, pads, groups, precision, dn, res, g):
    lhs, rhs = res
    _, input_vjp = jax.vjp(lambda x: _native(x, rhs, d, pads, groups, precision, dn), lhs)
    (dx,) = input_vjp(g)
    (pt, pb), (pl, pr) = pads
    b, h, w, _ = lhs.shape
    hp, wp = -(-(h + pt + pb) // d) * d, -(-(w + pl + pr) // d) * d
    x = _space_to_batch(jnp.pad(lhs, ((0, 0), (pt, hp - h - pt), (pl, wp - w - pl), (0, 0))), d)
    k = rhs.shape[0]
    yh, yw = hp // d - (k - 1), wp // d - (k - 1)
    # The cotangent of the cut-off outputs is zero: pad it back to the sub-images' full grid.
    g = _space_to_batch(jnp.pad(g, ((0, 0), (0, yh * d - g.shape[1]), (0, yw * d - g.shape[2]), (0, 0))), d)
    _, kernel_vjp = jax.vjp(lambda r: lax.conv_general_dilated(x, r, (1, 1), "VALID", dimension_numbers=dn,
                                                               feature_group_count=groups, precision=precision), rhs)
    (dw,) = kernel_vjp(g)
    return dx, dw


_wgrad_conv.defvjp(_wgrad_conv_fwd, _wgrad_conv_bwd)


NORMS = ("bn", "gn")
ACTIVATIONS = ("relu", "relu6")


def _choice(value: Union[bool, str, None], default: str, known: tuple[str, ...], what: str) -> Optional[str]:
    if value is True:
        return default
    if value is False or value is None:
        return None
    if value not in known:
        raise ValueError(f"ConvModule: {what} must be True, False or one of {', '.join(known)}; got {value!r}")
    return value


class ConvModule(nn.Module):
    """mmcv's `ConvModule`: conv, then (optionally) a norm layer and an activation.

    `(B, H, W, C) -> (B, H / stride, W / stride, features)`. Submodules are named
    as mmcv's (`conv`, and `bn` or `gn` for the norm), so state-dict keys map one
    to one.

    Fields:
      norm: `True` / `'bn'` BatchNorm (PyTorch statistics), `'gn'` GroupNorm with
        `num_groups` groups (PyTorch's eps 1e-5; mmdet's heads use 32 groups),
        `False` none.
      act: `True` / `'relu'` ReLU, `'relu6'` ReLU6 (MobileNetV2), `False` none.
      use_bias: None is mmcv's `bias='auto'`: a bias only without a norm layer.
      groups: grouped / depthwise convolution (`groups == C`).
      frozen_stats: keep the BatchNorm on its running statistics even in
        training (mmcv's `norm_eval`). GroupNorm has no statistics.
    """

    features: int
    kernel_size: int = 1
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    norm: Union[bool, str] = True
    num_groups: int = 32
    act: Union[bool, str] = True
    use_bias: Optional[bool] = None
    frozen_stats: bool = False
    kernel_init: Initializer = kaiming_fan_out
    bias_init: Optional[Initializer] = None
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        _choice(self.act, "relu", ACTIVATIONS, "act")
        for field in ("features", "kernel_size", "stride", "dilation", "groups"):
            value = getattr(self, field)
            if not is_count(value, 1):  # else a shape error deep in XLA
                raise ValueError(f"ConvModule{f' {self.name!r}' if isinstance(self.name, str) else ''}: {field} "
                                 f"must be a positive integer, got {value!r}")
        if _choice(self.norm, "bn", NORMS, "norm") == "gn" and self.features % self.num_groups:
            raise ValueError(f"ConvModule: GroupNorm needs the {self.features} channels to split into "
                             f"num_groups={self.num_groups} equal groups")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        norm = _choice(self.norm, "bn", NORMS, "norm")
        act = _choice(self.act, "relu", ACTIVATIONS, "act")
        use_bias = norm is None if self.use_bias is None else self.use_bias
        x = conv2d(x, self.features, self.kernel_size, name="conv", stride=self.stride, dilation=self.dilation,
                   groups=self.groups, use_bias=use_bias, kernel_init=self.kernel_init, bias_init=self.bias_init,
                   dtype=self.dtype, param_dtype=self.param_dtype)
        if norm == "bn":
            x = batch_norm(x, "bn", train=train, frozen_stats=self.frozen_stats,
                           dtype=self.dtype, param_dtype=self.param_dtype)
        elif norm == "gn":
            x = group_norm(x, "gn", self.num_groups, dtype=self.dtype, param_dtype=self.param_dtype)
        if act == "relu":
            return nn.relu(x)
        return nn.relu6(x) if act == "relu6" else x


def group_norm(x: Array, name: str, num_groups: int, *, dtype: Optional[Dtype] = None,
               param_dtype: Dtype = jnp.float32) -> Array:
    """`nn.GroupNorm(num_groups, C)` (eps 1e-5, weight 1, bias 0) created under `name`, statistics per
    sample and group over (H, W, C / num_groups), two-pass variance in float32. Call from inside a compact method."""
    return nn.GroupNorm(num_groups=num_groups, epsilon=1e-5, use_fast_variance=False, dtype=dtype,
                        param_dtype=param_dtype, name=name)(x)


def batch_norm(
    x: Array, name: str, *, train: bool, frozen_stats: bool = False,
    dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
) -> Array:
    """`nn.BatchNorm2d` (PyTorch statistics) created under `name`; batch statistics
    only when `train` and not `frozen_stats`. Call from inside a compact method."""
    return BatchNorm(dtype=dtype, param_dtype=param_dtype, name=name)(
        x, use_running_average=not train or frozen_stats)
