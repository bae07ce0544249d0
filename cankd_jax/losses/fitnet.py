"""FitNet / L2 feature loss (mmrazor's `L2Loss`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cankd_jax.losses.checks import check_feature_pair


def _l2_normalize_per_sample(x: jax.Array, mult: float) -> jax.Array:
    flat = x.reshape(x.shape[0], -1)
    return flat / jnp.linalg.norm(flat, axis=1, keepdims=True) * mult


class L2Loss(nn.Module):
    """loss_weight * sum((s - t)^2) / B, on per-sample L2-normalised maps by default.

    Inputs `(B, H, W, C)`, same shape (use a `Connector` first for FitNet hints
    of another width). Fields as mmrazor: `normalize` (flatten each sample and
    divide by its L2 norm, times `mult`), `div_element` (divide by the element
    count instead of B), `dist` (instead of dividing: the 2-norm of the whole
    difference, `sqrt(sum((s - t)^2))`, i.e. `torch.dist(s, t, p=2)`).
    """

    loss_weight: float = 1.0
    normalize: bool = True
    mult: float = 1.0
    div_element: bool = False
    dist: bool = False

    @nn.compact
    def __call__(self, student: jax.Array, teacher: jax.Array, *, train: bool = True) -> jax.Array:
        del train
        check_feature_pair(student, teacher, loss="L2Loss")
        s = student.astype(jnp.float32)
        t = jax.lax.stop_gradient(teacher).astype(jnp.float32)
        if self.normalize:
            s, t = _l2_normalize_per_sample(s, self.mult), _l2_normalize_per_sample(t, self.mult)
        loss = jnp.sum(jnp.square(s - t))
        if self.dist:
            loss = jnp.sqrt(loss)
        else:
            loss = loss / (student.size if self.div_element else student.shape[0])
        return self.loss_weight * loss
