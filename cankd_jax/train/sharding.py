"""Where arrays live: the device mesh, parameter layouts, and the global batch.

One mesh axis, `data`, over every device of every process. The batch is split
along it; parameters and optimizer state are replicated, or (`ParamLayout(fsdp=True)`,
the config's `mesh.fsdp`) each array of at least `min_size` elements is split
along its largest axis that the axis size divides, so a large teacher or student
fits. Either way XLA (GSPMD) inserts the collectives, and the numbers equal a
single-device run's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cankd_jax.config_arg import is_count

DATA = "data"


def make_mesh(devices: Optional[list] = None) -> Mesh:
    """A 1-D `data` mesh over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """How parameters, optimizer state and statistics are laid out: replicated, or spread (FSDP).

    `min_size`: arrays with fewer elements stay replicated (spreading them
    costs more in collectives than it saves in memory).
    """

    fsdp: bool = False
    min_size: int = 2**16

    @classmethod
    def from_config(cls, mesh_cfg: Optional[Mapping[str, Any]]) -> ParamLayout:
        """From a config's `mesh` block: `fsdp` (bool) and optionally `fsdp_min_size`."""
        mesh_cfg = dict(mesh_cfg or {})
        unknown = sorted(set(mesh_cfg) - {"fsdp", "fsdp_min_size"})
        if unknown:
            raise ValueError(f"unknown mesh config key(s) {', '.join(unknown)}; known: fsdp, fsdp_min_size")
        min_size = mesh_cfg.get("fsdp_min_size", cls.min_size)
        if not is_count(min_size, 0):
            raise ValueError(f"mesh.fsdp_min_size must be an integer >= 0 (arrays of at least this many elements are "
                             f"spread), got {min_size!r}")
        return cls(bool(mesh_cfg.get("fsdp", False)), int(min_size))


REPLICATED = ParamLayout()


def param_sharding(x: Any, mesh: Mesh, layout: ParamLayout = REPLICATED) -> NamedSharding:
    """Sharding for one parameter-like array (anything with `.shape`)."""
    n = mesh.shape[DATA]
    shape = tuple(getattr(x, "shape", ()))
    if not layout.fsdp or n == 1 or math.prod(shape) < layout.min_size:
        return replicated(mesh)
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % n == 0:
            spec = [None] * len(shape)
            spec[axis] = DATA
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def tree_shardings(tree: Any, mesh: Mesh, layout: ParamLayout = REPLICATED) -> Any:
    """Shardings for a pytree of arrays or `ShapeDtypeStruct`s (e.g. from `jax.eval_shape`)."""
    return jax.tree.map(lambda x: param_sharding(x, mesh, layout), tree)


def check_global_batch(global_batch: int, mesh: Mesh) -> int:
    """The per-process batch; a clear error if the global batch cannot be split evenly."""
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    if global_batch <= 0:
        raise ValueError(f"batch_size={global_batch} must be positive: a multiple of the {n_dev} devices "
                         f"(--config.batch_size={n_dev})")
    if global_batch % n_dev:
        raise ValueError(
            f"batch_size={global_batch} is not divisible by the {n_dev} devices; "
            f"use a multiple of {n_dev} (--config.batch_size={max(n_dev, global_batch // n_dev * n_dev)})"
        )
    return global_batch // n_proc


def process_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
    """`(r0, r1)`: the rows of a `(global_batch, ...)` array that this process's devices hold.

    The input pipeline reads exactly these rows of every global batch, so the
    global array assembled by `global_batch` is the same whatever the topology.
    """
    check_global_batch(global_batch, mesh)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    rows = sorted({r for index in index_map.values() for r in range(*index[0].indices(global_batch))})
    if rows != list(range(rows[0], rows[-1] + 1)):
        raise ValueError(f"process {jax.process_index()}'s devices hold rows {rows} of the batch, not one block; "
                         "order the mesh's devices by process")
    return rows[0], rows[-1] + 1


def global_batch(local: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
    """This process's rows of the batch (`process_rows`) -> global arrays sharded along `data`.

    `local` is a dict of arrays, possibly nested (a detection label is a dict of arrays).
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v)), local)
