"""`top_k` along the last axis that a partitioned (data-parallel) program computes where its rows live.

`jax.lax.top_k` has no partitioning rule in XLA's SPMD partitioners: with its rows split over devices (a batch of
images, each device holding its own) the partitioned program gathers every row to every device first. Faster
R-CNN's proposals and samplers take a top k of each image's ~270k anchors, so on 64 devices each step gathered
17M-element arrays per level (found by `python -m cankd_jax.rehearse`). This `top_k` is the same op with a rule:
the leading axes keep their sharding, the last axis is whole on each device (it is, for per-image rows), and each
device runs `lax.top_k` on its own rows. Same values and indices as `lax.top_k` (ties: the lower index first), on
any number of devices; usable under `vmap` (a batched call is one call on the stacked rows). Not differentiable
(its callers take it of values without gradient: scores under `stop_gradient`, random keys).
"""

from __future__ import annotations

import functools

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

Array = jax.Array


def _rows_sharding(mesh, operand) -> NamedSharding:
    """The operand's sharding with the last axis whole: each device's rows complete."""
    spec = tuple(getattr(operand.sharding, "spec", ()))
    spec = (spec + (None,) * len(operand.shape))[:len(operand.shape)]
    return NamedSharding(mesh, P(*spec[:-1], None))


@functools.cache
def _top_k(k: int):
    @custom_partitioning
    def partitioned(x):
        return jax.lax.top_k(x, k)

    def infer(mesh, arg_shapes, result_shape):
        s = _rows_sharding(mesh, arg_shapes[0])
        return [s, s]

    def partition(mesh, arg_shapes, result_shape):
        s = _rows_sharding(mesh, arg_shapes[0])
        return mesh, lambda x: jax.lax.top_k(x, k), [s, s], (s,)

    def rule(mesh, arg_shapes, result_shape):
        rows = " ".join(f"r{i}" for i in range(len(arg_shapes[0].shape) - 1))
        return f"{rows} n -> {rows} k, {rows} k"

    partitioned.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule)

    @jax.custom_batching.custom_vmap
    def batched(x):
        return partitioned(x)

    @batched.def_vmap
    def _(axis_size, in_batched, x):  # noqa: ARG001 - the batch axis (0) is one more row axis
        return batched(x), [in_batched[0], in_batched[0]]

    return batched


def top_k(x: Array, k: int) -> tuple[Array, Array]:
    """`jax.lax.top_k(x, k)`: the `k` largest values along the last axis of `x (..., n)` and their int32 indices,
    each `(..., k)`, largest first, ties to the lower index; partitioned along the leading axes (module docstring)."""
    if not 0 <= k <= x.shape[-1]:
        raise ValueError(f"top_k: k={k} for an axis of {x.shape[-1]}")
    values, indices = _top_k(int(k))(x)
    return values, indices
