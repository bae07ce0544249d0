"""Image classification: softmax cross-entropy, evaluated by top-1 accuracy from summed counts."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cankd_jax.train.tasks.base import _SummedCounts


def classification_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy. `logits (B, K)`, `labels (B,)` int."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels.astype(jnp.int32)[:, None], axis=-1))


@dataclasses.dataclass(frozen=True)
class ClassificationTask(_SummedCounts):
    """Softmax cross-entropy on `logits`, evaluated by top-1 accuracy."""

    num_classes: int
    metric: str = "top1"

    def loss(self, outputs: Mapping[str, jax.Array], labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        ce = classification_cross_entropy(outputs["logits"], labels)
        return ce, {"ce": ce}

    def eval_outputs(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, Any]) -> jax.Array:
        """`(2,)` int32: correct top-1 predictions and real examples in the batch."""
        valid = batch["valid"]
        correct = (jnp.argmax(outputs["logits"], -1) == batch["label"]) & valid
        return jnp.stack([jnp.sum(correct), jnp.sum(valid)]).astype(jnp.int32)

    def summarize(self, counts: np.ndarray) -> dict[str, float]:
        return {"top1": float(counts[0] / max(counts[1], 1))}
