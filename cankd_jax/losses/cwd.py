"""CWD: channel-wise distillation (mmrazor's `ChannelWiseDivergence`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cankd_jax.losses.checks import check_feature_pair


class CWDLoss(nn.Module):
    """Per channel, a softmax over the H*W positions at temperature `tau`;
    loss = loss_weight * tau^2 * sum over (B, C) of KL(p_t || p_s) / (B * C).

    Inputs `(B, H, W, C)`, same shape (often logits or the last feature map).
    """

    tau: float = 1.0
    loss_weight: float = 1.0

    def __post_init__(self):
        if self.tau <= 0:
            raise ValueError(f"CWDLoss: tau must be positive, got {self.tau}")
        super().__post_init__()

    @nn.compact
    def __call__(self, student: jax.Array, teacher: jax.Array, *, train: bool = True) -> jax.Array:
        del train
        check_feature_pair(student, teacher, loss="CWDLoss")
        b, h, w, c = student.shape
        # (B, H, W, C) -> (B, C, H*W): the distribution of each channel over positions.
        to_rows = lambda x: jnp.transpose(x.astype(jnp.float32), (0, 3, 1, 2)).reshape(b, c, h * w)  # noqa: E731
        log_p_s = jax.nn.log_softmax(to_rows(student) / self.tau, axis=-1)
        log_p_t = jax.nn.log_softmax(to_rows(jax.lax.stop_gradient(teacher)) / self.tau, axis=-1)
        kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s))
        return self.loss_weight * (self.tau**2) * kl / (b * c)
