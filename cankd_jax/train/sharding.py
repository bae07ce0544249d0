"""Where arrays live: the device mesh, parameter layouts, and the global batch.

One mesh axis, `data`, over every device of every process. The batch is split
along it; parameters and optimizer state are replicated, or (`fsdp=True`) each
array of at least `fsdp_min_size` elements is split along its largest axis
that the axis size divides, so a large teacher or student fits. Either way XLA
(GSPMD) inserts the collectives, and the numbers equal a single-device run's.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(devices: Optional[list] = None) -> Mesh:
    """A 1-D `data` mesh over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_sharding(x: Any, mesh: Mesh, *, fsdp: bool, fsdp_min_size: int = 2**16) -> NamedSharding:
    """Sharding for one parameter-like array (anything with `.shape`)."""
    n = mesh.shape[DATA]
    shape = tuple(getattr(x, "shape", ()))
    if not fsdp or n == 1 or math.prod(shape) < fsdp_min_size:
        return replicated(mesh)
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % n == 0:
            spec = [None] * len(shape)
            spec[axis] = DATA
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def tree_shardings(tree: Any, mesh: Mesh, *, fsdp: bool = False) -> Any:
    """Shardings for a pytree of arrays or `ShapeDtypeStruct`s (e.g. from `jax.eval_shape`)."""
    return jax.tree.map(lambda x: param_sharding(x, mesh, fsdp=fsdp), tree)


def check_global_batch(global_batch: int, mesh: Mesh) -> int:
    """The per-process batch; a clear error if the global batch cannot be split evenly."""
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    if global_batch % n_dev:
        raise ValueError(
            f"batch_size={global_batch} is not divisible by the {n_dev} devices; "
            f"use a multiple of {n_dev} (--config.batch_size={max(n_dev, global_batch // n_dev * n_dev)})"
        )
    return global_batch // n_proc


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of the batch -> global arrays sharded along `data`."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
