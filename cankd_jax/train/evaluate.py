"""Held-out evaluation: a network over the whole eval split, each example once, metrics by the task."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
from jax.sharding import Mesh

from cankd_jax.train.compiled import CompiledPerShape
from cankd_jax.train.sharding import global_batch, replicated
from cankd_jax.train.tasks import Task
from cankd_jax.train.tasks.base import task_apply_kwargs

PyTree = Any


def make_evaluator(task: Task, data: Any, mesh: Mesh) -> Callable[[nn.Module, PyTree], dict[str, float]]:
    """`evaluate(network, variables) -> metrics` over `data.eval_iterator(mesh)`.

    Each batch's `task.eval_outputs` (jitted once per network, the batch sharded
    like the training batch, the result replicated) is folded into a total on
    the host by `task.accumulate`, identically on every process, so the result
    does not depend on the batch split or the number of devices and processes.
    """
    cache: dict[int, Callable] = {}
    out_sharding = replicated(mesh)

    def evaluate(network: nn.Module, variables: PyTree) -> dict[str, float]:
        if id(network) not in cache:
            def outputs(variables, batch):
                kwargs = task_apply_kwargs(task, batch, train=False)  # Faster R-CNN: its test proposals
                return task.eval_outputs(network.apply(variables, batch["image"], train=False, **kwargs), batch)

            cache[id(network)] = CompiledPerShape(jax.jit(outputs, out_shardings=out_sharding),
                                                  what="evaluation", key_argnums=(1,))
        total = None
        for local in data.eval_iterator(mesh):
            total = task.accumulate(total, jax.device_get(cache[id(network)](variables, global_batch(local, mesh))))
        return task.summarize(total)

    return evaluate
