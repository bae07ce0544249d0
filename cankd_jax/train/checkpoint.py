"""Orbax checkpoints behind one small interface: save, restore the newest good one, wait.

A checkpoint holds two items: `state` (the train state pytree: params, optimizer
state, batch statistics, step, RNG) and `data` (a JSON dict: the input
pipeline's position and anything else the loop needs to resume exactly).
Restoring places the arrays directly into the shardings of a target (the new
run's mesh, and its number of processes, may differ from the one that saved).
Every process restores the same step, chosen by process 0: a newest
checkpoint that process 0 cannot restore (corrupt, or cut short by a crash) is
skipped by all with a warning and the previous one is tried; one that process 0
can read but another process cannot stops every process with an error naming them.
A skipped checkpoint is set aside (renamed `<step>.unreadable`, by process 0, all
processes waiting for it), so the run that trains on from an older one saves that
step again in its place; the unreadable files stay for a person to look at.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from cankd_jax.train.distributed import ProcessesDisagree, barrier, broadcast_bytes, each_process

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
        # Orbax's array writer refuses a relative path (at the first save, from deep inside tensorstore): a
        # `--workdir runs/x` is taken relative to where the process started, as users mean it.
        directory = os.path.abspath(directory)
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
        Collective: every process calls it and gets the same step.
        """
        abstract = jax.tree.map(_abstract, target)
        unreadable: list[int] = []
        try:
            for step in _broadcast_steps(sorted(self._mngr.all_steps(), reverse=True)):
                self._check_same_state(step, abstract)
                out, error = None, ""
                try:
                    # The items' handlers directly, not the manager: its restore ends in a barrier that a process
                    # whose restore failed never reaches, so the processes could not then compare notes.
                    handler = ocp.CompositeCheckpointHandler()
                    out = handler.restore(
                        self._mngr.directory / str(step),
                        ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
                except Exception as e:  # noqa: BLE001 - any failure means: this one is unusable here
                    error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                ok = each_process(out is not None)
                if ok.all():
                    return step, out["state"], dict(out["data"])
                if not ok[0]:
                    log.warning("checkpoint at step %d in %s cannot be restored (%s); trying an older one",
                                step, self.directory, error or "on process 0")
                    unreadable.append(step)
                    continue
                bad = [int(i) for i in np.flatnonzero(~ok)]
                raise ProcessesDisagree(f"checkpoint at step {step} in {self.directory} restores on process 0 but "
                                        f"not on process(es) {bad}" + (f": {error}" if error else " (see their logs)")
                                        + "; every process must see the same checkpoint directory")
            return None
        finally:
            if unreadable:
                self._set_aside(unreadable)

    def _check_same_state(self, step: int, abstract: Any) -> None:
        """Raise `CheckpointMismatch` (every process) when step `step` holds another train state than `abstract`:
        other array paths or shapes, read from its metadata. A checkpoint whose metadata cannot be read is left to
        the restore, which reports it unreadable."""
        mismatch = ""
        try:
            saved = ocp.StandardCheckpointHandler().metadata(self._mngr.directory / str(step) / "state")
            mismatch = _state_mismatch(saved, abstract)
        except Exception:  # noqa: BLE001, S110 - damaged metadata: the restore attempt names the damage
            pass
        if each_process(bool(mismatch))[0]:
            raise CheckpointMismatch(
                f"the checkpoint at step {step} in {self.directory} holds another train state than this config "
                f"builds ({mismatch or 'on process 0'}): another model, optimizer or task wrote it. Resume with the "
                "config that wrote it, or give this config a new --workdir")

    def _set_aside(self, steps: list[int]) -> None:
        """Rename each unreadable step's directory to `<step>.unreadable` (process 0; every process waits), so the
        manager no longer lists it and the step can be saved again."""
        if jax.process_index() == 0:
            root = self._mngr.directory  # an etils Path: local or a bucket alike
            for step in steps:
                dest, k = root / f"{step}.unreadable", 1
                while dest.exists():
                    dest, k = root / f"{step}.unreadable{k}", k + 1
                (root / str(step)).rename(dest)
                log.warning("set the unreadable checkpoint of step %d aside as %s", step, dest)
        barrier("checkpoints set aside")
        self._mngr.reload()

    def wait(self) -> None:
        """Block until every asynchronous save has been committed."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


class CheckpointMismatch(ValueError):
    """A workdir's checkpoint holds another train state than the run asks for. Not damage: it is neither skipped
    nor set aside (which would start the run again from step 0 beside another run's files)."""


def _flat_by_path(tree: Any) -> dict[str, Any]:
    """`{'params/student/conv1/kernel': leaf}`: the same names for a dataclass field, a dict key or a list index,
    so the train state and Orbax's metadata of it (nested dicts) compare."""
    def name(k: Any) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    return {"/".join(map(name, path)): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _state_mismatch(saved: Any, abstract: Any) -> str:
    """'' when `saved` (a checkpoint's tree metadata) has the arrays of `abstract` at the same paths with the same
    shapes; otherwise a short account of the difference (up to two examples of each kind)."""
    have, want = _flat_by_path(saved), _flat_by_path(abstract)
    extra = sorted(set(have) - set(want))
    missing = sorted(set(want) - set(have))
    shapes = [f"{k}: saved {tuple(have[k].shape)}, built {tuple(want[k].shape)}" for k in sorted(set(have) & set(want))
              if tuple(getattr(have[k], "shape", ())) != tuple(getattr(want[k], "shape", ()))]
    parts = []
    for what, items in (("of another shape", shapes), ("saved but not built", extra), ("built but not saved", missing)):
        if items:
            parts.append(f"{len(items)} array(s) {what}, e.g. {'; '.join(items[:2])}")
    return "; ".join(parts)


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


def _broadcast_steps(steps: list[int]) -> list[int]:
    """Process 0's list of steps, on every process."""
    return [int(s) for s in np.frombuffer(broadcast_bytes(np.asarray(steps, np.int32).tobytes()), np.int32)]
