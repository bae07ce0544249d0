"""MGD: masked generative distillation (mmrazor's `MGDConnector` + `MGDLoss`)."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cankd_jax.layers import Conv1x1, torch_bias_init, torch_kernel_init
from cankd_jax.losses.checks import check_feature_pair

MASK_RNG = "mask"


def mgd_keep_mask(rng: jax.Array, shape: tuple[int, int, int], lambda_mgd: float) -> jax.Array:
    """`(B, H, W, 1)` float mask: each pixel is 0 with probability `lambda_mgd`, else 1."""
    b, h, w = shape
    u = jax.random.uniform(rng, (b, h, w, 1))
    return jnp.where(u > 1.0 - lambda_mgd, 0.0, 1.0)


class MGDLoss(nn.Module):
    """alpha_mgd * sum((G(mask * align(s)) - t)^2) / B.

    The student map `(B, H, W, C_s)` is aligned to `teacher_channels` by a 1x1
    conv when the widths differ, every pixel is zeroed with probability
    `lambda_mgd` (0.65 for detection, 0.75 for segmentation), and the generator
    G = conv3x3-ReLU-conv3x3 must reproduce the teacher map `(B, H, W, C_t)`.

    The mask needs randomness: pass `rng=` or a `'mask'` stream in `apply`'s
    `rngs`. As in the reference, the mask is drawn whenever the loss runs.
    """

    teacher_channels: int
    alpha_mgd: float = 2e-5
    lambda_mgd: float = 0.65

    def __post_init__(self):
        if not 0.0 <= self.lambda_mgd < 1.0:
            raise ValueError(f"MGDLoss: lambda_mgd is a masking probability in [0, 1), got {self.lambda_mgd}")
        super().__post_init__()

    def _conv3x3(self, name: str, c: int) -> nn.Conv:
        return nn.Conv(
            c, (3, 3), padding=((1, 1), (1, 1)), kernel_init=torch_kernel_init, bias_init=torch_bias_init(9 * c), name=name
        )

    @nn.compact
    def __call__(
        self, student: jax.Array, teacher: jax.Array, *, train: bool = True, rng: Optional[jax.Array] = None
    ) -> jax.Array:
        del train
        check_feature_pair(student, teacher, loss="MGDLoss", same_channels=False, in_channels=self.teacher_channels,
                           channels_field="teacher_channels")
        c = self.teacher_channels
        if student.shape[-1] != c:
            student = Conv1x1(c, name="align")(student)
        if rng is None:
            if not self.has_rng(MASK_RNG):
                raise ValueError("MGDLoss: the random mask needs a key: pass rng=... or rngs={'mask': key} to apply")
            rng = self.make_rng(MASK_RNG)
        masked = student * mgd_keep_mask(rng, student.shape[:3], self.lambda_mgd).astype(student.dtype)
        generated = self._conv3x3("generation_2", c)(nn.relu(self._conv3x3("generation_0", c)(masked)))
        d = generated.astype(jnp.float32) - jax.lax.stop_gradient(teacher).astype(jnp.float32)
        return self.alpha_mgd * jnp.sum(jnp.square(d)) / student.shape[0]
