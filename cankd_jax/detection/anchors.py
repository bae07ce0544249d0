"""Priors of the one-stage detectors: RetinaNet's anchors and FCOS's points (mmdet 3.x).

Priors depend only on the static feature-map sizes, so they are computed once in
NumPy float32 at trace time (with the same float32 operations, in the same order,
as mmdet's torch code, hence bit-identical) and enter a jitted function as constants.
Only the valid flags depend on each image's (traced) padded shape.

Layout of one level's priors, which the heads' outputs must follow:
location-major over the feature map in row-major order (y, then x), then the
base priors of that location. A head's `(B, H, W, A * K)` output reshaped to
`(B, H * W * A, K)` (`flatten_level_maps`) is exactly mmdet's
`permute(0, 2, 3, 1).reshape(B, -1, K)`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

RETINANET_STRIDES = (8, 16, 32, 64, 128)
FCOS_STRIDES = (8, 16, 32, 64, 128)
FCOS_INF = 1e8  # mmdet's FCOS INF: the open upper regress range and the "no gt" area
FCOS_REGRESS_RANGES = ((-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, FCOS_INF))


@dataclasses.dataclass(frozen=True)
class AnchorGenerator:
    """mmdet's `AnchorGenerator` as RetinaNet configures it (`scale_major=True`).

    Per level the base size is the stride; scales are `octave_base_scale * 2 ** (i / scales_per_octave)`
    (4, 5.04, 6.35); ratio = h / w with `h_ratio = sqrt(ratio)`, `w_ratio = 1 / h_ratio`;
    `w = stride * w_ratio * scale`, `h = stride * h_ratio * scale`. Base anchors are
    ordered ratio-major, scale-minor (index = ratio_index * num_scales + scale_index)
    and centred at `center_offset * stride` (0: the anchor of location (x, y) is centred
    on `(x * stride, y * stride)`, the top-left corner of its cell, as mmdet).
    """

    strides: tuple[int, ...] = RETINANET_STRIDES
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    octave_base_scale: float = 4.0
    scales_per_octave: int = 3
    center_offset: float = 0.0

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def num_base_anchors(self) -> int:
        return len(self.ratios) * self.scales_per_octave

    @property
    def scales(self) -> np.ndarray:
        # mmdet computes the octave scales in float64 and stores them as a float32 tensor.
        octave = np.array([2 ** (i / self.scales_per_octave) for i in range(self.scales_per_octave)])
        return (octave * self.octave_base_scale).astype(np.float32)

    def base_anchors(self, level: int) -> np.ndarray:
        """`(A, 4)` float32 anchors of one location at the origin, A = len(ratios) * scales_per_octave."""
        size = np.float32(self.strides[level])
        ratios = np.asarray(self.ratios, np.float32)
        h_ratios = np.sqrt(ratios)
        w_ratios = np.float32(1.0) / h_ratios
        scales = self.scales
        ws = (size * w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (size * h_ratios[:, None] * scales[None, :]).reshape(-1)
        cx = cy = np.float32(self.center_offset) * size
        half = np.float32(0.5)
        return np.stack([cx - half * ws, cy - half * hs, cx + half * ws, cy + half * hs], axis=-1)

    def level_anchors(self, featmap_size: tuple[int, int], level: int) -> np.ndarray:
        """`(H * W * A, 4)` float32 anchors of one level in pixels, location-major then base anchor."""
        h, w = featmap_size
        stride = self.strides[level]
        sx = np.arange(w, dtype=np.float32) * np.float32(stride)
        sy = np.arange(h, dtype=np.float32) * np.float32(stride)
        xx, yy = np.tile(sx, h), np.repeat(sy, w)  # row-major: y outer, x inner
        shifts = np.stack([xx, yy, xx, yy], axis=-1)
        return (self.base_anchors(level)[None, :, :] + shifts[:, None, :]).reshape(-1, 4)

    def grid_anchors(self, featmap_sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """One `(H_l * W_l * A, 4)` float32 array per level (NumPy: constants under jit)."""
        if len(featmap_sizes) != self.num_levels:
            raise ValueError(f"AnchorGenerator: {len(featmap_sizes)} feature-map sizes for {self.num_levels} strides")
        return [self.level_anchors(tuple(s), i) for i, s in enumerate(featmap_sizes)]

    def valid_flags(self, featmap_sizes: Sequence[tuple[int, int]], pad_shape) -> list[Array]:
        """Per level, `(H_l * W_l * A,)` bool: the anchor's location lies on the image's padded extent.

        mmdet's `valid_flags(featmap_sizes, img_meta['pad_shape'])`: locations with
        `x < min(ceil(pad_w / stride), W_l)` and `y < min(ceil(pad_h / stride), H_l)` are
        valid, every anchor of a location shares its flag. In mmdet 3.x `pad_shape` is
        the image's own resized shape rounded up to the preprocessor's `pad_size_divisor`
        (32), not the batch's padded shape, so in a batch padded to its largest image
        the smaller images' trailing locations are invalid. `pad_shape = (h, w)` may be
        a traced array (vmap over a batch's shapes). Invalid anchors take no part in
        the assignment (`assigners.max_iou_assign`'s `anchor_valid`).
        """
        pad = jnp.asarray(pad_shape, jnp.float32)
        chex.assert_shape(pad, (2,))
        flags = []
        for level, (fh, fw) in enumerate(featmap_sizes):
            stride = float(self.strides[level])
            valid_h = jnp.minimum(jnp.ceil(pad[0] / stride), fh)
            valid_w = jnp.minimum(jnp.ceil(pad[1] / stride), fw)
            rows = jnp.arange(fh, dtype=jnp.float32)[:, None] < valid_h
            cols = jnp.arange(fw, dtype=jnp.float32)[None, :] < valid_w
            ok = rows & cols
            flags.append(jnp.repeat(ok.reshape(-1), self.num_base_anchors))
        return flags


def grid_points(featmap_sizes: Sequence[tuple[int, int]], strides: Sequence[int] = FCOS_STRIDES,
                offset: float = 0.5) -> list[np.ndarray]:
    """FCOS's priors: per level `(H_l * W_l, 2)` float32 points (x, y) in pixels, row-major.

    mmdet 3.x `MlvlPointGenerator(strides)` with its default `offset=0.5`, which
    `AnchorFreeHead` (hence `FCOSHead`) uses: the point of location (x, y) is
    `((x + 0.5) * stride, (y + 0.5) * stride)`, the centre of its cell. (mmdet 2.x
    placed them at `x * stride + stride // 2`, the same for even strides.)
    """
    if len(featmap_sizes) != len(strides):
        raise ValueError(f"grid_points: {len(featmap_sizes)} feature-map sizes for {len(strides)} strides")
    out = []
    for (h, w), s in zip(featmap_sizes, strides):
        sx = (np.arange(w, dtype=np.float32) + np.float32(offset)) * np.float32(s)
        sy = (np.arange(h, dtype=np.float32) + np.float32(offset)) * np.float32(s)
        out.append(np.stack([np.tile(sx, h), np.repeat(sy, w)], axis=-1))
    return out


class FCOSPriors(NamedTuple):
    """Every FCOS point of one image, levels concatenated (P = sum of H_l * W_l).

    points `(P, 2)` pixels; strides `(P,)` the stride of each point's level;
    regress_ranges `(P, 2)` the (min, max) of the largest target distance a point of
    that level may regress; level_sizes the static `(H_l * W_l)` per level.
    """

    points: np.ndarray
    strides: np.ndarray
    regress_ranges: np.ndarray
    level_sizes: tuple[int, ...]


def fcos_priors(featmap_sizes: Sequence[tuple[int, int]], strides: Sequence[int] = FCOS_STRIDES,
                regress_ranges: Sequence[tuple[float, float]] = FCOS_REGRESS_RANGES) -> FCOSPriors:
    """Points, per-point strides and regress ranges of FCOS for the given feature-map sizes."""
    if not len(featmap_sizes) == len(strides) == len(regress_ranges):
        raise ValueError("fcos_priors: featmap_sizes, strides and regress_ranges need one entry per level")
    pts = grid_points(featmap_sizes, strides)
    sizes = tuple(int(p.shape[0]) for p in pts)
    st = np.concatenate([np.full((n,), s, np.float32) for n, s in zip(sizes, strides)])
    rr = np.concatenate([np.tile(np.asarray(r, np.float32)[None], (n, 1)) for n, r in zip(sizes, regress_ranges)])
    return FCOSPriors(np.concatenate(pts), st, rr, sizes)


def flatten_level_maps(maps: Sequence[Array], k: int) -> Array:
    """Per-level head outputs `(B, H_l, W_l, A * k)` -> `(B, sum_l H_l * W_l * A, k)`.

    Channel `a * k + j` of location (y, x) becomes row `(y * W + x) * A + a`, column j:
    the prior order above, and mmdet's reshape of its NCHW outputs.
    """
    flat = []
    for m in maps:
        chex.assert_rank(m, 4)
        if m.shape[-1] % k:
            raise ValueError(f"flatten_level_maps: {m.shape[-1]} channels is not a multiple of k={k}")
        flat.append(m.reshape(m.shape[0], -1, k))
    return jnp.concatenate(flat, axis=1)
