"""Orbax checkpoints behind one small interface: save, restore the newest good one, wait.

A checkpoint holds two items: `state` (the train state pytree: params, optimizer
state, batch statistics, step, RNG) and `data` (a JSON dict: the input
pipeline's position and anything else the loop needs to resume exactly).
Restoring places the arrays directly into the shardings of a target (the new
run's mesh may differ from the one that saved). A newest checkpoint that fails
to restore (corrupt, or cut short by a crash) is skipped with a warning and the
previous one is used.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves every call to `save` (the loop decides when), keeps the newest `max_to_keep`.

    Saves are asynchronous where `async_save` (the arrays are copied off the
    devices before `save` returns, so the train state may be donated right after).
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self._mngr = ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))

    @property
    def directory(self) -> str:
        return str(self._mngr.directory)

    def steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def save(self, step: int, state: Any, data: dict[str, Any], *, force: bool = True) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data))
        return self._mngr.save(int(step), args=args, force=force)

    def restore_latest(self, target: Any) -> Optional[tuple[int, Any, dict[str, Any]]]:
        """`(step, state, data)` from the newest checkpoint that restores, or None if none does.

        `target`: a pytree of `jax.ShapeDtypeStruct` with `sharding` (e.g. from
        `jax.eval_shape` plus the shardings of the new mesh), or of arrays.
        """
        abstract = jax.tree.map(_abstract, target)
        for step in sorted(self._mngr.all_steps(), reverse=True):
            try:
                out = self._mngr.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
                )
            except Exception as e:  # noqa: BLE001 - any failure means: this one is unusable
                log.warning("checkpoint at step %d in %s cannot be restored (%s: %s); trying an older one",
                            step, self.directory, type(e).__name__, str(e).splitlines()[0][:200])
                continue
            return step, out["state"], dict(out["data"])
        return None

    def wait(self) -> None:
        """Block until every asynchronous save has been committed."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
