"""RoIAlign over a feature pyramid with mmcv 2.1's semantics (`mmcv.ops.RoIAlign`, average pooling) and
mmdetection 3.x's `SingleRoIExtractor` level mapping, on static shapes.

mmcv's kernel, per RoI `(b, x1, y1, x2, y2)` (input pixels) and level of stride `s`: the RoI in level pixels
starts at `x1 / s - 0.5` (`aligned=True`; no shift and a 1-pixel minimum size otherwise) and is cut into
`P x P` bins (`P = output_size`); each bin averages `gh x gw` bilinear samples on a regular grid, with
`gh = ceil(roi_h / P)` (`sampling_ratio=0`: adaptive) or `sampling_ratio`; a sample more than one pixel outside
the map reads zero, one within a pixel of it is clamped to the border. The average divides by `max(gh gw, 1)`.

Static shapes: the adaptive grid depends on the RoI, so every RoI here evaluates a fixed number `max_samples`
of grid points per bin, of which its own `gh gw` count (the rest weigh zero). The bound comes from the level
mapping: a RoI of area `A` goes to the level where `sqrt(A) / s` is below `2 finest_scale / s_0`, and a RoI
is no longer than the padded input, so `gh gw` is bounded per level (`max_grid_samples`). A RoI that breaks the
bound (longer than the input, or put on a level by hand) gets NaN features, never a silently truncated
average. The samples of all levels are read from one flattened pyramid by a gather, a chunk of RoIs at a time
(`lax.map`), so neither a (RoIs x H x W) tensor nor a per-level pass over every RoI is built; the gradient
with respect to the features is the gather's transpose, a scatter-add of the same weights mmcv's backward
kernel uses.

Most RoIs need far fewer grid points than the bound (at 800x1344 the bound is 48; `benchmarks/roi_align_speed.py`'s
proposal-like RoIs, log-uniform 8-1000 px, need 7.7 on average), so the RoIs are sorted by their own `gh gw` and
each chunk evaluates the smallest of a few static sizes (powers of two up to the bound) that covers its largest
RoI (`lax.switch`: one branch runs per chunk), then the results go back to the RoIs' order. The forward and
backward work follows the RoIs' grids, not the bound; what the backward pass keeps does not: differentiated,
a `lax.switch` keeps the union of its branches' residuals (the sample indices and weights of every tier), about
2.5x the static form's (0.24 against 0.09 GB for 1024 RoIs at 800x1344 with 256 channels), small beside the
step's activations.

RoIs come as `(R, 5)` rows of any image, or per image as `(B, M, 5)`, which the detection task passes: then each
image's RoIs read only that image's maps (a gather batched over the images), so a data-parallel step keeps every
image on its own device; the rows form reads one pyramid flattened over the batch, which a partitioned program
can only serve by gathering all devices' maps (`python -m cankd_jax.rehearse` measured 12 GB per device per step
for Faster R-CNN on 64 devices before the task switched).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from cankd_jax.layers import rounded

Array = jax.Array

FINEST_SCALE = 56  # mmdet's SingleRoIExtractor default
LEVEL_EPS = 1e-6  # map_roi_levels: floor(log2(scale / finest_scale + 1e-6))


def map_roi_levels(rois: Array, num_levels: int, finest_scale: float = FINEST_SCALE) -> Array:
    """mmdet's `SingleRoIExtractor.map_roi_levels`: the level of each RoI by its scale `sqrt(w h)`.

    `rois (..., 5)` as `(batch index, x1, y1, x2, y2)` or `(..., 4)` boxes -> int32 `(...)` in
    `[0, num_levels)`: `floor(log2(scale / finest_scale + 1e-6))` clamped (scale < 112 -> 0, < 224 -> 1, ...).
    """
    boxes = rois[..., -4:].astype(jnp.float32)
    scale = jnp.sqrt((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]))
    level = jnp.floor(jnp.log2(scale / finest_scale + LEVEL_EPS))
    return jnp.clip(level, 0, num_levels - 1).astype(jnp.int32)


def max_grid_samples(level_shapes: Sequence[tuple[int, int]], strides: Sequence[int], output_size: int = 7,
                     sampling_ratio: int = 0, finest_scale: float = FINEST_SCALE) -> int:
    """The most grid points `gh gw` a bin of any RoI can have under the level mapping of `map_roi_levels`, for
    RoIs no longer or wider than the padded input (`level_shapes[l] * strides[l]`, the largest over levels).

    Per level `l`, a RoI's level-pixel extents `(h, w)` satisfy `h w < (2^(l+1) finest_scale / s_l)^2` (not on
    the last level) and `h, w <= input / s_l`; `gh = ceil(h / P)`. The bound takes, for each `gh`, the widest
    RoI that area allows (with a 1e-4 relative margin for the mapping's float rounding).
    """
    if sampling_ratio > 0:
        return sampling_ratio * sampling_ratio
    if len(level_shapes) != len(strides):
        raise ValueError(f"max_grid_samples: {len(level_shapes)} level shapes for {len(strides)} strides")
    in_h = max(h * s for (h, _), s in zip(level_shapes, strides))
    in_w = max(w * s for (_, w), s in zip(level_shapes, strides))
    best = 1
    for level, s in enumerate(strides):
        max_h, max_w = in_h / s, in_w / s
        last = level == len(strides) - 1
        area = math.inf if last else (2 ** (level + 1) * finest_scale / s) ** 2 * (1 + 1e-4)
        for gh in range(1, math.ceil(max_h / output_size) + 1):
            min_h = output_size * (gh - 1)  # gh = ceil(h / P) needs h > P (gh - 1)
            w = max_w if min_h == 0 else min(max_w, area / min_h)
            gw = max(1, math.ceil(w / output_size))
            best = max(best, gh * gw)
    return best


def _divide(a: Array, divisor: int) -> Array:
    """`a / divisor` correctly rounded, as the kernel's float division. XLA rewrites a division by a constant as
    a multiplication by its rounded reciprocal, which is off by an ulp for a third of float32 inputs and turns
    `ceil(14 / 7)` into 3: the barrier keeps the divisor from being a constant."""
    return a / jax.lax.optimization_barrier(jnp.full(a.shape, divisor, a.dtype))


def _axis_samples(start: Array, bin_size: Array, grid: Array, extent: Array, output_size: int, sample: Array):
    """Per-axis bilinear taps of every (bin, grid point) along one axis, as mmcv's pre-calculation.

    `start, bin_size, grid, extent`: `(R,)` RoI start (level pixels), bin size, grid points per bin, map size.
    `sample`: `(R, K)` int, the grid index along this axis of each of the K flattened samples of a bin.
    -> `low, high (R, P, K)` int32 pixel indices and `w_low, w_high (R, P, K)` weights (zero outside).
    """
    dtype = start.dtype
    p = jnp.arange(output_size, dtype=dtype)
    # mmcv: start + p * bin + (i + .5) * bin / grid, evaluated left to right in float32; the product `rounded`
    # so that the indices and the weights below, which XLA may compute in different fusions, floor alike.
    pos = ((start[:, None, None] + rounded(p[None, :, None] * bin_size[:, None, None]))
           + (sample[:, None, :].astype(dtype) + 0.5) * bin_size[:, None, None]
           / grid[:, None, None].astype(dtype))
    ext = extent[:, None, None]
    inside = (pos >= -1.0) & (pos <= ext.astype(dtype))
    pos = jnp.maximum(pos, 0.0)
    low = pos.astype(jnp.int32)
    at_edge = low >= ext - 1
    low = jnp.where(at_edge, ext - 1, low)
    high = jnp.where(at_edge, ext - 1, low + 1)
    pos = jnp.where(at_edge, low.astype(dtype), pos)
    frac = pos - low.astype(dtype)
    w_high = jnp.where(inside, frac, 0.0)
    w_low = jnp.where(inside, 1.0 - frac, 0.0)
    return low, high, w_low, w_high


def roi_align(
    features: Sequence[Array],
    rois: Array,
    levels: Array,
    strides: Sequence[int],
    *,
    output_size: int = 7,
    sampling_ratio: int = 0,
    aligned: bool = True,
    max_samples: Optional[int] = None,
    chunk: int = 64,
    tiered: bool = True,
) -> Array:
    """mmcv's `RoIAlign(output_size, 1 / strides[level], sampling_ratio, 'avg', aligned)` of each RoI on its level.

    Args:
      features: per level `(B, H_l, W_l, C)`, all with the same `C` and dtype.
      rois: `(R, 5)` float `(batch index, x1, y1, x2, y2)` in input pixels; or `(B, M, 5)`, image b's RoIs in row
        b (its column 0 is not read: the row is the image). The per-image form gathers each image's RoIs from its
        own maps only, so with the batch split over devices (data parallelism) every device reads its own images
        and nothing is communicated; the `(R, 5)` form reads any image's maps, which a partitioned program can
        only do by gathering every device's maps to every device.
      levels: `(R,)` (or `(B, M)`) int, each RoI's level (`map_roi_levels`).
      strides: per level, its stride in input pixels (spatial scale `1 / stride`).
      max_samples: grid points evaluated per bin (None: `max_grid_samples` of these shapes); a RoI needing more
        gets NaN.
      chunk: RoIs (of each image, in the per-image form) gathered at once (memory: `chunk * P^2 * max_samples *
        4 * C` values per image).
      tiered: sort the RoIs by grid size and give each chunk the smallest static grid that covers it (see the
        module docstring); False evaluates `max_samples` points for every RoI. The same numbers either way.

    Returns `(R, P, P, C)` (or `(B, M, P, P, C)`) in the features' dtype (mmcv: `(R, C, P, P)`), computed in
    float32 (float64 for float64 features, as mmcv's kernel for doubles).
    """
    if len(features) != len(strides):
        raise ValueError(f"roi_align: {len(features)} feature levels but {len(strides)} strides")
    chex.assert_rank(list(features), 4)
    chex.assert_equal_shape_prefix(list(features), 1)
    batch = features[0].shape[0]
    per_image = rois.ndim == 3
    chex.assert_shape(rois, (batch, None, 5) if per_image else (None, 5))
    chex.assert_shape(levels, rois.shape[:-1])
    channels = {f.shape[-1] for f in features}
    if len(channels) != 1:
        raise ValueError(f"roi_align: the levels have different channel counts {sorted(channels)}")
    (c,) = channels
    dtype = features[0].dtype
    shapes = [f.shape[1:3] for f in features]
    if max_samples is None:
        max_samples = max_grid_samples(shapes, strides, output_size, sampling_ratio)
    # Each image's pyramid flattened, level after level: (B, S, C); a sample of image i, level l, pixel (y, x)
    # is row base_l + y W_l + x of image i.
    sizes = [h * w for h, w in shapes]
    flat = jnp.concatenate([f.reshape(batch, h * w, c) for f, (h, w) in zip(features, shapes)], axis=1).astype(dtype)
    base = jnp.asarray(np.concatenate([[0], np.cumsum(sizes)[:-1]]), jnp.int32)
    heights = jnp.asarray([h for h, _ in shapes], jnp.int32)
    widths = jnp.asarray([w for _, w in shapes], jnp.int32)
    scales = jnp.asarray([1.0 / s for s in strides], jnp.float32)  # mmcv takes the spatial scale as a float

    acc = jnp.promote_types(dtype, jnp.float32)  # the kernel's T: float32, or float64 for float64 features
    levels = levels.astype(jnp.int32)
    if per_image:  # groups = images
        image = jnp.zeros(rois.shape[:2], jnp.int32)
    else:  # one group: every image's pyramid, one after the other
        flat, rois, levels = flat.reshape(1, batch * sum(sizes), c), rois[None], levels[None]
        image = rois[..., 0].astype(jnp.int32)
    image = image * sum(sizes)  # the row of the image's first sample in its group
    geometry = (base, heights, widths, scales, output_size, sampling_ratio, aligned)
    tiers = _tiers(max_samples) if tiered else (max_samples,)
    g, r = rois.shape[:2]
    if r == 0:
        out = jnp.zeros((g, 0, output_size, output_size, c), dtype)
        return out if per_image else out[0]
    pad = -r % chunk if r > chunk else 0
    n = (r + pad) // chunk if r > chunk else 1
    size = chunk if r > chunk else r
    order = None
    # Each chunk's branch: the smallest tier covering its largest grid over every group (tier 0 with one tier).
    branch = jnp.zeros((n,), jnp.int32)
    if len(tiers) > 1:
        need = _grid(rois.astype(acc).reshape(-1, 5), levels.reshape(-1), scales, output_size, sampling_ratio,
                     aligned)[2].reshape(g, r)
        order = jnp.argsort(need, axis=1, stable=True)
        rois = jnp.take_along_axis(rois, order[..., None], axis=1)
        levels, image, need = (jnp.take_along_axis(a, order, axis=1) for a in (levels, image, need))
        chunk_need = jnp.max(jnp.pad(need, ((0, 0), (0, pad))).reshape(g, n, size), axis=(0, 2))
        branch = jnp.searchsorted(jnp.asarray(tiers[:-1]), chunk_need).astype(jnp.int32)

    def tier(k):
        one = lambda fl, ro, lv, im: _align(fl, ro.astype(acc), lv, im, *geometry, k)  # noqa: E731
        return lambda ro, lv, im: jax.vmap(one)(flat, ro, lv, im)  # a gather with the group as its batch axis

    branches = [tier(k) for k in tiers]

    def one_chunk(args):
        roi, level, im, b = args
        return branches[0](roi, level, im) if len(branches) == 1 else jax.lax.switch(b, branches, roi, level, im)

    def chunks(a):  # (g, r, ...) -> (n, g, size, ...)
        a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
        return jnp.swapaxes(a.reshape(g, n, size, *a.shape[2:]), 0, 1)

    out = jax.lax.map(one_chunk, (chunks(rois), chunks(levels), chunks(image), branch))  # (n, g, size, P, P, C)
    out = jnp.swapaxes(out, 0, 1).reshape(g, n * size, output_size, output_size, c)[:, :r]
    if order is not None:
        out = jnp.take_along_axis(out, jnp.argsort(order, axis=1)[:, :, None, None, None], axis=1)
    out = out.astype(dtype)
    return out if per_image else out[0]


def _tiers(max_samples: int) -> tuple[int, ...]:
    """The static grid sizes a chunk may take: 1, 2, 4, ... below `max_samples`, then `max_samples`."""
    return tuple(2 ** i for i in range(max(0, math.ceil(math.log2(max_samples))))) + (max_samples,)


def _grid(rois, level, scales, output_size, sampling_ratio, aligned):
    """Per RoI `(R, 5)` on its level: `(bin_h, bin_w, gh gw, gh, gw)`, mmcv's bin sizes and adaptive grid."""
    scale = scales[level].astype(rois.dtype)
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, i] * scale - offset for i in range(1, 5))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
    bin_h, bin_w = _divide(roi_h, output_size), _divide(roi_w, output_size)
    if sampling_ratio > 0:
        gh = gw = jnp.full(rois.shape[:1], sampling_ratio, jnp.int32)
    else:
        gh, gw = jnp.ceil(bin_h).astype(jnp.int32), jnp.ceil(bin_w).astype(jnp.int32)
    return bin_h, bin_w, gh * gw, gh, gw


