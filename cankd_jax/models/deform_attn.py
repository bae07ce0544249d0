"""Multi-scale deformable attention (Deformable DETR, DINO), as mmcv 2.x computes it on every backend but CUDA.

`ms_deform_attn` is mmcv's `multi_scale_deformable_attn_pytorch`: each query reads, for each head, level and
point, its value map bilinearly at a location given in `[0, 1]` map coordinates (`F.grid_sample` with
`align_corners=False` and zero padding: a corner outside the map contributes 0), and sums the samples with
its attention weights. `MultiScaleDeformableAttention` is mmcv's module of that name (batch-first), with its
submodule names, so `import_state_dict` reads an mmdet checkpoint's `*.self_attn.*` / `*.cross_attn.*` keys.

Why a gather and not `grid_sample`'s form: mmcv's function materialises every level's samples for every
point (`(B * heads, D, Q, L * P)`) and then weights them. Here each level is one gather of its four bilinear
corners for all points, `(B, Q, heads, 4P, D)`, contracted with its weights at once, so the largest temporary
is one level's corners; under `jax.checkpoint` that temporary is recomputed in the backward pass instead of
being kept (at DINO's 800x1333 encoder, 4 levels x 4 corners x 4 points x 256 channels x 22k queries would be
3 GB of float32 per image kept for the backward pass otherwise). The gather's gradient is a scatter-add into
the value map, which is what mmcv's CUDA kernel does too.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cankd_jax.layers import Dtype
from cankd_jax.models.conv import xavier_uniform

Array = jax.Array
SpatialShapes = Sequence[tuple[int, int]]


def _check_shapes(value: Array, spatial_shapes: SpatialShapes, sampling_locations: Array,
                  attention_weights: Array) -> None:
    """ValueErrors naming the argument whose shape does not fit the others."""
    if value.ndim != 4:
        raise ValueError(f"value must be (B, S, heads, D), got shape {value.shape}")
    b, s, heads, _ = value.shape
    levels = len(spatial_shapes)
    total = sum(int(h) * int(w) for h, w in spatial_shapes)
    if total != s:
        raise ValueError(f"value has {s} positions but spatial_shapes {tuple(map(tuple, spatial_shapes))} "
                         f"hold {total}")
    if sampling_locations.ndim != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations must be (B, Q, heads, levels, points, 2), got shape "
                         f"{sampling_locations.shape}")
    lb, q, lh, ll, p, _ = sampling_locations.shape
    if (lb, lh, ll) != (b, heads, levels):
        raise ValueError(f"sampling_locations {sampling_locations.shape} do not fit value {value.shape} "
                         f"(batch, heads) and {levels} levels")
    if attention_weights.shape != (b, q, heads, levels, p):
        raise ValueError(f"attention_weights must be {(b, q, heads, levels, p)} (B, Q, heads, levels, points), "
                         f"got {attention_weights.shape}")


def _sample_level(value: Array, hw: tuple[int, int], locations: Array, weights: Array) -> Array:
    """One level's term: `value (B, H*W, heads, D)`, `locations (B, Q, heads, P, 2)` (x, y in [0, 1]),
    `weights (B, Q, heads, P)` -> `(B, Q, heads, D)`, the bilinear samples summed with their weights."""
    h, w = hw
    b, _, heads, d = value.shape
    # grid_sample's CPU kernel: grid g = 2 * loc - 1, pixel = (g + 1) * (size / 2) - 0.5 (align_corners=False);
    # written the same way so float32 results round as mmcv's do.
    grid = 2 * locations - 1
    x = (grid[..., 0] + 1) * (w / 2) - 0.5
    y = (grid[..., 1] + 1) * (h / 2) - 0.5
    x0, y0 = jnp.floor(x), jnp.floor(y)
    fx, fy = x - x0, y - y0
    gx, gy = 1 - fx, 1 - fy
    corners = ((x0, y0, gx * gy), (x0 + 1, y0, fx * gy), (x0, y0 + 1, gx * fy), (x0 + 1, y0 + 1, fx * fy))
    xs = jnp.concatenate([c[0] for c in corners], axis=-1)  # (B, Q, heads, 4P)
    ys = jnp.concatenate([c[1] for c in corners], axis=-1)
    bilinear = jnp.concatenate([c[2] for c in corners], axis=-1)
    inside = (xs >= 0) & (xs <= w - 1) & (ys >= 0) & (ys <= h - 1)
    tiled = jnp.concatenate([weights] * 4, axis=-1)
    coeff = jnp.where(inside, bilinear * tiled, 0)
    pixel = jnp.clip(ys, 0, h - 1).astype(jnp.int32) * w + jnp.clip(xs, 0, w - 1).astype(jnp.int32)
    # Row of (batch, pixel, head) in the value map flattened to (B * H*W * heads, D).
    batch = jnp.arange(b, dtype=jnp.int32)[:, None, None, None]
    head = jnp.arange(heads, dtype=jnp.int32)[None, None, :, None]
    rows = (batch * (h * w) + pixel) * heads + head
    samples = value.reshape(b * h * w * heads, d)[rows]  # (B, Q, heads, 4P, D)
    acc = jnp.promote_types(samples.dtype, jnp.float32)  # bfloat16 samples sum in float32
    out = jnp.einsum("bqhk,bqhkd->bqhd", coeff.astype(samples.dtype), samples, preferred_element_type=acc)
    return out.astype(samples.dtype)


def ms_deform_attn(value: Array, spatial_shapes: SpatialShapes, sampling_locations: Array,
                   attention_weights: Array, *, remat: bool = True) -> Array:
    """Multi-scale deformable attention's sampling and weighting, mmcv's `multi_scale_deformable_attn_pytorch`.

    Args:
      value: `(B, S, heads, D)`, the levels' maps flattened row-major and concatenated, `S = sum(H_l * W_l)`.
      spatial_shapes: `((H_0, W_0), ...)`, the levels' sizes (static: they fix the program's shapes).
      sampling_locations: `(B, Q, heads, L, P, 2)`, (x, y) in `[0, 1]` of each level's map, (0, 0) the top-left
        corner of its top-left pixel, (1, 1) the bottom-right corner of its bottom-right one; outside the map
        reads zeros.
      attention_weights: `(B, Q, heads, L, P)`.
      remat: recompute each level's gathered corners in the backward pass instead of keeping them.

    Returns:
      `(B, Q, heads * D)`, heads major.
    """
    spatial_shapes = tuple((int(h), int(w)) for h, w in np.asarray(spatial_shapes).reshape(-1, 2))
    _check_shapes(value, spatial_shapes, sampling_locations, attention_weights)
    b, q, heads = sampling_locations.shape[:3]
    sample = jax.checkpoint(_sample_level, static_argnums=(1,)) if remat else _sample_level
    out = None
    start = 0
    for level, (h, w) in enumerate(spatial_shapes):
        term = sample(value[:, start:start + h * w], (h, w), sampling_locations[:, :, :, level],
                      attention_weights[:, :, :, level])
        out = term if out is None else out + term
        start += h * w
    return out.reshape(b, q, heads * value.shape[-1])


def _grid_bias_init(heads: int, levels: int, points: int):
    """mmcv's `sampling_offsets` bias: head i starts at the direction 2 pi i / heads, scaled so its larger
    coordinate is 1, point k at k + 1 times that (in the units `MultiScaleDeformableAttention` divides by)."""
    def init(key, shape, dtype=jnp.float32) -> Array:
        del key
        thetas = np.arange(heads, dtype=np.float32) * np.float32(2.0 * math.pi / heads)
        grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
        grid = grid / np.abs(grid).max(-1, keepdims=True)
        grid = np.tile(grid[:, None, None, :], (1, levels, points, 1))
        grid = grid * np.arange(1, points + 1, dtype=np.float32)[None, None, :, None]
        assert grid.size == shape[0], (grid.shape, shape)
        return jnp.asarray(grid.reshape(shape), dtype)
    return init


class MultiScaleDeformableAttention(nn.Module):
    """mmcv's `MultiScaleDeformableAttention` with `batch_first=True`, its init and its residual.

    `__call__(query (B, Q, C), value (B, S, C) | None, *, reference_points (B, Q, L, 2 | 4), spatial_shapes,
    identity=None, query_pos=None, key_padding_mask (B, S) bool = None)` -> `(B, Q, C)`: the attention's
    output projection plus `identity` (default: `query` before `query_pos` is added). `value=None` attends to
    the query itself (the encoder's self-attention). Reference points are (x, y) in `[0, 1]`, or boxes
    (cx, cy, w, h), per level; a padded value position (`key_padding_mask` True) reads as zero.
    """

    embed_dims: int = 256
    num_heads: int = 8
    num_levels: int = 4
    num_points: int = 4
    value_proj_ratio: float = 1.0
    dropout: float = 0.0
    remat: bool = True
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        if self.embed_dims % self.num_heads:
            raise ValueError(f"embed_dims must be divisible by num_heads, got {self.embed_dims} and {self.num_heads}")
        n = self.num_heads * self.num_levels * self.num_points
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.sampling_offsets = nn.Dense(
            n * 2, kernel_init=nn.initializers.zeros,
            bias_init=_grid_bias_init(self.num_heads, self.num_levels, self.num_points), **dense)
        self.attention_weights = nn.Dense(n, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                                          **dense)
        value_dims = int(self.embed_dims * self.value_proj_ratio)
        self.value_proj = nn.Dense(value_dims, kernel_init=xavier_uniform, bias_init=nn.initializers.zeros, **dense)
        self.output_proj = nn.Dense(self.embed_dims, kernel_init=xavier_uniform, bias_init=nn.initializers.zeros,
                                    **dense)
        self.drop = nn.Dropout(self.dropout)

    def __call__(self, query: Array, value: Optional[Array] = None, *, reference_points: Array,
                 spatial_shapes: SpatialShapes, identity: Optional[Array] = None,
                 query_pos: Optional[Array] = None, key_padding_mask: Optional[Array] = None,
                 deterministic: bool = True) -> Array:
        value = query if value is None else value
        identity = query if identity is None else identity
        if query_pos is not None:
            query = query + query_pos
        if query.ndim != 3 or query.shape[-1] != self.embed_dims:
            raise ValueError(f"query must be (B, Q, {self.embed_dims}), got shape {query.shape}")
        if value.ndim != 3 or value.shape[0] != query.shape[0] or value.shape[-1] != self.embed_dims:
            raise ValueError(f"value must be ({query.shape[0]}, S, {self.embed_dims}), got shape {value.shape}")
        if len(spatial_shapes) != self.num_levels:
            raise ValueError(f"spatial_shapes has {len(spatial_shapes)} levels, the module {self.num_levels}")
        b, q, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        if reference_points.shape[:3] != (b, q, levels) or reference_points.shape[-1] not in (2, 4):
            raise ValueError(f"reference_points must be ({b}, {q}, {levels}, 2 or 4), got shape "
                             f"{reference_points.shape}")
        v = self.value_proj(value)
        if key_padding_mask is not None:
            v = jnp.where(key_padding_mask[..., None], 0, v)
        v = v.reshape(b, v.shape[1], heads, -1)
        # Where to sample is computed in float32 whatever the compute dtype: a bfloat16 location on a 167-pixel-wide
        # map is only good to about a pixel.
        offsets = self.sampling_offsets(query).astype(jnp.float32).reshape(b, q, heads, levels, points, 2)
        logits = self.attention_weights(query).astype(jnp.float32).reshape(b, q, heads, levels * points)
        weights = jax.nn.softmax(logits, axis=-1).reshape(b, q, heads, levels, points)
        ref = reference_points.astype(jnp.float32)[:, :, None, :, None, :]
        if reference_points.shape[-1] == 2:
            # (W, H) of each level, as mmcv's offset_normalizer
            normalizer = jnp.asarray([[w, h] for h, w in spatial_shapes], offsets.dtype)
            locations = ref + offsets / normalizer[None, None, None, :, None, :]
        else:
            locations = ref[..., :2] + offsets / points * ref[..., 2:] * 0.5
        out = ms_deform_attn(v, spatial_shapes, locations, weights, remat=self.remat)
        out = self.output_proj(out)
        return self.drop(out, deterministic=deterministic) + identity
