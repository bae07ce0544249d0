"""Which parameters the optimizer may touch: frozen stages, frozen teachers.

Freezing is a property of the optimizer, not of the gradient: a frozen
parameter must not move under weight decay or momentum either. So each network
names its frozen parameters by state-dict prefix (`frozen_prefixes()`), and
these helpers turn prefixes into the label pytree `optax.multi_transform`
takes (labels, not an `optax.masked` mask: `masked` passes the updates of
masked-out leaves through untouched, which would apply raw gradients):

    labels = frozen_param_labels(model, params)
    tx = optax.multi_transform({"trainable": sgd, "frozen": optax.set_to_zero()}, labels)

A parameter's key is its path joined with dots, e.g.
`backbone.layer1.0.conv1.kernel` (the PyTorch key with Flax's leaf name).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

PyTree = Any
FROZEN, TRAINABLE = "frozen", "trainable"
ALL = ("",)  # the prefix of every key: a fully frozen network (the teacher)


def frozen_prefixes(model: Any) -> tuple[str, ...]:
    """The model's frozen state-dict prefixes (`model.frozen_prefixes()`), or () if it has none."""
    method = getattr(model, "frozen_prefixes", None)
    return tuple(method()) if callable(method) else ()


def dotted_key(path) -> str:
    """A pytree key path as a dotted name (`backbone.layer1.0.conv1.kernel`)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return ".".join(parts)


def _is_frozen(key: str, prefixes: Sequence[str]) -> bool:
    return any(key.startswith(p) for p in prefixes)


def param_labels(params: PyTree, frozen: Sequence[str]) -> PyTree:
    """`'frozen'` / `'trainable'` per leaf of `params`, by dotted-key prefix (`ALL` freezes everything)."""
    frozen = tuple(frozen)
    return jax.tree_util.tree_map_with_path(
        lambda p, _: FROZEN if _is_frozen(dotted_key(p), frozen) else TRAINABLE, params)


def frozen_param_labels(model: Any, params: PyTree) -> PyTree:
    """`param_labels(params, frozen_prefixes(model))`: labels for `optax.multi_transform`."""
    return param_labels(params, frozen_prefixes(model))
