"""The transformer pieces of mmdetection 3.x's Deformable DETR and DINO, batch-first, mmdet's names and init.

- `sine_position_embedding`: `SinePositionalEncoding` of a padding mask (channels `(pos_y, pos_x)`).
- `coordinate_to_encoding`, `inverse_sigmoid`: mmdet's helpers of those names.
- `MultiheadAttention`: mmcv's wrapper of `torch.nn.MultiheadAttention` (residual included), its packed
  `attn.in_proj_weight` kept in PyTorch's `(3C, C)` layout so checkpoints move as they are.
- `FFN`, `MLP`, `DeformableEncoderLayer`, `DeformableDecoderLayer`: mmcv's / mmdet's modules of those names.

Every `__call__` takes `(B, N, C)` arrays; masks are bool with True meaning "padding" / "may not attend",
PyTorch's convention.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cankd_jax.layers import Dtype, torch_bias_init
from cankd_jax.models.conv import xavier_uniform
from cankd_jax.models.deform_attn import MultiScaleDeformableAttention

Array = jax.Array
_LN_EPS = 1e-5  # torch.nn.LayerNorm's


def _dim_t(num_feats: int, temperature: float) -> Array:
    """`temperature ** (2 * (i // 2) / num_feats)` for i < num_feats, in float32 as mmdet computes it."""
    i = jnp.arange(num_feats, dtype=jnp.float32)
    return jnp.float32(temperature) ** (2 * jnp.floor(i / 2) / num_feats)


def _sin_cos(pos: Array) -> Array:
    """`(..., F) -> (..., F)`: sin of the even channels interleaved with cos of the odd ones."""
    return jnp.stack([jnp.sin(pos[..., 0::2]), jnp.cos(pos[..., 1::2])], axis=-1).reshape(pos.shape)


def sine_position_embedding(mask: Array, num_feats: int = 128, temperature: float = 10000.0,
                            normalize: bool = True, scale: float = 2 * math.pi, eps: float = 1e-6,
                            offset: float = 0.0) -> Array:
    """mmdet's `SinePositionalEncoding(mask)`: `mask (B, H, W)` bool (True: padding) -> `(B, H, W, 2 * num_feats)`.

    Positions count the unpadded pixels along each axis (1-based cumulative sums), normalised by the last
    count when `normalize` (DINO: offset 0, temperature 20; Deformable DETR: offset -0.5, 10000)."""
    not_mask = (~mask).astype(jnp.float32)
    y = jnp.cumsum(not_mask, axis=1)
    x = jnp.cumsum(not_mask, axis=2)
    if normalize:
        y = (y + offset) / (y[:, -1:, :] + eps) * scale
        x = (x + offset) / (x[:, :, -1:] + eps) * scale
    dim_t = _dim_t(num_feats, temperature)
    return jnp.concatenate([_sin_cos(y[..., None] / dim_t), _sin_cos(x[..., None] / dim_t)], axis=-1)


def coordinate_to_encoding(coords: Array, num_feats: int = 128, temperature: float = 10000.0,
                           scale: float = 2 * math.pi) -> Array:
    """mmdet's `coordinate_to_encoding`: `(..., 2 | 4)` in [0, 1] -> `(..., 2 | 4 * num_feats)`, the sine
    embeddings of y, x (then w, h), in that order."""
    if coords.shape[-1] not in (2, 4):
        raise ValueError(f"coordinate_to_encoding: the last axis must be 2 (x, y) or 4 (x, y, w, h), "
                         f"got {coords.shape}")
    dim_t = _dim_t(num_feats, temperature)
    embed = [_sin_cos((coords[..., i] * scale)[..., None] / dim_t) for i in range(coords.shape[-1])]
    order = (1, 0) if coords.shape[-1] == 2 else (1, 0, 2, 3)
    return jnp.concatenate([embed[i] for i in order], axis=-1)


def inverse_sigmoid(x: Array, eps: float = 1e-5) -> Array:
    """mmdet's `inverse_sigmoid`: `log(x / (1 - x))` with both clamped to >= eps after x is clamped to [0, 1]."""
    x = jnp.clip(x, 0, 1)
    return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1 - x, eps))


