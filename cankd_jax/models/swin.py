"""Swin Transformer as mmdetection 3.x builds it (`mmdet.models.backbones.SwinTransformer`), NHWC.

Submodules carry mmdet's names (`patch_embed.projection`, `stages.2.blocks.5.attn.w_msa.qkv`,
`stages.1.downsample.reduction`, `norm3`), so a parameter's path joined with dots is its key in an mmdet
checkpoint (under `backbone.`). Differences from the original Swin release that mmdet keeps, and so do we:

- every map is padded (bottom / right, zeros) to a multiple of the window before attention, after `norm1`,
  and the padded tokens are attended to like any other (no mask for them); shifted windows are shifted even
  when the map is no larger than one window;
- patch merging concatenates each 2x2 neighbourhood channel-major (`nn.Unfold`'s order: channel, then row,
  then column of the 2x2 window), so the original release's `downsample.reduction` / `downsample.norm`
  weights need mmdet's reordering (`cankd_jax.interop.torch_models.swin_release_to_mmdet`).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cankd_jax.compute import remat_policy
from cankd_jax.layers import Dtype, torch_bias_init, torch_kernel_init
from cankd_jax.models.ops import check_nhwc, frozen_boundary

Array = jax.Array

STAGES = ("layer1", "layer2", "layer3", "layer4")  # the names our ResNets give their stage outputs
# mmdet's init_weights: trunc_normal_(std=0.02) truncated at +-2 in absolute value, i.e. 100 std: a normal.
_linear_init = nn.initializers.normal(0.02)
_LN_EPS = 1e-5  # torch.nn.LayerNorm's (Flax's default is 1e-6)


def relative_position_index(window: int) -> np.ndarray:
    """`(window**2, window**2)` int: the row of the relative-position bias table for each (query, key) pair
    of a window, as mmdet's `WindowMSA` builds its `relative_position_index` buffer."""
    seq1 = np.arange(0, (2 * window - 1) * window, 2 * window - 1)
    seq2 = np.arange(window)
    coords = (seq1[:, None] + seq2[None, :]).reshape(1, -1)
    return np.flip(coords + coords.T, axis=1).copy()


def shift_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
    """`(height / window, width / window, window**2, window**2)` float32: 0 where a query and a key of a
    shifted window come from the same region of the (padded) map before the cyclic shift, -100 elsewhere."""
    regions = np.zeros((height, width), np.float32)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, (h, w) in enumerate((h, w) for h in cuts for w in cuts):
        regions[h, w] = i
    windows = _partition(regions[None, :, :, None], window)[0, ..., 0]  # (nH, nW, N)
    diff = windows[..., None, :] - windows[..., :, None]
    return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def _partition(x, window: int):
    """`(B, H, W, C) -> (B, H / window, W / window, window**2, C)`, rows of each window first."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // window, w // window, window * window, c)


def _merge(x: Array, window: int) -> Array:
    """The inverse of `_partition`."""
    b, nh, nw, _, c = x.shape
    x = x.reshape(b, nh, nw, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, nh * window, nw * window, c)


def _pad_to(x: Array, multiple: int) -> Array:
    """Zeros at the bottom and right of `(B, H, W, C)` up to multiples of `multiple` (mmdet's 'corner')."""
    ph, pw = (-x.shape[1]) % multiple, (-x.shape[2]) % multiple
    return jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0))) if ph or pw else x


def _dense(features: int, name: str, dtype, param_dtype, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, kernel_init=_linear_init, bias_init=nn.initializers.zeros,
                    dtype=dtype, param_dtype=param_dtype, name=name)


def _layer_norm(name: str, dtype, param_dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=_LN_EPS, dtype=dtype, param_dtype=param_dtype, name=name)


