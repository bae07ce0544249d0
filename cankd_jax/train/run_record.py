"""What a checkpoint remembers of the run that wrote it, and what a resume checks against it.

Each checkpoint's `data` item holds, beside the input pipeline's position, a record of the run: its config (as
dotted keys) and a fingerprint of the teacher's weights. A resumed run compares its own:

- another teacher (its weights, wherever they were read from) is refused: the state was distilled from the first
  one, and going on would mix two teachers in one result, or report a finished run's figures under a teacher
  that did not produce them (a demo's teacher phase retrained with other settings);
- another value of a key that changes the numbers (the learning rate, `total_steps`, which redraws the schedule,
  a loss weight, ...) is allowed, as a user continuing a run on purpose means it, and logged as a warning that
  names each key with its old and new value. Keys that only change the bookkeeping (how often to log or save,
  the device layout, where the data lie) are not compared.

A checkpoint written before records existed resumes without these checks.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cankd_jax.data import options
from cankd_jax.train.distributed import ProcessesDisagree, config_differences, flat_config

log = logging.getLogger(__name__)
PyTree = Any

# Keys (and key prefixes) that do not change what a run computes: not compared on resume.
BOOKKEEPING = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "evaluate_teacher", "mesh",
               "export", "remat", "data.data_dir", "data.workers", "data.eval_batch_size", "data.index_cache",
               "teacher.checkpoint", "teacher.random_init", "student.pretrained")


class TeacherChanged(ValueError):
    """A workdir's checkpoint was distilled from other teacher weights than the run now loads."""


_MUL = np.uint32(2654435761)  # odd multipliers (Knuth's and xxHash's): every position weighs differently


def _mix(h: np.ndarray) -> np.ndarray:
    """murmur3's finaliser on uint32: every input bit reaches every output bit (a plain weighted sum would be
    linear in the sign bit, so two flipped signs would cancel)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _bits(data: np.ndarray) -> np.ndarray:
    """The elements' bit patterns as uint32 (float32 itself; 8- and 16-bit floats widened; 64-bit values folded)."""
    data = np.ascontiguousarray(data).reshape(-1)
    if jnp.issubdtype(data.dtype, jnp.floating):  # bfloat16 and float8 too (numpy's kind 'V')
        data = data.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[data.dtype.itemsize])
    if data.dtype.itemsize == 8:
        data = data.view(np.uint64)
        return (data & np.uint64(0xFFFFFFFF)).astype(np.uint32) ^ _mix((data >> np.uint64(32)).astype(np.uint32))
    return data.astype(np.uint32)


def _is_whole(index: tuple, shape: tuple) -> bool:
    return all(sl == slice(None) or sl.indices(n) == (0, n, 1) for sl, n in zip(index, shape))


def _words(data: np.ndarray, index: tuple, shape: tuple) -> np.ndarray:
    """`(2,)` uint32: two sums over the elements of `data` (the part `index` of an array of `shape`) of a mix of
    their bit patterns with their position in the whole array."""
    size = int(np.prod(shape, dtype=np.int64))
    pos = (np.arange(size, dtype=np.uint32) if _is_whole(index, shape)
           else np.arange(size, dtype=np.uint32).reshape(shape)[index].reshape(-1))
    bits = _bits(data)
    with np.errstate(over="ignore"):
        return np.array([np.sum(_mix(bits ^ (pos * _MUL)), dtype=np.uint32),
                         np.sum(_mix(bits * np.uint32(2246822519) + pos), dtype=np.uint32)], np.uint32)


def _nonfinite(data: np.ndarray) -> int:
    """How many elements of `data` are NaN or infinite (none in an integer array)."""
    if not jnp.issubdtype(data.dtype, jnp.inexact):  # bfloat16 and float8 too (numpy's kind 'V'), complex
        return 0
    return int(data.size - np.count_nonzero(np.isfinite(data)))


