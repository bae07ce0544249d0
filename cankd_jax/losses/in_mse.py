""""IN only": CanKD's matching term with no non-local block (the ablation that isolates the cross-attention).

    loss = loss_weight * mean((IN(S) - IN(T))^2) / 2

IN is instance norm without affine parameters (per sample and channel over H, W;
biased variance, eps 1e-5), the mean runs over every element, and the /2 is the
reference's, exactly as in `CanKDLoss`. With CanKD's zero-initialised W BatchNorm,
`CanKDLoss` at initialisation computes this same number; this loss stays there.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cankd_jax.layers import instance_norm
from cankd_jax.losses.checks import check_feature_pair


class INMSELoss(nn.Module):
    """Instance-normalised MSE of two NHWC maps of the same shape (lift a narrower student with `Connector`).

    Fields: `loss_weight` multiplies the halved MSE, as CanKD's does (10 = an effective 5).
    """

    loss_weight: float = 1.0

    @property
    def effective_weight(self) -> float:
        return self.loss_weight / 2.0

    @nn.compact
    def __call__(self, student: jax.Array, teacher: jax.Array, *, train: bool = True) -> jax.Array:
        del train
        check_feature_pair(student, teacher, loss="INMSELoss")
        d = instance_norm(student) - instance_norm(jax.lax.stop_gradient(teacher))
        return self.loss_weight * jnp.mean(jnp.square(d)) / 2.0
