"""The train state, and building it directly in its sharded layout."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from cankd_jax.train.sharding import REPLICATED, ParamLayout, replicated, tree_shardings

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


def state_shardings(abstract_state: TrainState, mesh: Mesh, layout: ParamLayout = REPLICATED) -> TrainState:
    """Shardings for every leaf: params, stats and optimizer state by `tree_shardings`; step and RNG replicated."""
    return TrainState(
        step=replicated(mesh),
        params=tree_shardings(abstract_state.params, mesh, layout),
        batch_stats=tree_shardings(abstract_state.batch_stats, mesh, layout),
        opt_state=tree_shardings(abstract_state.opt_state, mesh, layout),
        rng=replicated(mesh),
    )


class StatePlan(NamedTuple):
    """How a run's train state comes to be: `init()` builds it, in `shardings`; `abstract` is its shapes
    and dtypes with those shardings (a restore target), known without computing anything."""

    init: Callable[[], TrainState]
    shardings: TrainState
    abstract: TrainState


def plan_state(
    init_variables: Callable[[Array], tuple[PyTree, PyTree]],
    tx: optax.GradientTransformation,
    seed: int,
    mesh: Mesh,
    *,
    layout: ParamLayout = REPLICATED,
) -> StatePlan:
    """The state's layout, and its initialisation inside one jit, straight into its shardings.

    `init_variables(key) -> (params, batch_stats)`. Nothing is materialised
    unsharded first, so a model bigger than one device's memory still starts;
    a run that restores a checkpoint never initialises at all.
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

    shapes = jax.eval_shape(init)
    shardings = state_shardings(shapes, mesh, layout)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
    return StatePlan(lambda: run_once(init, out_shardings=shardings), shardings, abstract)


def run_once(fn: Callable[[], Any], *, out_shardings: Any) -> Any:
    """`fn()` compiled into `out_shardings`, for work done once per run (initialisation).

    On CPU it is compiled without LLVM optimisation: an init's compile is almost
    all random-number code, which this makes about 8x faster to compile (82 s ->
    10 s for the smoke student on this project's 2-core machine), and running it
    once costs nothing. The values are deterministic and the same on every
    topology; they may differ in the last bit from an optimised compile's.
    """
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return jax.jit(fn, out_shardings=out_shardings).lower().compile(compiler_options=options)()
