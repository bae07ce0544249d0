"""Deformable convolution, v1 (`DeformConv2d`) and modulated v2 (`ModulatedDeformConv2d`), with mmcv's semantics.

A deformable convolution samples its input at the regular grid of a convolution moved by a learned offset per
output position and kernel tap, then applies the kernel to the samples. For output position `(i, j)` and tap
`(u, v)` of a `kh x kw` kernel the sampling point is

    y = i * stride - pad + u * dilation + dy[i, j, g, u, v]
    x = j * stride - pad + v * dilation + dx[i, j, g, u, v]

read by bilinear interpolation with zeros outside the map (a point with `y <= -1`, `y >= H`, `x <= -1` or
`x >= W` reads 0 and passes no gradient; a corner outside the map counts as 0), `g` the deformable group of
the channel (`deform_groups` groups of `C / deform_groups` channels share one offset field). v2 multiplies each
sample by a mask in [0, 1] before the kernel. Everything here is NHWC; the offset's channel layout is mmcv's
(`[y0, x0, y1, x1, ...]` per deformable group, taps row-major), so the `(B, Ho, Wo, 2 * dg * kh * kw)` offsets
are mmcv's `(B, 2 * dg * kh * kw, Ho, Wo)` transposed.

The computation is the im2col form written for XLA: the four bilinear corners of every sample are gathered from
the channel-last input as whole channel vectors (one gather each, `(B, Ho, Wo, dg, kh*kw, C/dg)`), weighted and
summed, then contracted with the kernel in one matmul over `kh*kw*C/groups` (a batched matmul per group).
Gradients come from JAX's autodiff of that expression; they equal mmcv's hand-written `col2im` / `col2im_coord`
kernels (held against PyTorch ports of mmcv's CPU kernels in `tests/test_deform_conv.py`).

Modules, with mmcv's parameter names and initialisation:
  `DeformConv2d` / `ModulatedDeformConv2d`: called with the input and the offsets (and mask);
  `DeformConv2dPack` (mmcv's `DCN`) / `ModulatedDeformConv2dPack` (`DCNv2`): predict their own offsets (and
  mask) with a zero-initialised convolution `conv_offset` of the same geometry, as a drop-in conv layer.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cankd_jax.layers import Conv1x1, Dtype, Initializer, rounded

Array = jax.Array


def _out_size(size: int, k: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - (dilation * (k - 1) + 1)) // stride + 1


def _check(x: Array, offset: Array, kernel: Array, mask: Optional[Array], *, stride: int, padding: int,
           dilation: int, groups: int, deform_groups: int) -> tuple[int, int]:
    """Shape checks with messages that name the problem; returns the output size (Ho, Wo)."""
    if x.ndim != 4:
        raise ValueError(f"deform_conv2d: input must be (B, H, W, C), got shape {x.shape}")
    if kernel.ndim != 4:
        raise ValueError(f"deform_conv2d: kernel must be (kh, kw, C / groups, O), got shape {kernel.shape}")
    b, h, w, c = x.shape
    kh, kw, cin_g, out = kernel.shape
    if min(stride, dilation, groups, deform_groups) < 1 or padding < 0:
        raise ValueError(f"deform_conv2d: stride, dilation, groups, deform_groups must be >= 1 and padding >= 0, "
                         f"got {stride}, {dilation}, {groups}, {deform_groups}, {padding}")
    if c != cin_g * groups or out % groups:
        raise ValueError(f"deform_conv2d: the kernel {kernel.shape} with groups={groups} needs C = {cin_g * groups} "
                         f"input channels and O divisible by {groups}; the input has C = {c}")
    if c % deform_groups:
        raise ValueError(f"deform_conv2d: C = {c} input channels do not split into deform_groups={deform_groups}")
    ho, wo = _out_size(h, kh, stride, padding, dilation), _out_size(w, kw, stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(f"deform_conv2d: the input {h}x{w} is too small for a {kh}x{kw} kernel with padding "
                         f"{padding} and dilation {dilation}")
    taps = deform_groups * kh * kw
    if offset.shape != (b, ho, wo, 2 * taps):
        raise ValueError(f"deform_conv2d: offset must be (B, Ho, Wo, 2 * deform_groups * kh * kw) = "
                         f"{(b, ho, wo, 2 * taps)}, got {offset.shape}")
    if mask is not None and mask.shape != (b, ho, wo, taps):
        raise ValueError(f"deform_conv2d: mask must be (B, Ho, Wo, deform_groups * kh * kw) = {(b, ho, wo, taps)}, "
                         f"got {mask.shape}")
    return ho, wo


def _bilinear_columns(x: Array, y: Array, xs: Array, deform_groups: int) -> Array:
    """Bilinear samples of `x` `(B, H, W, C)` at `(y, xs)` `(B, Ho, Wo, dg, K)` -> `(B, Ho, Wo, dg, K, C / dg)` float32.

    mmcv's `deformable_im2col_bilinear`: zero for a point outside (-1, H) x (-1, W), corners outside the map
    read 0; the corner weights and their order are mmcv's (so the sum rounds as mmcv's does).
    """
    b, h, w, c = x.shape
    dg = deform_groups
    cg = c // dg
    # One row per (image, deformable group, pixel): a sample's corner is one row, a contiguous channel vector.
    table = x.reshape(b, h * w, dg, cg).transpose(0, 2, 1, 3).reshape(b * dg * h * w, cg)
    base = ((jnp.arange(b)[:, None] * dg + jnp.arange(dg)[None, :]) * (h * w)).reshape(b, 1, 1, dg, 1)
    inside = (y > -1) & (y < h) & (xs > -1) & (xs < w)
    y0, x0 = jnp.floor(y), jnp.floor(xs)
    ly, lx = y - y0, xs - x0
    y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
    out = None
    for dy, wy in ((0, 1 - ly), (1, ly)):
        for dx, wx in ((0, 1 - lx), (1, lx)):
            yi, xi = y0 + dy, x0 + dx
            valid = inside & (yi >= 0) & (yi <= h - 1) & (xi >= 0) & (xi <= w - 1)
            rows = base + jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)
            term = jnp.where(valid, wy * wx, 0.0)[..., None] * table[rows].astype(jnp.float32)
            out = term if out is None else out + term
    return out


def deform_conv2d(x: Array, offset: Array, kernel: Array, mask: Optional[Array] = None, *, stride: int = 1,
                  padding: int = 0, dilation: int = 1, groups: int = 1, deform_groups: int = 1,
                  dtype: Optional[Dtype] = None) -> Array:
    """mmcv's `deform_conv2d` (mask None) and `modulated_deform_conv2d` (without bias) on NHWC arrays.

    Args:
      x: `(B, H, W, C)`.
      offset: `(B, Ho, Wo, 2 * deform_groups * kh * kw)`, in pixels, mmcv's channel order.
      kernel: `(kh, kw, C / groups, O)` (Flax's layout of PyTorch's `(O, C / groups, kh, kw)`).
      mask: `(B, Ho, Wo, deform_groups * kh * kw)` modulation (v2), or None (v1).
      stride, padding, dilation: the same in both directions, as the networks here use them.
      dtype: the dtype of the sampled columns and the matmul (default: `x`'s); the sampling weights and the
        sum of the four corners are float32.
    Returns `(B, Ho, Wo, O)` with `Ho = (H + 2 * padding - dilation * (kh - 1) - 1) // stride + 1`.
    """
    ho, wo = _check(x, offset, kernel, mask, stride=stride, padding=padding, dilation=dilation, groups=groups,
                    deform_groups=deform_groups)
    b, _, _, c = x.shape
    kh, kw, cin_g, out = kernel.shape
    k = kh * kw
    dg = deform_groups
    dtype = dtype or x.dtype
    # `rounded`: a caller's product fused into the sums below would move the floors (layers.rounded)
    off = rounded(offset.astype(jnp.float32)).reshape(b, ho, wo, dg, k, 2)
    # The undeformed grid per (output row, tap) and (output column, tap); taps row-major as mmcv's.
    grid_y = (jnp.arange(ho)[:, None] * stride - padding + jnp.repeat(jnp.arange(kh) * dilation, kw)[None, :])
    grid_x = (jnp.arange(wo)[:, None] * stride - padding + jnp.tile(jnp.arange(kw) * dilation, kh)[None, :])
    y = grid_y[None, :, None, None, :].astype(jnp.float32) + off[..., 0]
    xs = grid_x[None, None, :, None, :].astype(jnp.float32) + off[..., 1]
    cols = _bilinear_columns(x, y, xs, dg)  # (B, Ho, Wo, dg, K, C/dg)
    if mask is not None:
        cols = cols * mask.astype(jnp.float32).reshape(b, ho, wo, dg, k, 1)
    cols = cols.astype(dtype)
    kernel = kernel.astype(dtype).reshape(k, cin_g, out)
    if groups == 1:
        # The deformable-group axis is part of the channel axis: contract (tap, group, channel) in one matmul.
        return jnp.einsum("bhwdkc,kdco->bhwo", cols, kernel.reshape(k, dg, c // dg, out))
    cols = cols.transpose(0, 1, 2, 4, 3, 5).reshape(b, ho, wo, k, groups, cin_g)
    kernel = kernel.reshape(k, cin_g, groups, out // groups)
    return jnp.einsum("bhwkgc,kcgo->bhwgo", cols, kernel).reshape(b, ho, wo, out)


def _uniform(bound: float) -> Initializer:
    def init(key: Array, shape, dtype=jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class DeformConv2d(nn.Module):
    """mmcv's `DeformConv2d` (v1): `(x (B, H, W, C), offset (B, Ho, Wo, 2*dg*k*k)) -> (B, Ho, Wo, features)`.

    Params: `kernel (k, k, C / groups, features)` (PyTorch's `weight`); no bias (mmcv's v1 has none).
    Init: mmcv's `kaiming_uniform_(nonlinearity='relu')`, bound `sqrt(6 / fan_in)`, fan_in = C/groups * k * k.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    deform_groups: int = 1
    dtype: Optional[Dtype] = None

    modulated = False

    def _kernel(self, c: int) -> Array:
        k = self.kernel_size
        if c % self.groups:
            raise ValueError(f"{type(self).__name__}: C = {c} input channels do not split into groups={self.groups}")
        fan_in = c // self.groups * k * k
        init = (_uniform(1.0 / math.sqrt(c * k * k)) if self.modulated  # mmcv's v2: 1/sqrt(C * k * k)
                else _uniform(math.sqrt(6.0 / fan_in)))
        return self.param("kernel", init, (k, k, c // self.groups, self.features), jnp.float32)

    def _conv(self, x: Array, offset: Array, mask: Optional[Array]) -> Array:
        out = deform_conv2d(x, offset, self._kernel(x.shape[-1]), mask, stride=self.stride, padding=self.padding,
                            dilation=self.dilation, groups=self.groups, deform_groups=self.deform_groups,
                            dtype=self.dtype)
        if getattr(self, "use_bias", False):
            out = out + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(out.dtype)
        return out

    @nn.compact
    def __call__(self, x: Array, offset: Array) -> Array:
        return self._conv(x, offset, None)


class ModulatedDeformConv2d(DeformConv2d):
    """mmcv's `ModulatedDeformConv2d` (v2): `(x, offset, mask (B, Ho, Wo, dg*k*k)) -> (B, Ho, Wo, features)`.

    Params: `kernel`, and `bias (features,)` (zero-initialised) when `use_bias` (mmcv's default True).
    """

    use_bias: bool = True
    modulated = True

    @nn.compact
    def __call__(self, x: Array, offset: Array, mask: Array) -> Array:  # type: ignore[override]
        return self._conv(x, offset, mask)


def _offset_conv(x: Array, features: int, module: DeformConv2d) -> Array:
    """The packs' `conv_offset`: a conv with the deformable conv's geometry and a bias, both zero-initialised."""
    zeros = nn.initializers.zeros
    k, pad = module.kernel_size, module.padding
    if k == 1 and pad == 0:
        xs = x[:, ::module.stride, ::module.stride]
        return Conv1x1(features, kernel_init=zeros, bias_init=zeros, dtype=module.dtype, name="conv_offset")(xs)
    return nn.Conv(features, (k, k), strides=module.stride, padding=((pad, pad), (pad, pad)),
                   kernel_dilation=module.dilation, kernel_init=zeros, bias_init=zeros, dtype=module.dtype,
                   name="conv_offset")(x)


class DeformConv2dPack(DeformConv2d):
    """mmcv's `DeformConv2dPack` (registered as `DCN`): `(B, H, W, C) -> (B, Ho, Wo, features)`.

    The offsets come from `conv_offset` (a `k x k` conv, `2 * deform_groups * k * k` outputs, with bias, both
    zero at init, so a fresh layer is a plain convolution). PyTorch keys: `weight`, `conv_offset.weight`,
    `conv_offset.bias`.
    """

    @nn.compact
    def __call__(self, x: Array) -> Array:  # type: ignore[override]
        k2 = self.deform_groups * self.kernel_size ** 2
        return self._conv(x, _offset_conv(x, 2 * k2, self), None)


class ModulatedDeformConv2dPack(ModulatedDeformConv2d):
    """mmcv's `ModulatedDeformConv2dPack` (`DCNv2`): `(B, H, W, C) -> (B, Ho, Wo, features)`.

    `conv_offset` predicts `3 * dg * k * k` channels split in thirds as mmcv's `torch.chunk`: the first two
    thirds, concatenated, are the offsets (in mmcv's interleaved layout), the last the mask before its sigmoid.
    """

    @nn.compact
    def __call__(self, x: Array) -> Array:  # type: ignore[override]
        k2 = self.deform_groups * self.kernel_size ** 2
        out = _offset_conv(x, 3 * k2, self)
        return self._conv(x, out[..., :2 * k2], jax.nn.sigmoid(out[..., 2 * k2:].astype(jnp.float32)))


# mmcv's registry names, for configs that say `dcn=dict(type='DCN')` or `'DCNv2'`.
DCN_LAYERS: dict[str, type[DeformConv2d]] = {"DCN": DeformConv2dPack, "DCNv2": ModulatedDeformConv2dPack}


def make_dcn(kind: str, **kwargs: Any) -> DeformConv2d:
    """A deformable conv layer by mmcv's registry name (`'DCN'`, `'DCNv2'`); kwargs are the module's fields."""
    if kind not in DCN_LAYERS:
        raise ValueError(f"unknown deformable conv type {kind!r}; known: {', '.join(DCN_LAYERS)}")
    return DCN_LAYERS[kind](**kwargs)