def _align(flat, rois, level, image, base, heights, widths, scales, output_size, sampling_ratio, aligned,
           max_samples):
    """`roi_align` of `(R, 5)` RoIs from `flat (N, C)`, whose image starts at row `image (R,)`: `(R, P, P, C)` in
    the RoIs' dtype (float32, or float64)."""
    p, k = output_size, max_samples
    acc = rois.dtype
    h, w, scale = heights[level], widths[level], scales[level].astype(acc)
    offset = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * scale - offset, rois[:, 2] * scale - offset
    bin_h, bin_w, n, gh, gw = _grid(rois, level, scales, output_size, sampling_ratio, aligned)
    count = jnp.maximum(n, 1).astype(acc)
    kk = jnp.arange(k, dtype=jnp.int32)[None, :]
    gw_safe = jnp.maximum(gw, 1)[:, None]
    iy, ix = kk // gw_safe, kk % gw_safe  # (R, K): sample k of a bin is grid point (iy, ix)
    used = kk < n[:, None]
    y_lo, y_hi, wy_lo, wy_hi = _axis_samples(y1, bin_h, jnp.maximum(gh, 1), h, p, iy)
    x_lo, x_hi, wx_lo, wx_hi = _axis_samples(x1, bin_w, jnp.maximum(gw, 1), w, p, ix)
    used = used[:, None, None, :]  # (R, 1, 1, K) over (R, ph, pw, K)
    start = (image + base[level])[:, None, None, None]
    row = w[:, None, None, None]

    def tap(ys, xs, wy, wx):
        index = start + ys[:, :, None, :] * row + xs[:, None, :, :]
        weight = jnp.where(used, wy[:, :, None, :] * wx[:, None, :, :], 0.0)
        return jnp.take(flat, index, axis=0).astype(acc), weight

    total = 0.0
    for ys, wy in ((y_lo, wy_lo), (y_hi, wy_hi)):
        for xs, wx in ((x_lo, wx_lo), (x_hi, wx_hi)):
            values, weight = tap(ys, xs, wy, wx)
            total = total + jnp.einsum("rijk,rijkc->rijc", weight, values)
    out = total / count[:, None, None, None]
    broken = n > k
    return jnp.where(broken[:, None, None, None], jnp.nan, out)


