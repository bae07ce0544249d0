"""Held-out evaluation: a network over the whole eval split, each example once, metrics by the task."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from cankd_jax.train.sharding import global_batch
from cankd_jax.train.tasks import Task

PyTree = Any


def make_evaluator(task: Task, data: Any, mesh: Mesh) -> Callable[[nn.Module, PyTree], dict[str, float]]:
    """`evaluate(network, variables) -> metrics` over `data.eval_iterator(mesh)`.

    Each batch's counts (`task.counts`, jitted once per network, sharded like
    the training batch) are summed on the host in int64, so the result does not
    depend on the batch split or the number of devices and processes.
    """
    cache: dict[int, Callable] = {}

    def evaluate(network: nn.Module, variables: PyTree) -> dict[str, float]:
        if id(network) not in cache:
            @jax.jit
            def counts(variables, batch):
                out = network.apply(variables, batch["image"], train=False)
                return task.counts(out, batch["label"], batch["valid"])

            cache[id(network)] = counts
        total = None
        for local in data.eval_iterator(mesh):
            c = np.asarray(jax.device_get(cache[id(network)](variables, global_batch(local, mesh))), np.int64)
            total = c if total is None else total + c
        return task.summarize(total)

    return evaluate