def layer_norm(name: str, dtype: Optional[Dtype], param_dtype: Dtype) -> nn.LayerNorm:
    """`nn.LayerNorm(C)` (eps 1e-5, two-pass variance) under `name`."""
    return nn.LayerNorm(epsilon=_LN_EPS, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name)


def _linear(features: int, fan_in: int, name: str, dtype: Optional[Dtype], param_dtype: Dtype) -> nn.Dense:
    """`nn.Linear(fan_in, features)` as DETR transformers initialise it: xavier-uniform weight (their
    `init_weights` redraws every weight matrix of the encoder and decoder so), PyTorch's default bias."""
    return nn.Dense(features, kernel_init=xavier_uniform, bias_init=torch_bias_init(fan_in), dtype=dtype,
                    param_dtype=param_dtype, name=name)


class TorchMultiheadAttention(nn.Module):
    """`torch.nn.MultiheadAttention(C, heads)` (batch-first here), its math path: q, k, v from the packed
    `in_proj_weight (3C, C)` / `in_proj_bias (3C,)`, q scaled by `sqrt(1 / head_dim)` before `q k^T`, masked
    logits at -inf, softmax, `out_proj`. `attn_mask (Q, K) | (B, Q, K)` bool, True: may not attend."""

    embed_dims: int
    num_heads: int
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, query: Array, key: Array, value: Array, attn_mask: Optional[Array] = None) -> Array:
        c, heads = self.embed_dims, self.num_heads
        if c % heads:
            raise ValueError(f"MultiheadAttention: embed_dims {c} must be divisible by num_heads {heads}")
        w = self.param("in_proj_weight", xavier_uniform, (3 * c, c), self.param_dtype)
        b = self.param("in_proj_bias", nn.initializers.zeros, (3 * c,), self.param_dtype)
        dtype = self.dtype or query.dtype
        w, b = w.astype(dtype), b.astype(dtype)
        q = jnp.einsum("bnc,oc->bno", query, w[:c]) + b[:c]
        k = jnp.einsum("bnc,oc->bno", key, w[c:2 * c]) + b[c:2 * c]
        v = jnp.einsum("bnc,oc->bno", value, w[2 * c:]) + b[2 * c:]
        bsz, nq, _ = q.shape
        hd = c // heads
        q = q.reshape(bsz, nq, heads, hd) * math.sqrt(1.0 / float(hd))
        k = k.reshape(bsz, k.shape[1], heads, hd)
        v = v.reshape(bsz, v.shape[1], heads, hd)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        if attn_mask is not None:
            mask = attn_mask if attn_mask.ndim == 3 else attn_mask[None]
            logits = jnp.where(mask[:, None], -jnp.inf, logits)
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(bsz, nq, c)
        # out_proj: torch zeroes its bias; DETR's init_weights redraws its weight xavier-uniform
        return nn.Dense(c, kernel_init=xavier_uniform, bias_init=nn.initializers.zeros, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="out_proj")(out)


class MultiheadAttention(nn.Module):
    """mmcv's `MultiheadAttention` (batch-first, dropout 0): `identity + attn(query + query_pos,
    key + key_pos, value)`, `key` / `value` default to `query`, `key_pos` to `query_pos` when shapes agree."""

    embed_dims: int = 256
    num_heads: int = 8
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, query: Array, key: Optional[Array] = None, value: Optional[Array] = None, *,
                 query_pos: Optional[Array] = None, key_pos: Optional[Array] = None,
                 attn_mask: Optional[Array] = None) -> Array:
        key = query if key is None else key
        value = key if value is None else value
        identity = query
        if key_pos is None and query_pos is not None and query_pos.shape == key.shape:
            key_pos = query_pos
        if query_pos is not None:
            query = query + query_pos
        if key_pos is not None:
            key = key + key_pos
        out = TorchMultiheadAttention(self.embed_dims, self.num_heads, dtype=self.dtype,
                                      param_dtype=self.param_dtype, name="attn")(query, key, value, attn_mask)
        return identity + out


