"""The train state, and building it directly in its sharded layout."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from cankd_jax.train.sharding import replicated, tree_shardings

Array = jax.Array
PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a step changes, and so everything a checkpoint holds (besides the data position).

    params / batch_stats: `{'student': ..., 'distill': {term: {'loss': ..., 'connector': ...}}}`.
    rng: raw key data (`jax.random.key_data`), so it saves like any other array.
    """

    step: Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    rng: Array


def state_shardings(abstract_state: TrainState, mesh: Mesh, *, fsdp: bool) -> TrainState:
    """Shardings for every leaf: params, stats and optimizer state by `tree_shardings`; step and RNG replicated."""
    return TrainState(
        step=replicated(mesh),
        params=tree_shardings(abstract_state.params, mesh, fsdp=fsdp),
        batch_stats=tree_shardings(abstract_state.batch_stats, mesh, fsdp=fsdp),
        opt_state=tree_shardings(abstract_state.opt_state, mesh, fsdp=fsdp),
        rng=replicated(mesh),
    )


def create_sharded_state(
    init_variables: Callable[[Array], tuple[PyTree, PyTree]],
    tx: optax.GradientTransformation,
    seed: int,
    mesh: Mesh,
    *,
    fsdp: bool = False,
) -> tuple[TrainState, TrainState]:
    """`(state, shardings)`: the state initialised inside one jit, straight into its shardings.

    `init_variables(key) -> (params, batch_stats)`. Nothing is materialised
    unsharded first, so a model bigger than one device's memory still starts.
    """

    def init() -> TrainState:
        key = jax.random.key(seed)
        init_key, state_key = jax.random.split(key)
        params, batch_stats = init_variables(init_key)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=tx.init(params),
            rng=jax.random.key_data(state_key),
        )

    shardings = state_shardings(jax.eval_shape(init), mesh, fsdp=fsdp)
    return jax.jit(init, out_shardings=shardings)(), shardings