def batch_rois(boxes: Array) -> Array:
    """mmdet's `bbox2roi` on static shapes: `(B, M, 4)` boxes -> `(B * M, 5)` RoIs `(image index, x1, y1, x2, y2)`."""
    b, m, _ = boxes.shape
    index = jnp.broadcast_to(jnp.arange(b, dtype=boxes.dtype)[:, None, None], (b, m, 1))
    return jnp.concatenate([index, boxes], -1).reshape(b * m, 5)


def extract_roi_features(features: Sequence[Array], rois: Array, strides: Sequence[int], *,
                         output_size: int = 7, sampling_ratio: int = 0, finest_scale: float = FINEST_SCALE,
                         max_samples: Optional[int] = None, chunk: int = 64, tiered: bool = True) -> Array:
    """mmdet's `SingleRoIExtractor` with `RoIAlign(output_size, sampling_ratio=0, aligned=True)`: each RoI's
    features from the level `map_roi_levels` gives it. `features`: per level `(B, H_l, W_l, C)` (the first
    `len(strides)` levels of the neck); `rois (R, 5)` -> `(R, P, P, C)`, or per image `(B, M, 5)` ->
    `(B, M, P, P, C)` (see `roi_align`: what a data-parallel step should pass)."""
    levels = map_roi_levels(rois, len(strides), finest_scale)
    if max_samples is None and sampling_ratio == 0:
        max_samples = max_grid_samples([f.shape[1:3] for f in features[:len(strides)]], strides, output_size,
                                       0, finest_scale)
    return roi_align(features[:len(strides)], rois, levels, strides, output_size=output_size,
                     sampling_ratio=sampling_ratio, max_samples=max_samples, chunk=chunk, tiered=tiered)
