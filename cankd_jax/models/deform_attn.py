"""Multi-scale deformable attention (Deformable DETR, DINO), as mmcv 2.x computes it on every backend but CUDA.

`ms_deform_attn` is mmcv's `multi_scale_deformable_attn_pytorch`: each query reads, for each head, level and
point, its value map bilinearly at a location given in `[0, 1]` map coordinates (`F.grid_sample` with
`align_corners=False` and zero padding: a corner outside the map contributes 0), and sums the samples with
its attention weights. `MultiScaleDeformableAttention` is mmcv's module of that name (batch-first), with its
submodule names, so `import_state_dict` reads an mmdet checkpoint's `*.self_attn.*` / `*.cross_attn.*` keys.

Why a gather and not `grid_sample`'s form: mmcv's function materialises every level's samples for every
point (`(B * heads, D, Q, L * P)`) and then weights them. Here each level is one gather of its four bilinear
corners for all points, `(B, Q, heads, 4P, D)`, contracted with its weights at once, so the largest temporary
is one level's corners, and it is never kept for the backward pass: the gather and its contraction are one
operation with its own gradient (`weighted_rows`), whose residuals are the value map, the row indices and the
coefficients (at DINO's 800x1333 encoder the corners would be 4 levels x 4 corners x 4 points x 256 channels
x 22k queries, 1.4 GB of float32 per image and layer). The value map's gradient is a scatter-add, as in mmcv's
CUDA kernel; the coefficients' gradient gathers the corners again, in the backward pass.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cankd_jax.layers import Dtype, rounded
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


def _corners(hw: tuple[int, int], batch_heads: tuple[int, int], locations: Array, weights: Array
             ) -> tuple[Array, Array]:
    """Each point's four bilinear corners on an (H, W) map: their rows in the value map flattened to
    `(B * H*W * heads, D)` and their coefficients (bilinear weight x attention weight; 0 outside the map),
    each `(B, Q, heads, 4P)`. Cheap elementwise work, recomputed in the backward pass (`jax.checkpoint`)."""
    h, w = hw
    b, heads = batch_heads
    # grid_sample's CPU kernel: grid g = 2 * loc - 1, pixel = (g + 1) * (size / 2) - 0.5 (align_corners=False);
    # written the same way so float32 results round as mmcv's do.
    grid = 2 * locations - 1
    # `rounded`: these floors and the coefficients below must see the same bits (see `rounded`)
    x = rounded((grid[..., 0] + 1) * (w / 2)) - 0.5
    y = rounded((grid[..., 1] + 1) * (h / 2)) - 0.5
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
    batch = jnp.arange(b, dtype=jnp.int32)[:, None, None, None]
    head = jnp.arange(heads, dtype=jnp.int32)[None, None, :, None]
    return (batch * (h * w) + pixel) * heads + head, coeff


@jax.custom_vjp
def weighted_rows(tables: tuple[Array, ...], rows: tuple[Array, ...], coeffs: tuple[Array, ...]) -> Array:
    """`sum_l sum_k coeffs[l][..., k] * tables[l][rows[l][..., k]]`: per level `l` a table `(N_l, D)`, row
    indices `(..., K)` int32 and coefficients `(..., K)` -> `(..., D)` in the tables' dtype, summed in float32
    (at least).

    Its gradient keeps `(tables, rows, coeffs)`, not the `(..., K, D)` rows it gathers, and gathers them again
    one level at a time, only once the output's gradient exists. A `jax.checkpoint` of the plain gathers did
    neither on XLA:CPU, which drops remat's optimization barriers: it merged the recomputed gathers with the
    forward's and kept them all (17.5 GB of DINO's 800x1344 step at 2 images, `benchmarks/memory.py`); nor
    does a recomputation that depends on the residuals alone, which XLA's scheduler may run early, every
    level and layer at once.
    """
    return _weighted_rows_fwd(tables, rows, coeffs)[0]


def _weighted_rows_fwd(tables, rows, coeffs):
    acc = jnp.promote_types(tables[0].dtype, jnp.float32)  # bfloat16 samples sum in float32
    out = sum(jnp.einsum("...k,...kd->...d", c, t[r], preferred_element_type=acc)
              for t, r, c in zip(tables, rows, coeffs))
    return out.astype(tables[0].dtype), (tables, rows, coeffs)


def _after(x: Array) -> Array:
    """0 or 1 (int32), computed from `x`: whatever uses it waits for `x`. XLA cannot see that `min(r, r +
    _after(x))` is `r` and `where(_after(x) > 1, 0, c)` is `c`."""
    return jnp.isnan(x.reshape(-1)[0]).astype(jnp.int32)


def _weighted_rows_bwd(residuals, g):
    tables, rows, coeffs = residuals
    acc = jnp.promote_types(tables[0].dtype, jnp.float32)
    g = g.astype(acc)
    d_tables, d_coeffs = [], []
    wait = _after(g)
    for t, r, c in zip(tables, rows, coeffs):
        # Each level waits for the one before: the (..., K, D) temporaries of one level at a time.
        r = jnp.minimum(r, r + wait)
        c = jnp.where(wait > 1, 0, c)
        n, d = t.shape
        # each sample's share of the output's gradient, added back at its row
        d_tables.append(jnp.zeros((n, d), acc).at[r.reshape(-1)].add(
            (c.astype(acc)[..., None] * g[..., None, :]).reshape(-1, d)).astype(t.dtype))
        d_coeffs.append(jnp.einsum("...d,...kd->...k", g, t[r], preferred_element_type=acc).astype(c.dtype))
        wait = jnp.maximum(_after(d_coeffs[-1]), _after(d_tables[-1]))
    return tuple(d_tables), tuple(None for _ in rows), tuple(d_coeffs)


weighted_rows.defvjp(_weighted_rows_fwd, _weighted_rows_bwd)


def ms_deform_attn(value: Array, spatial_shapes: SpatialShapes, sampling_locations: Array,
                   attention_weights: Array) -> Array:
    """Multi-scale deformable attention's sampling and weighting, mmcv's `multi_scale_deformable_attn_pytorch`.

    Args:
      value: `(B, S, heads, D)`, the levels' maps flattened row-major and concatenated, `S = sum(H_l * W_l)`.
      spatial_shapes: `((H_0, W_0), ...)`, the levels' sizes (static: they fix the program's shapes).
      sampling_locations: `(B, Q, heads, L, P, 2)`, (x, y) in `[0, 1]` of each level's map, (0, 0) the top-left
        corner of its top-left pixel, (1, 1) the bottom-right corner of its bottom-right one; outside the map
        reads zeros.
      attention_weights: `(B, Q, heads, L, P)`.

    Returns:
      `(B, Q, heads * D)`, heads major.
    """
    spatial_shapes = tuple((int(h), int(w)) for h, w in np.asarray(spatial_shapes).reshape(-1, 2))
    _check_shapes(value, spatial_shapes, sampling_locations, attention_weights)
    b, q, heads = sampling_locations.shape[:3]
    d = value.shape[-1]
    tables, rows, coeffs = [], [], []
    start = 0
    for level, (h, w) in enumerate(spatial_shapes):
        r, c = jax.checkpoint(_corners, static_argnums=(0, 1))(
            (h, w), (b, heads), sampling_locations[:, :, :, level], attention_weights[:, :, :, level])
        tables.append(value[:, start:start + h * w].reshape(-1, d))
        rows.append(r)
        coeffs.append(c.astype(value.dtype))
        start += h * w
    return weighted_rows(tuple(tables), tuple(rows), tuple(coeffs)).reshape(b, q, heads * d)


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
        # Both terms `rounded`: the caller's reference points are often a product (DINO's encoder scales them by
        # each image's valid ratio), and a product fused into this sum would move the sampler's floors.
        ref = rounded(reference_points.astype(jnp.float32))[:, :, None, :, None, :]
        if reference_points.shape[-1] == 2:
            # (W, H) of each level, as mmcv's offset_normalizer
            normalizer = jnp.asarray([[w, h] for h, w in spatial_shapes], offsets.dtype)
            locations = ref + rounded(offsets / normalizer[None, None, None, :, None, :])
        else:
            locations = ref[..., :2] + rounded(offsets / points * ref[..., 2:] * 0.5)
        out = ms_deform_attn(v, spatial_shapes, locations, weights)
        out = self.output_proj(out)
        return self.drop(out, deterministic=deterministic) + identity
