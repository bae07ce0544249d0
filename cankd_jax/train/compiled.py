"""Jitted functions compiled ahead of their first run: once per input shape, by every process before any runs it.

JAX compiles a jitted function at its first call. In a multi-process job each
process compiles on its own, and under load one can finish tens of seconds before
another; its first collective then waits for the others, and JAX's CPU
collectives give up after 30 s. So the train step and the evaluation functions
are lowered and compiled explicitly, every process meets at a barrier, and only
then does any of them run. The same mechanism bounds the compilations: a batch of
a shape beyond the data's known shapes is an error, not a silent compile per step.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax

from cankd_jax.train.distributed import barrier


class RecompileError(RuntimeError):
    """A batch of a shape the run did not expect, which would cost a new compilation."""


def _signature(tree: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x)))) for x in leaves)


class CompiledPerShape:
    """`fn(*args)` through `jitted`, compiled once per shape of the arguments at `key_argnums`.

    `max_shapes`: how many shapes may be compiled (None: any); one more raises
    `RecompileError` naming the shapes.
    """

    def __init__(self, jitted: Callable, *, what: str, key_argnums: Sequence[int], max_shapes: Optional[int] = None):
        self._jitted, self._what, self._key_argnums, self._max = jitted, what, tuple(key_argnums), max_shapes
        self._compiled: dict[tuple, Any] = {}

    def __call__(self, *args: Any) -> Any:
        key = _signature([args[i] for i in self._key_argnums])
        compiled = self._compiled.get(key)
        if compiled is None:
            if self._max is not None and len(self._compiled) >= self._max:
                raise RecompileError(f"the {self._what} would be compiled again for inputs of shapes {key[1]}; "
                                     f"{self._max} input shape(s) expected, every batch must keep them")
            compiled = self._jitted.lower(*args).compile()
            barrier(f"compiled {self._what}")
            self._compiled[key] = compiled
        return compiled(*args)
