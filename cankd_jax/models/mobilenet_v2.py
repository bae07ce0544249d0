"""mmsegmentation's MobileNetV2 backbone (as its `deeplabv3_m-v2-d8` / `pspnet_m-v2-d8` / `fcn_m-v2-d8` use it).

Submodules carry mmseg's names, so a parameter's path joined with dots is its
state-dict key: `conv1.conv`, `conv1.bn`, `layer{i}.{j}.conv.{k}.conv` / `.bn`.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cankd_jax.layers import Dtype
from cankd_jax.models.conv import ConvModule
from cankd_jax.models.ops import check_nhwc

Array = jax.Array

# Per layer: (expand ratio, output channels at widen_factor 1, blocks), mmseg's `arch_settings`.
ARCH_SETTINGS: tuple[tuple[int, int, int], ...] = (
    (1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1))
LAYERS = tuple(f"layer{i + 1}" for i in range(len(ARCH_SETTINGS)))


def make_divisible(value: float, divisor: int, min_value: Optional[int] = None, min_ratio: float = 0.9) -> int:
    """mmseg's `make_divisible`: `value` rounded to the nearest multiple of `divisor` (at least `min_value`,
    default `divisor`), plus one `divisor` if rounding lost more than `1 - min_ratio` of it."""
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return new_value + divisor if new_value < min_ratio * value else new_value


class InvertedResidual(nn.Module):
    """mmseg's MobileNetV2 `InvertedResidual`: `(B, H, W, C) -> (B, H / stride, W / stride, out_channels)`.

    `conv.0` 1x1 expansion to `round(C * expand_ratio)` channels (absent when
    `expand_ratio == 1`), then a 3x3 depthwise conv (stride, dilation, padding
    = dilation), then a 1x1 linear projection; ConvModules with BatchNorm, the
    first two with ReLU6, the last without activation. Identity shortcut when
    `stride == 1` and `C == out_channels`.
    """

    out_channels: int
    stride: int = 1
    expand_ratio: int = 6
    dilation: int = 1
    frozen_stats: bool = False
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    def _conv(self, features: int, k: int, name: str, **kwargs) -> ConvModule:
        return ConvModule(features, k, frozen_stats=self.frozen_stats, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=name, **kwargs)

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        in_channels = x.shape[-1]
        hidden = int(round(in_channels * self.expand_ratio))
        out, k = x, 0
        if self.expand_ratio != 1:
            out = self._conv(hidden, 1, "conv.0", act="relu6")(out, train=train)
            k = 1
        out = self._conv(hidden, 3, f"conv.{k}", stride=self.stride, dilation=self.dilation, groups=hidden,
                         act="relu6")(out, train=train)
        out = self._conv(self.out_channels, 1, f"conv.{k + 1}", act=False)(out, train=train)
        if self.stride == 1 and in_channels == self.out_channels:
            return x + out
        return out


class MobileNetV2(nn.Module):
    """mmseg's `MobileNetV2` backbone: a 3x3 stride-2 stem and seven layers of inverted residuals.

    `__call__(images (B, H, W, in_channels), *, train) -> dict` of named
    features: `stem` (`conv1`'s output, stride 2, `make_divisible(32 w, 8)`
    channels) and `layer1`..`layer7` (channels `make_divisible(c w, 8)` for c =
    16, 24, 32, 64, 96, 160, 320 at `widen_factor` w). Strides are PyTorch's
    (sizes rounded up at each stride-2 step); `feature_channels()` and
    `feature_strides()` give both for a configured instance.

    mmseg's `out_indices=(1, 2, 4, 6)` are `layer2`, `layer3`, `layer5`,
    `layer7`: its DeepLabV3 reads the last (`in_index=3`: `layer7`, 320
    channels) and the auxiliary FCN head the third (`in_index=2`: `layer5`, 96
    channels). The `-d8` setting (`deeplabv3_m-v2-d8`): `strides=(1, 2, 2, 1,
    1, 1, 1)`, `dilations=(1, 1, 1, 2, 2, 4, 4)`, output stride 8 from `layer3` on.

    As mmseg, a layer's stride and dilation apply to its first block only
    (later blocks are stride 1, dilation 1).

    Fields:
      widen_factor: channel multiplier (mmseg's `widen_factor`).
      strides, dilations: per layer (7 each), mmseg's fields.
      frozen_stages: -1 none; k >= 0 freezes `conv1` and layers 1..k
        (`frozen_prefixes()`); frozen layers keep their BatchNorm on running
        statistics. As mmseg's `_freeze_stages`, `conv1`'s parameters freeze but
        its BatchNorm is not put in eval mode (only `norm_eval` does that).
      norm_eval: every BatchNorm stays on its running statistics in training.
      dtype, param_dtype: computation and parameter dtypes.
    """

    widen_factor: float = 1.0
    strides: tuple[int, ...] = (1, 2, 2, 2, 1, 2, 1)
    dilations: tuple[int, ...] = (1, 1, 1, 1, 1, 1, 1)
    in_channels: int = 3
    frozen_stages: int = -1
    norm_eval: bool = False
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        n = len(ARCH_SETTINGS)
        for field in ("strides", "dilations"):
            value = tuple(getattr(self, field))
            if len(value) != n or any(int(v) < 1 for v in value):
                raise ValueError(f"MobileNetV2: {field} needs {n} positive integers (one per layer), got {value}")
        if any(s not in (1, 2) for s in self.strides):
            raise ValueError(f"MobileNetV2: strides must be 1 or 2, got {tuple(self.strides)}")
        if not -1 <= self.frozen_stages <= n:
            raise ValueError(f"MobileNetV2: frozen_stages must be in -1..{n} (-1: none), got {self.frozen_stages}")
        if self.widen_factor <= 0:
            raise ValueError(f"MobileNetV2: widen_factor must be positive, got {self.widen_factor}")
        super().__post_init__()

    def feature_channels(self) -> dict[str, int]:
        """Channels of each named feature."""
        ch = {"stem": make_divisible(32 * self.widen_factor, 8)}
        for name, (_, c, _) in zip(LAYERS, ARCH_SETTINGS):
            ch[name] = make_divisible(c * self.widen_factor, 8)
        return ch

    def feature_strides(self) -> dict[str, int]:
        """Nominal stride of each feature (input size / feature size, before rounding up)."""
        strides, s = {"stem": 2}, 2
        for name, layer_stride in zip(LAYERS, self.strides):
            s *= layer_stride
            strides[name] = s
        return strides

    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the parameters `frozen_stages` freezes."""
        if self.frozen_stages < 0:
            return ()
        return ("conv1.",) + tuple(f"{name}." for name in LAYERS[: self.frozen_stages])

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> dict[str, Array]:
        check_nhwc(x, who="MobileNetV2", channels=self.in_channels)
        channels = self.feature_channels()
        x = ConvModule(channels["stem"], 3, stride=2, act="relu6", frozen_stats=self.norm_eval, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="conv1")(x, train=train)
        frozen = self.frozen_stages >= 0
        feats = {"stem": jax.lax.stop_gradient(x) if frozen else x}
        x = feats["stem"]
        for i, (name, (expand, _, blocks)) in enumerate(zip(LAYERS, ARCH_SETTINGS)):
            frozen = self.frozen_stages > i
            for j in range(blocks):
                x = InvertedResidual(channels[name], self.strides[i] if j == 0 else 1, expand,
                                     self.dilations[i] if j == 0 else 1, frozen_stats=self.norm_eval or frozen,
                                     dtype=self.dtype, param_dtype=self.param_dtype, name=f"{name}.{j}")(x, train=train)
            # Nothing before a frozen layer's output trains: stop the backward pass there (requires_grad=False).
            x = feats[name] = jax.lax.stop_gradient(x) if frozen else x
        return feats