def _hashes(x: Any, *, parts: bool, wholes: bool = True) -> tuple[Optional[np.ndarray], Optional[np.ndarray], int]:
    """`(whole, part, nonfinite)`, each shard read once however many of the three need it:

    - `whole` (when `wholes`): `_words` of this process's own whole copy of `x`, or None where it holds only pieces
      (FSDP);
    - `part` (when `parts`): this process's share of `_words` of all of `x`, the sum over the shards it holds first
      copies of. An array each process holds all of by itself (a host array, or one on this process's devices
      only) counts on process 0 alone. Sums modulo 2**32 do not depend on their order, so the processes' shares
      add up to the same words on any topology and sharding;
    - `nonfinite`: this process's share, over the same shards, of the count of NaN and infinite elements."""
    local = not isinstance(x, jax.Array) or (jax.process_count() > 1 and x.is_fully_addressable)
    counts = not local or jax.process_index() == 0
    if not isinstance(x, jax.Array):
        data = np.asarray(x)
        words = _words(data, (), np.shape(x)) if parts or wholes else None
        bad = _nonfinite(data) if counts else 0
        return (words if wholes else None), ((words if counts else np.zeros(2, np.uint32)) if parts else None), bad
    whole, part, bad = None, np.zeros(2, np.uint32), 0
    for shard in x.addressable_shards:
        is_whole = wholes and _is_whole(shard.index, x.shape)
        first = counts and shard.replica_id == 0
        if first or (is_whole and whole is None):
            data = np.asarray(shard.data)
            words = _words(data, shard.index, x.shape) if (parts and first) or (is_whole and whole is None) else None
            whole = words if is_whole and whole is None else whole
            if first:
                bad += _nonfinite(data)
                if parts:
                    with np.errstate(over="ignore"):
                        part += words
    return whole, part if parts else None, bad


def _compare(flat: list, whole: list, what: str, key: str) -> None:
    """Raise `ProcessesDisagree` on every process when the processes' own whole copies (`whole`, one `_hashes` each
    or None) of the leaves `flat` differ. A collective."""
    from jax.experimental import multihost_utils  # noqa: PLC0415

    held = np.array([w is not None for w in whole])
    words = np.stack([w if w is not None else np.zeros(2, np.uint32) for w in whole])
    every = np.asarray(multihost_utils.process_allgather(words)).reshape(jax.process_count(), len(flat), 2)
    holds = np.asarray(multihost_utils.process_allgather(held)).reshape(jax.process_count(), len(flat))
    compared = holds.all(axis=0)
    differ = (every != every[0]).any(axis=2) & compared  # (processes, leaves)
    bad = [int(p) for p in np.flatnonzero(differ.any(axis=1))]
    if bad:
        example = jax.tree_util.keystr(flat[int(np.flatnonzero(differ.any(axis=0))[0])][0])
        raise ProcessesDisagree(f"the {what} differ between processes: process(es) {bad} hold other values than "
                                f"process 0 (e.g. {example}); every host must read the same {key} file")


class NonFiniteWeights(ValueError):
    """Weights read for a run hold NaN or infinite values: a damaged file, or one saved from a diverged run."""


def _check_finite(flat: list, nonfinite: list[int], what: str, key: str) -> None:
    """Raise `NonFiniteWeights` on every process, naming the arrays, when the leaves `flat` hold NaN or infinite
    values (`nonfinite`: this process's share of each leaf's count, from `_hashes`). A collective. Without it such
    weights surface only as a non-finite loss at the first step, with no word of where it came from."""
    counts = np.minimum(np.asarray(nonfinite, np.int64), np.iinfo(np.int32).max)  # gathered as int32 without x64
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        counts = np.asarray(multihost_utils.process_allgather(counts), np.int64).reshape(jax.process_count(), -1)
        counts = counts.sum(axis=0)
    bad = np.flatnonzero(counts)
    if bad.size:
        named = ", ".join(f"{jax.tree_util.keystr(flat[i][0])}: {counts[i]} of {np.size(flat[i][1])}"
                          for i in bad[:3])
        raise NonFiniteWeights(f"the {what} hold NaN or infinite values in {bad.size} of {len(flat)} arrays "
                               f"({named}{', ...' if bad.size > 3 else ''}): the weights {key} names are damaged or "
                               "were saved from a run that diverged")


def check_weights(variables: Optional[PyTree], what: str, key: str) -> None:
    """Raise on every process when `variables` hold NaN or infinite values (`NonFiniteWeights`), or when the
    processes hold different values (`ProcessesDisagree`: each process places its own host arrays, so hosts that
    read different files, allowed to differ in path, would train against different teachers or from different
    weights, or an FSDP array mixed from both, without a word). Compared across processes: every array each
    process holds whole (replicated ones; FSDP's small ones). A collective."""
    flat = jax.tree_util.tree_leaves_with_path(variables) if variables is not None else []
    if flat:
        hashes = [_hashes(x, parts=False, wholes=jax.process_count() > 1) for _, x in flat]
        if jax.process_count() > 1:
            _compare(flat, [whole for whole, _, _ in hashes], what, key)
        _check_finite(flat, [bad for _, _, bad in hashes], what, key)