class FFN(nn.Module):
    """mmcv's `FFN` with two layers: `x + layers.1(relu(layers.0.0(x)))` (dropout 0)."""

    embed_dims: int = 256
    feedforward_channels: int = 1024
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.relu(_linear(self.feedforward_channels, self.embed_dims, "layers.0.0", **d)(x))
        return x + _linear(self.embed_dims, self.feedforward_channels, "layers.1", **d)(h)


class MLP(nn.Module):
    """mmdet's `MLP`: `num_layers` linears (`layers.{i}`), ReLU between them."""

    hidden_dim: int
    output_dim: int
    num_layers: int
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = _linear(self.output_dim if last else self.hidden_dim, x.shape[-1], f"layers.{i}",
                              self.dtype, self.param_dtype)(x)
            x = x if last else nn.relu(x)
        return x


class _DeformableLayer(nn.Module):
    """The fields and pieces the encoder and decoder layers share; call their helpers from a compact method."""

    embed_dims: int = 256
    num_heads: int = 8
    num_levels: int = 4
    num_points: int = 4
    feedforward_channels: int = 1024
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    def _deform_attn(self, name: str) -> MultiScaleDeformableAttention:
        return MultiScaleDeformableAttention(self.embed_dims, self.num_heads, self.num_levels, self.num_points,
                                             name=name, dtype=self.dtype, param_dtype=self.param_dtype)

    def _norm(self, i: int, x: Array) -> Array:
        return layer_norm(f"norms.{i}", self.dtype, self.param_dtype)(x)

    def _ffn_and_norm(self, i: int, x: Array) -> Array:
        """`ffn` (residual inside), then `norms.{i}`."""
        x = FFN(self.embed_dims, self.feedforward_channels, name="ffn", dtype=self.dtype,
                param_dtype=self.param_dtype)(x)
        return self._norm(i, x)


class DeformableEncoderLayer(_DeformableLayer):
    """mmdet's `DeformableDetrTransformerEncoderLayer`: deformable self-attention (residual inside), LayerNorm,
    FFN (residual inside), LayerNorm (`self_attn`, `norms.0`, `ffn`, `norms.1`)."""

    @nn.compact
    def __call__(self, query: Array, *, query_pos: Array, reference_points: Array,
                 spatial_shapes: Sequence[tuple[int, int]], key_padding_mask: Optional[Array]) -> Array:
        query = self._deform_attn("self_attn")(query, reference_points=reference_points, spatial_shapes=spatial_shapes,
                                               query_pos=query_pos, key_padding_mask=key_padding_mask)
        return self._ffn_and_norm(1, self._norm(0, query))


class DeformableDecoderLayer(_DeformableLayer):
    """mmdet's `DeformableDetrTransformerDecoderLayer`: self-attention among the queries (`self_attn`, with
    `self_attn_mask`), LayerNorm, deformable cross-attention into the memory (`cross_attn`), LayerNorm, FFN,
    LayerNorm (`norms.0..2`)."""

    @nn.compact
    def __call__(self, query: Array, *, query_pos: Array, value: Array, reference_points: Array,
                 spatial_shapes: Sequence[tuple[int, int]], key_padding_mask: Optional[Array],
                 self_attn_mask: Optional[Array] = None) -> Array:
        query = MultiheadAttention(self.embed_dims, self.num_heads, name="self_attn", dtype=self.dtype,
                                   param_dtype=self.param_dtype)(
            query, query_pos=query_pos, key_pos=query_pos, attn_mask=self_attn_mask)
        query = self._norm(0, query)
        query = self._deform_attn("cross_attn")(query, value, reference_points=reference_points,
                                                spatial_shapes=spatial_shapes, query_pos=query_pos,
                                                key_padding_mask=key_padding_mask)
        return self._ffn_and_norm(2, self._norm(1, query))
