"""Feature pyramid network with mmdetection's semantics and state-dict names."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from cankd_jax.layers import Dtype
from cankd_jax.models.conv import ConvModule, xavier_uniform
from cankd_jax.models.ops import check_nhwc, resize_nearest

Array = jax.Array

EXTRA_CONV_SOURCES = ("on_input", "on_lateral", "on_output")


class FPN(nn.Module):
    """mmdet's `FPN`: lateral 1x1 convs, top-down nearest upsampling, 3x3 output convs, extra levels.

    `__call__(inputs, *, train) -> tuple` of `num_outs` maps `(B, H_i, W_i,
    out_channels)`. `inputs`: backbone maps, finest first, each half the size
    of the previous one (e.g. ResNet's layer1..layer4 at strides 4..32); levels
    `start_level .. end_level` are used (`end_level=-1`: through the last).
    Output i has the stride of input `start_level + i`; extra outputs (when
    `num_outs` exceeds the used levels) double the stride each:

    - `add_extra_convs=False`: max-pool (kernel 1, stride 2) of the last output
      (Faster R-CNN's P6).
    - `'on_input'` (or `True`) / `'on_lateral'` / `'on_output'`: a 3x3 stride-2
      conv on the last used input / lateral / output, then 3x3 stride-2 convs
      on the previous extra level, with a ReLU before each of those when
      `relu_before_extra_convs` (RetinaNet's P6/P7).

    Upsampling is `F.interpolate(mode='nearest', size=finer size)`, so odd sizes
    (e.g. 800x1333 inputs) follow PyTorch's index rule. No activation on the
    laterals and outputs; no norm by default (mmdet's defaults; convs with
    biases, xavier-uniform weights and zero biases); `norm='gn'` is mmdet's
    `norm_cfg=dict(type='GN', num_groups=32)` (RepPoints' neck): every conv is
    followed by GroupNorm (`.gn`, weight 1, bias 0) and has no bias. Keys: `lateral_convs.{i}.conv.*`,
    `fpn_convs.{i}.conv.*`, the extra convs continuing the `fpn_convs` index.
    """

    out_channels: int = 256
    num_outs: int = 5
    start_level: int = 0
    end_level: int = -1
    add_extra_convs: Union[bool, str] = False
    relu_before_extra_convs: bool = False
    norm: Union[bool, str] = False
    num_groups: int = 32
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        mode = self.add_extra_convs
        if not isinstance(mode, bool) and mode not in EXTRA_CONV_SOURCES:
            raise ValueError(f"FPN: add_extra_convs must be False, True or one of {', '.join(EXTRA_CONV_SOURCES)}; "
                             f"got {mode!r}")
        super().__post_init__()

    @property
    def extra_source(self) -> Optional[str]:
        """Where the first extra conv reads from, or None for max-pool extras (`True` is mmdet's 'on_input')."""
        if self.add_extra_convs is True:
            return "on_input"
        return self.add_extra_convs or None

    def used_levels(self, num_inputs: int) -> range:
        end = num_inputs if self.end_level == -1 else self.end_level + 1
        if not 0 <= self.start_level < end <= num_inputs:
            raise ValueError(f"FPN: start_level={self.start_level}, end_level={self.end_level} do not select "
                             f"levels of the {num_inputs} inputs")
        if self.num_outs < end - self.start_level:
            raise ValueError(f"FPN: num_outs={self.num_outs} is fewer than the {end - self.start_level} levels used")
        return range(self.start_level, end)

    def _conv(self, name: str, stride: int = 1, kernel_size: int = 3) -> ConvModule:
        return ConvModule(self.out_channels, kernel_size, stride=stride, norm=self.norm, num_groups=self.num_groups,
                          act=False,
                          kernel_init=xavier_uniform, bias_init=nn.initializers.zeros,
                          dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    @nn.compact
    def __call__(self, inputs: Sequence[Array], *, train: bool) -> tuple[Array, ...]:
        if not isinstance(inputs, (list, tuple)) or not inputs:
            raise ValueError(f"FPN: expected a non-empty list of NHWC maps, got {type(inputs).__name__}")
        for i, x in enumerate(inputs):
            check_nhwc(x, who=f"FPN input {i}")
        levels = self.used_levels(len(inputs))
        laterals = [self._conv(f"lateral_convs.{i}", kernel_size=1)(inputs[lvl], train=train)
                    for i, lvl in enumerate(levels)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_nearest(laterals[i], laterals[i - 1].shape[1:3])
        outs = [self._conv(f"fpn_convs.{i}")(lat, train=train) for i, lat in enumerate(laterals)]
        n_used = len(outs)
        if self.num_outs > n_used and self.extra_source is None:
            for _ in range(self.num_outs - n_used):
                outs.append(outs[-1][:, ::2, ::2])  # F.max_pool2d(x, 1, stride=2)
        elif self.num_outs > n_used:
            source = {"on_input": inputs[levels[-1]], "on_lateral": laterals[-1], "on_output": outs[-1]}
            outs.append(self._conv(f"fpn_convs.{n_used}", stride=2)(source[self.extra_source], train=train))
            for i in range(n_used + 1, self.num_outs):
                prev = nn.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                outs.append(self._conv(f"fpn_convs.{i}", stride=2)(prev, train=train))
        return tuple(outs)
