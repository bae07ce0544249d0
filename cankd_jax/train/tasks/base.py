"""What every task gives the train step and the evaluator (`Task`), and the count-summing `accumulate`."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol

import jax
import numpy as np


class Task(Protocol):
    """What the train step and the evaluator need from a task.

    `loss(outputs, labels) -> (total, terms)`: float32 scalars, under jit.
    `eval_outputs(outputs, batch) -> pytree`: what evaluation keeps of one eval
      batch (under jit; `batch['valid'] (B,)` marks real examples), e.g. a confusion
      matrix or the decoded detections; it reaches the host replicated, on every process.
    `accumulate(total, outputs) -> total`: folds one batch's host outputs into the running
      total (`total` is None for the first batch); the same on every process.
    `summarize(total) -> {name: float}`: the metrics, `metric` among them (the headline).
    """

    metric: str

    def loss(self, outputs: Mapping[str, jax.Array], labels: Any) -> tuple[jax.Array, dict[str, jax.Array]]: ...

    def eval_outputs(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, Any]) -> Any: ...

    def accumulate(self, total: Any, outputs: Any) -> Any: ...

    def summarize(self, total: Any) -> dict[str, float]: ...


class _SummedCounts:
    """`accumulate` for tasks whose eval outputs are integer counts: a sum in int64 on the host."""

    def accumulate(self, total: Optional[np.ndarray], outputs: np.ndarray) -> np.ndarray:
        outputs = np.asarray(outputs, np.int64)
        return outputs if total is None else total + outputs