class WindowMSA(nn.Module):
    """Multi-head self-attention inside each window, with the relative-position bias (mmdet's `WindowMSA`).

    `(B, nH, nW, N, C) -> (B, nH, nW, N, C)` for `N = window**2` tokens per window; `mask`: an additive
    `(nH, nW, N, N)` (shifted windows) or None. Params: `relative_position_bias_table` `((2 window - 1)**2,
    num_heads)`, `qkv` (`C -> 3 C`), `proj` (`C -> C`). The logits and the softmax are float32 whatever the
    compute dtype (bfloat16 logits would round the -100 mask and the bias).
    """

    num_heads: int
    window: int
    qkv_bias: bool = True
    qk_scale: Optional[float] = None
    attn_drop_rate: float = 0.0
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    def torch_buffers(self) -> dict[str, np.ndarray]:
        """Constants PyTorch keeps in its state dict: the `relative_position_index` buffer."""
        return {"relative_position_index": relative_position_index(self.window).astype(np.int64)}

    @nn.compact
    def __call__(self, x: Array, mask: Optional[np.ndarray], train: bool) -> Array:
        *lead, n, c = x.shape
        heads = self.num_heads
        table = self.param("relative_position_bias_table", _linear_init, ((2 * self.window - 1) ** 2, heads),
                           self.param_dtype)
        qkv = _dense(3 * c, "qkv", self.dtype, self.param_dtype, self.qkv_bias)(x)
        qkv = qkv.reshape(*lead, n, 3, heads, c // heads)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        q = q * (self.qk_scale or (c // heads) ** -0.5)
        logits = jnp.einsum("...nhd,...mhd->...hnm", q, k, preferred_element_type=jnp.float32)
        bias = table[relative_position_index(self.window).reshape(-1)].reshape(n, n, heads)
        logits = logits + jnp.transpose(bias, (2, 0, 1)).astype(jnp.float32)
        if mask is not None:
            logits = logits + mask[:, :, None]
        attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        if self.attn_drop_rate > 0:
            attn = nn.Dropout(self.attn_drop_rate, deterministic=not train)(attn)
        out = jnp.einsum("...hnm,...mhd->...nhd", attn, v).reshape(*lead, n, c)
        return _dense(c, "proj", self.dtype, self.param_dtype)(out)


class SwinBlock(nn.Module):
    """One Swin block (mmdet's `SwinBlock`): `x + DropPath(W-MSA(LN(x)))`, then `x + DropPath(FFN(LN(x)))`.

    `(B, H, W, C) -> (B, H, W, C)`. Odd blocks of a stage (`shift=True`) roll the map by half a window
    before attention and back after it, with `shift_mask` between regions the roll brought together.
    """

    num_heads: int
    window: int
    shift: bool
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: Optional[float] = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    def _drop_path(self, x: Array, train: bool) -> Array:
        # mmcv's DropPath: one keep/drop draw per image, kept images scaled by 1 / keep.
        if self.drop_path_rate <= 0:
            return x
        return nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2, 3), deterministic=not train)(x)

    def _dropout(self, x: Array, train: bool) -> Array:
        return nn.Dropout(self.drop_rate, deterministic=not train)(x) if self.drop_rate > 0 else x

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        _, h, w, c = x.shape
        ws, shift = self.window, (self.window // 2 if self.shift else 0)
        y = _pad_to(_layer_norm("norm1", self.dtype, self.param_dtype)(x), ws)
        hp, wp = y.shape[1:3]
        mask = None
        if shift:
            y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
            mask = shift_mask(hp, wp, ws, shift)
        y = WindowMSA(self.num_heads, ws, self.qkv_bias, self.qk_scale, self.attn_drop_rate, self.dtype,
                      self.param_dtype, name="attn.w_msa")(_partition(y, ws), mask, train)
        y = _merge(self._dropout(y, train), ws)
        if shift:
            y = jnp.roll(y, (shift, shift), axis=(1, 2))
        x = x + self._drop_path(y[:, :h, :w], train)

        y = _layer_norm("norm2", self.dtype, self.param_dtype)(x)
        y = nn.gelu(_dense(int(self.mlp_ratio * c), "ffn.layers.0.0", self.dtype, self.param_dtype)(y),
                    approximate=False)
        y = _dense(c, "ffn.layers.1", self.dtype, self.param_dtype)(self._dropout(y, train))
        return x + self._drop_path(self._dropout(y, train), train)


class PatchMerging(nn.Module):
    """mmdet's `PatchMerging` (2x2, stride 2, 'corner' padding): `(B, H, W, C) -> (B, ceil(H/2), ceil(W/2),
    out_channels)`, each 2x2 neighbourhood concatenated channel-major, `norm` (LayerNorm over 4 C), then
    `reduction` (no bias)."""

    out_channels: int
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = _pad_to(x, 2)
        b, h, w, c = x.shape
        # nn.Unfold's channel order: index c * 4 + 2 * row + column of the 2x2 window.
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, 4 * c)
        x = _layer_norm("norm", self.dtype, self.param_dtype)(x)
        return _dense(self.out_channels, "reduction", self.dtype, self.param_dtype, use_bias=False)(x)


