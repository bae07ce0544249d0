"""AT: attention transfer (mmrazor's `ATLoss`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cankd_jax.losses.checks import check_feature_pair


def attention_map(x: jax.Array) -> jax.Array:
    """`(B, H, W, C) -> (B, H*W)`: the channel mean of x^2, L2-normalised per sample (eps 1e-12)."""
    a = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1).reshape(x.shape[0], -1)
    return a / jnp.maximum(jnp.linalg.norm(a, axis=1, keepdims=True), 1e-12)


class ATLoss(nn.Module):
    """loss_weight * mean((A(s) - A(t))^2) with `attention_map` as A.

    Inputs `(B, H, W, C_s)` and `(B, H, W, C_t)`: the channel counts may differ.
    """

    loss_weight: float = 1.0

    @nn.compact
    def __call__(self, student: jax.Array, teacher: jax.Array, *, train: bool = True) -> jax.Array:
        del train
        check_feature_pair(student, teacher, loss="ATLoss", same_channels=False)
        d = attention_map(student) - attention_map(jax.lax.stop_gradient(teacher))
        return self.loss_weight * jnp.mean(jnp.square(d))
