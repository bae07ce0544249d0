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
    Optional: `apply_kwargs(data, *, train, key) -> dict`, keyword arguments for the network's call (the labels in
      training with a sampling key, the eval batch otherwise; `task_apply_kwargs`).
    """

    metric: str

    def loss(self, outputs: Mapping[str, jax.Array], labels: Any) -> tuple[jax.Array, dict[str, jax.Array]]: ...

    def eval_outputs(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, Any]) -> Any: ...

    def accumulate(self, total: Any, outputs: Any) -> Any: ...

    def summarize(self, total: Any) -> dict[str, float]: ...


def task_apply_kwargs(task: Any, data: Any, *, train: bool, key: Optional[jax.Array] = None) -> dict[str, Any]:
    """The keyword arguments a task adds to the network's call: `task.apply_kwargs(...)` if it has one (two-stage
    detection: the RoI sampler), else none. `data`: the batch's labels in training, the eval batch otherwise."""
    method = getattr(task, "apply_kwargs", None)
    return dict(method(data, train=train, key=key)) if callable(method) else {}


class _SummedCounts:
    """`accumulate` for tasks whose eval outputs are integer counts: a sum in int64 on the host."""

    def accumulate(self, total: Optional[np.ndarray], outputs: np.ndarray) -> np.ndarray:
        outputs = np.asarray(outputs, np.int64)
        return outputs if total is None else total + outputs