class SwinTransformer(nn.Module):
    """Swin-T/S/B/L as mmdet's `SwinTransformer` (`patch_norm=True`, GELU, LayerNorm, no absolute position
    embedding: every mmdet detection config's setting).

    `__call__(images (B, H, W, in_channels), *, train) -> dict` of the stage outputs in `out_indices`, each
    after its own LayerNorm (`norm{i}`), named as our ResNets' stages so that the FPN and the trunks take
    either:

    | name     | shape                                  | stride |
    |----------|----------------------------------------|--------|
    | `layer1` | `(B, ceil(H/4), ceil(W/4), embed_dims)`| 4      |
    | `layer2` | `(..., 2 embed_dims)`                  | 8      |
    | `layer3` | `(..., 4 embed_dims)`                  | 16     |
    | `layer4` | `(..., 8 embed_dims)`                  | 32     |

    Fields (mmdet's names): `embed_dims`, `depths`, `num_heads`, `window_size` (7; 12 for the 384-pixel
    pretrainings), `mlp_ratio`, `patch_size` (the patch embedding's kernel and stride), `qkv_bias`,
    `qk_scale`, `drop_rate`, `attn_drop_rate`, `drop_path_rate` (stochastic depth, rising linearly from 0 to
    this over the blocks; draws from the 'dropout' RNG in training), `out_indices`, `frozen_stages` (-1: none;
    k >= 0 freezes the patch embedding, stages 1..k with their patch merging, and their output norms; frozen
    parts run in inference mode, as mmdet's `_freeze_stages` puts them in eval), `dtype`, `param_dtype`,
    `remat` (a `cankd_jax.compute.REMAT_POLICIES` name for each block: mmdet's `with_cp`).
    """

    embed_dims: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    patch_size: int = 4
    in_channels: int = 3
    qkv_bias: bool = True
    qk_scale: Optional[float] = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    out_indices: tuple[int, ...] = (0, 1, 2, 3)
    frozen_stages: int = -1
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    remat: str = "none"

    def __post_init__(self):
        self._validate()
        super().__post_init__()

    def _validate(self) -> None:
        n = len(self.depths)
        if n != len(STAGES) or len(self.num_heads) != n or min(self.depths) < 1:
            raise ValueError(f"SwinTransformer: depths and num_heads need one positive entry per stage ({len(STAGES)}),"
                             f" got depths={tuple(self.depths)}, num_heads={tuple(self.num_heads)}")
        for i, heads in enumerate(self.num_heads):
            if heads < 1 or (self.embed_dims * 2**i) % heads:
                raise ValueError(f"SwinTransformer: stage {i + 1} has {self.embed_dims * 2**i} channels, which "
                                 f"{heads} heads do not divide (embed_dims={self.embed_dims})")
        if self.window_size < 2 or self.patch_size < 1:
            raise ValueError(f"SwinTransformer: window_size must be >= 2 and patch_size >= 1, got "
                             f"{self.window_size}, {self.patch_size}")
        if not set(self.out_indices) <= set(range(n)) or not self.out_indices:
            raise ValueError(f"SwinTransformer: out_indices must be stage indices in 0..{n - 1}, got "
                             f"{tuple(self.out_indices)}")
        if not -1 <= self.frozen_stages <= n:
            raise ValueError(f"SwinTransformer: frozen_stages must be in -1..{n} (-1: none), got {self.frozen_stages}")
        remat_policy(self.remat)

    def feature_channels(self) -> dict[str, int]:
        """Channels of each named feature."""
        return {STAGES[i]: self.embed_dims * 2**i for i in self.out_indices}

    def feature_strides(self) -> dict[str, int]:
        """Nominal stride of each named feature (the input size over the feature's, before rounding up)."""
        return {STAGES[i]: self.patch_size * 2**i for i in self.out_indices}

    def drop_path_rates(self) -> list[float]:
        """Each block's stochastic-depth rate, in order (`torch.linspace(0, drop_path_rate, sum(depths))`)."""
        total = sum(self.depths)
        return [float(r) for r in np.linspace(0.0, self.drop_path_rate, total, dtype=np.float32)]

    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the parameters `frozen_stages` freezes (mmdet's `_freeze_stages`)."""
        if self.frozen_stages < 0:
            return ()
        prefixes = ["patch_embed."]
        for i in range(self.frozen_stages):
            prefixes += [f"stages.{i}."] + ([f"norm{i}."] if i in self.out_indices else [])
        return tuple(prefixes)

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> dict[str, Array]:
        check_nhwc(x, who="SwinTransformer", channels=self.in_channels)
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _pad_to(x, self.patch_size)
        fan_in = self.in_channels * self.patch_size**2
        x = nn.Conv(self.embed_dims, (self.patch_size, self.patch_size), strides=self.patch_size, padding="VALID",
                    kernel_init=torch_kernel_init, bias_init=torch_bias_init(fan_in), name="patch_embed.projection",
                    **dtypes)(x)
        x = _layer_norm("patch_embed.norm", **dtypes)(x)
        if self.drop_rate > 0:
            x = nn.Dropout(self.drop_rate, deterministic=not (train and self.frozen_stages < 0))(x)
        x = frozen_boundary(x, self.frozen_stages >= 0)
        block_cls = SwinBlock
        if self.remat != "none":
            # `train` is positional (argument 2, counting the module) so that it stays a Python bool.
            block_cls = nn.remat(SwinBlock, policy=remat_policy(self.remat), static_argnums=(2,))
        rates = iter(self.drop_path_rates())
        feats = {}
        for i, depth in enumerate(self.depths):
            frozen = i < self.frozen_stages
            for j in range(depth):
                x = block_cls(self.num_heads[i], self.window_size, shift=j % 2 == 1, mlp_ratio=self.mlp_ratio,
                              qkv_bias=self.qkv_bias, qk_scale=self.qk_scale, drop_rate=self.drop_rate,
                              attn_drop_rate=self.attn_drop_rate, drop_path_rate=next(rates),
                              name=f"stages.{i}.blocks.{j}", **dtypes)(x, train and not frozen)
            if i in self.out_indices:
                feats[STAGES[i]] = frozen_boundary(_layer_norm(f"norm{i}", **dtypes)(x), frozen)
            if i + 1 < len(self.depths):
                x = PatchMerging(2 * x.shape[-1], name=f"stages.{i}.downsample", **dtypes)(x)
                x = frozen_boundary(x, frozen)
        return feats


# name -> fields: mmdet's configs (and the original release's) for the four sizes, window 7 for the 224-pixel
# pretrainings and 12 for the 384-pixel ones.
SWIN_PRESETS: dict[str, dict] = {
    "swin_tiny": dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin_small": dict(embed_dims=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin_base": dict(embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "swin_large": dict(embed_dims=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}
SWIN_PRESETS.update({f"{name}_384": dict(fields, window_size=12) for name, fields in list(SWIN_PRESETS.items())
                     if name in ("swin_base", "swin_large")})
