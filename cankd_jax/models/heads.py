"""mmsegmentation's decode heads: DeepLabV3's ASPP, PSPNet's pyramid pooling, FCN.

Each head maps one backbone feature `(B, H, W, in_channels)` to
`{'feature': (B, H, W, channels), 'logits': (B, H, W, num_classes)}` at the
same resolution: `feature` is what the classifier sees (before dropout),
`logits` the classifier's output. Submodule names are mmseg's state-dict
names (`image_pool.1`, `aspp_modules.2`, `psp_modules.3.1`, `bottleneck`,
`convs.0`, `conv_seg`); every ConvModule is conv (no bias) + BN + ReLU.
Interpolation is bilinear with `align_corners=False` (mmseg's default; the
other setting is not implemented).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cankd_jax.layers import Conv1x1, Dtype
from cankd_jax.models.conv import ConvModule
from cankd_jax.models.ops import adaptive_avg_pool, check_nhwc, resize_bilinear

Array = jax.Array


class _DecodeHead(nn.Module):
    """mmseg's `BaseDecodeHead`: the shared classifier (Dropout2d + 1x1 `conv_seg`)."""

    num_classes: int
    channels: int
    dropout_ratio: float = 0.1
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    def _conv_module(self, name: str, kernel_size: int = 1, dilation: int = 1) -> ConvModule:
        return ConvModule(self.channels, kernel_size, dilation=dilation, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=name)

    def _classify(self, feature: Array, train: bool) -> dict[str, Array]:
        x = feature
        if self.dropout_ratio > 0:
            # nn.Dropout2d: whole channels are dropped, per sample.
            x = nn.Dropout(self.dropout_ratio, broadcast_dims=(1, 2), deterministic=not train)(x)
        # mmseg initialises conv_seg with N(0, 0.01^2) and a zero bias.
        logits = Conv1x1(self.num_classes, kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros,
                         dtype=self.dtype, param_dtype=self.param_dtype, name="conv_seg")(x)
        return {"feature": feature, "logits": logits}


class ASPPHead(_DecodeHead):
    """DeepLabV3's head: image pooling, a 1x1 and dilated 3x3 branches, concatenated, then a 3x3 bottleneck.

    `(B, H, W, C) -> {'feature': (B, H, W, channels), 'logits': (B, H, W, num_classes)}`.
    Branch order (the concatenation order, as mmseg): global average pool ->
    1x1 ConvModule -> bilinear resize back to (H, W); then one ConvModule per
    dilation (1x1 for dilation 1, else 3x3 at that dilation).
    """

    dilations: tuple[int, ...] = (1, 12, 24, 36)

    @nn.compact
    def __call__(self, x: Array, train: bool) -> dict[str, Array]:
        check_nhwc(x, who="ASPPHead")
        pooled = self._conv_module("image_pool.1")(adaptive_avg_pool(x, 1), train=train)
        branches = [resize_bilinear(pooled, x.shape[1:3])]
        for i, d in enumerate(self.dilations):
            branches.append(self._conv_module(f"aspp_modules.{i}", 1 if d == 1 else 3, d)(x, train=train))
        feature = self._conv_module("bottleneck", 3)(jnp.concatenate(branches, axis=-1), train=train)
        return self._classify(feature, train)


class PSPHead(_DecodeHead):
    """PSPNet's head: the input concatenated with its pyramid-pooled versions, then a 3x3 bottleneck.

    `(B, H, W, C) -> {'feature': (B, H, W, channels), 'logits': (B, H, W, num_classes)}`.
    For each bin count s in `pool_scales`: adaptive average pool to s x s
    (PyTorch's possibly-overlapping bins) -> 1x1 ConvModule -> bilinear resize
    to (H, W). Concatenation order: input, then the scales in order.
    """

    pool_scales: tuple[int, ...] = (1, 2, 3, 6)

    @nn.compact
    def __call__(self, x: Array, train: bool) -> dict[str, Array]:
        check_nhwc(x, who="PSPHead")
        branches = [x]
        for i, s in enumerate(self.pool_scales):
            pooled = self._conv_module(f"psp_modules.{i}.1")(adaptive_avg_pool(x, s), train=train)
            branches.append(resize_bilinear(pooled, x.shape[1:3]))
        feature = self._conv_module("bottleneck", 3)(jnp.concatenate(branches, axis=-1), train=train)
        return self._classify(feature, train)


class FCNHead(_DecodeHead):
    """FCN's head: `num_convs` ConvModules (kernel `kernel_size`, dilation `dilation`), optionally
    concatenated with the input and fused by `conv_cat`.

    `(B, H, W, C) -> {'feature': (B, H, W, channels), 'logits': (B, H, W, num_classes)}`.
    As the auxiliary head on stage 3 in mmseg's configs: `num_convs=1,
    concat_input=False`, `channels=256` for ResNet-50/101 (a quarter of the
    input channels).
    """

    num_convs: int = 2
    kernel_size: int = 3
    concat_input: bool = True
    dilation: int = 1

    def __post_init__(self):
        if self.num_convs < 1:
            raise ValueError(f"FCNHead: num_convs must be >= 1, got {self.num_convs}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, train: bool) -> dict[str, Array]:
        check_nhwc(x, who="FCNHead")
        out = x
        for i in range(self.num_convs):
            out = self._conv_module(f"convs.{i}", self.kernel_size, self.dilation)(out, train=train)
        if self.concat_input:
            out = self._conv_module("conv_cat", self.kernel_size)(jnp.concatenate([x, out], axis=-1), train=train)
        return self._classify(out, train)
