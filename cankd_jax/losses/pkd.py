"""PKD: Pearson-correlation feature distillation (mmrazor's `PKDLoss`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cankd_jax.layers import resize_bilinear
from cankd_jax.losses.checks import check_feature_pair


def pkd_normalize(x: jax.Array) -> jax.Array:
    """Per channel, over (B, H, W): (x - mean) / (unbiased std + 1e-6). `(B,H,W,C)`, float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=(0, 1, 2), keepdims=True)
    std = jnp.std(x, axis=(0, 1, 2), keepdims=True, ddof=1)
    return (x - mean) / (std + 1e-6)


class PKDLoss(nn.Module):
    """loss_weight * mean((n(s) - n(t))^2) / 2 with `pkd_normalize` as n.

    Inputs `(B, H, W, C)` with equal C. Where the spatial sizes differ, the
    student is resized to the teacher's (`resize_stu=True`) or the teacher to
    the student's, bilinearly. The paper's configs sum one PKD term per FPN level
    with weights 6-10; here each level is its own loss, summed by the trainer.
    """

    loss_weight: float = 1.0
    resize_stu: bool = True

    @nn.compact
    def __call__(self, student: jax.Array, teacher: jax.Array, *, train: bool = True) -> jax.Array:
        del train
        check_feature_pair(student, teacher, loss="PKDLoss", same_spatial=False)
        teacher = jax.lax.stop_gradient(teacher)
        if student.shape[1:3] != teacher.shape[1:3]:
            if self.resize_stu:
                student = resize_bilinear(student, teacher.shape[1:3])
            else:
                teacher = resize_bilinear(teacher, student.shape[1:3])
        d = pkd_normalize(student) - pkd_normalize(teacher)
        return self.loss_weight * jnp.mean(jnp.square(d)) / 2.0