def _digest(flat: list, parts: list) -> str:
    words = np.stack(parts)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        with np.errstate(over="ignore"):
            words = np.sum(np.asarray(multihost_utils.process_allgather(words)), axis=0, dtype=np.uint32)
    digest = hashlib.blake2b(digest_size=16)
    for (path, leaf), w in zip(flat, words, strict=True):
        digest.update(f"{jax.tree_util.keystr(path)}{tuple(np.shape(leaf))}{leaf.dtype}".encode())
        digest.update(np.asarray(w, np.uint32).tobytes())
    return digest.hexdigest()


def fingerprint(variables: Optional[PyTree]) -> Optional[str]:
    """A hex digest of `variables`' values, shapes and names (None for no variables: a student trained alone).
    The same weights give the same digest however they are placed or were loaded (a .pth, an export, a copy of
    either); one changed element changes it. On the host, shard by shard: no compiled program (a teacher's
    hundreds of arrays took seconds to compile), and every process ends with the same digest (a collective in a
    multi-process job)."""
    flat = jax.tree_util.tree_leaves_with_path(variables) if variables is not None else []
    return _digest(flat, [_hashes(x, parts=True)[1] for _, x in flat]) if flat else None


def make_record(config: ml_collections.ConfigDict, teacher_variables: Optional[PyTree], *,
                check: bool = False) -> dict[str, Any]:
    """`{'config': {dotted key: value}, 'teacher': fingerprint or None}`: JSON, kept in every checkpoint. `check`:
    first `check_weights` on the teacher, from the same pass over its arrays (a teacher of 60M float32 parameters
    takes about 3 s to hash on the 2-core machine: once, not twice)."""
    flat = jax.tree_util.tree_leaves_with_path(teacher_variables) if teacher_variables is not None else []
    hashes = [_hashes(x, parts=True) for _, x in flat]
    if check and flat:
        if jax.process_count() > 1:
            _compare(flat, [whole for whole, _, _ in hashes], "teacher's weights", "teacher.checkpoint")
        _check_finite(flat, [bad for _, _, bad in hashes], "teacher's weights", "teacher.checkpoint")
    return {"config": flat_config(config), "teacher": _digest(flat, [part for _, part, _ in hashes]) if flat else None}


def with_data_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A dotted config with the `data` keys it lacks at their defaults (this code's tables: the values such a run
    had, as long as the tables have not changed since). A config whose data section does not hold every key (one
    written before `options.data_section`, or by hand) left them to the defaults; a resume must not report them
    as changed settings, on either side."""
    name = config.get("data.name")
    if not isinstance(name, str) or options.ALIASES.get(name, name) not in options.TASKS:
        return config
    return {**flat_config({"data": options.data_section(name)}), **config}


def check_resume(saved: Optional[dict[str, Any]], current: dict[str, Any], *, step: int, where: str) -> list[str]:
    """Raise `TeacherChanged` when the checkpoint at `step` (in `where`) was distilled from other teacher weights;
    return (and log as a warning) the keys whose values changed since it was written. `saved` None: a checkpoint
    from before records, nothing to check."""
    if not saved:
        return []
    before, now = saved.get("teacher"), current.get("teacher")
    if before and now and before != now:
        def source(config: dict) -> str:
            path = config.get("teacher.checkpoint") or ""
            return repr(path) if path else f"a random teacher of seed {config.get('seed')}"

        raise TeacherChanged(
            f"the checkpoint at step {step} in {where} was distilled from other teacher weights than this run "
            f"loads (then: {source(saved.get('config', {}))}, fingerprint {before[:12]}; now: "
            f"{source(current['config'])}, fingerprint {now[:12]}; a teacher retrained since?). Going on would mix "
            "two teachers in one result: give this run a new --workdir, or delete that workdir to distil again")
    changed = config_differences(with_data_defaults(current["config"]), with_data_defaults(saved.get("config", {})),
                                 ignore=BOOKKEEPING)
    if changed:
        note = ("; the learning-rate schedule is drawn for the new total_steps from here on"
                if any(c.startswith("total_steps:") for c in changed) else "")
        log.warning("resuming step %d with %d setting(s) changed since that checkpoint was written (then -> now): "
                    "%s%s; the run is no longer the one that started", step, len(changed), "; ".join(changed), note)
    return changed
