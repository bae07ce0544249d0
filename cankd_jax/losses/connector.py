"""The learned 1x1 connector that lifts a narrower student map to the teacher's channels."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax

from cankd_jax.config_arg import is_count
from cankd_jax.layers import Conv1x1
from cankd_jax.losses.checks import check_rank4


class Connector(nn.Module):
    """1x1 conv `(B, H, W, C_s) -> (B, H, W, out_channels)`, no norm, no activation.

    Init as the paper's segmentation connector: He-normal (fan-out) weights and
    zero bias. It trains with the student; drop it when exporting the student.
    """

    out_channels: int
    use_bias: bool = True
    dtype: Optional[Any] = None  # computation dtype (None: the input's); the parameters stay float32

    def __post_init__(self):
        if not is_count(self.out_channels, 1):
            raise ValueError(f"Connector: out_channels must be a positive integer, got {self.out_channels!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_rank4(x, what="student", loss="Connector")
        he_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
        return Conv1x1(
            self.out_channels, use_bias=self.use_bias, kernel_init=he_fan_out, bias_init=nn.initializers.zeros,
            dtype=self.dtype, name="conv",
        )(x)
