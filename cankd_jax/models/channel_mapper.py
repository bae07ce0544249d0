"""mmdetection's `ChannelMapper`, the neck of Deformable DETR and DINO, with mmdet's state-dict names."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from cankd_jax.layers import Dtype
from cankd_jax.models.conv import ConvModule, xavier_uniform
from cankd_jax.models.ops import check_nhwc

Array = jax.Array


class ChannelMapper(nn.Module):
    """Each backbone map to `out_channels` by one `kernel_size` conv, plus extra stride-2 3x3 levels.

    `__call__(inputs, *, train) -> tuple` of `num_outs` maps `(B, H_i, W_i, out_channels)`: output i < len(inputs)
    is `convs.{i}(inputs[i])`; the first extra level is `extra_convs.0(inputs[-1])` (3x3, stride 2, padding 1)
    and each further one `extra_convs.{j}` of the previous output. DINO's (and the authors' configs'):
    `kernel_size=1`, `norm='gn'` with 32 groups, no activation, so no conv bias (mmcv's `bias='auto'`);
    mmdet's init (xavier-uniform conv weights, zero biases; GroupNorm weight 1, bias 0).
    """

    out_channels: int = 256
    kernel_size: int = 1
    num_outs: int = 4  # DINO's (mmdet's default: one output per input)
    norm: Union[bool, str] = "gn"
    num_groups: int = 32
    act: Union[bool, str] = False
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    def used_levels(self, num_inputs: int) -> range:
        """Every input is used (the `FPN` neck's interface, for naming the levels)."""
        if self.num_outs < num_inputs:
            raise ValueError(f"ChannelMapper: num_outs={self.num_outs} is fewer than its {num_inputs} inputs")
        return range(num_inputs)

    def _conv(self, name: str, kernel_size: int, stride: int = 1) -> ConvModule:
        return ConvModule(self.out_channels, kernel_size, stride=stride, norm=self.norm, num_groups=self.num_groups,
                          act=self.act, kernel_init=xavier_uniform, bias_init=nn.initializers.zeros,
                          dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    @nn.compact
    def __call__(self, inputs: Sequence[Array], *, train: bool) -> tuple[Array, ...]:
        if not isinstance(inputs, (list, tuple)) or not inputs:
            raise ValueError(f"ChannelMapper: expected a non-empty list of NHWC maps, got {type(inputs).__name__}")
        for i, x in enumerate(inputs):
            check_nhwc(x, who=f"ChannelMapper input {i}")
        self.used_levels(len(inputs))
        outs = [self._conv(f"convs.{i}", self.kernel_size)(x, train=train) for i, x in enumerate(inputs)]
        for j in range(self.num_outs - len(inputs)):
            outs.append(self._conv(f"extra_convs.{j}", 3, stride=2)(inputs[-1] if j == 0 else outs[-1], train=train))
        return tuple(outs)
