"""Batches with Grain: deterministic shuffling, one shard per process, resumable position.

Training: `grain.python.DataLoader` over an `IndexSampler` (global shuffle from
the seed, endless epochs, this process's shard) and a random augmentation;
examples are stacked into batches in this process (see `TrainIterator`).
The augmentation of the element at global stream position i (which fixes
its epoch and example) draws from
`np.random.default_rng([seed, x_i])`, x_i the first draw of Grain's per-element
Philox generator keyed by seed + i; so a batch depends on (seed, step, shard)
only, not on worker count or timing.

Position: `TrainIterator.get_state()` is a small JSON-serialisable dict (store
it in the checkpoint as is); `set_state` takes it back. Processes advance in
lockstep (one batch per step each), so the position is the same number on
every process: the state saved by process 0 restores every process, whatever
the worker count.

Evaluation: one pass over the split in order, split evenly across processes,
every batch full-sized with `valid` marking real examples, and every process
producing the same number of batches (collectives in the eval step need that).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import grain.python as grain
import numpy as np

from cankd_jax.data.image_ops import IGNORE

Record = dict[str, np.ndarray]
_STATE_VERSION = 1


def per_process_batch_size(global_batch_size: int, process_count: Optional[int] = None) -> int:
    """`global_batch_size` / number of processes, with a clear error when it does not divide."""
    if process_count is None:
        import jax  # here, not at the top: Grain worker processes import this module and need no jax

        process_count = jax.process_count()
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of the "
                         f"{process_count} processes")
    return global_batch_size // process_count


def _absl_flags_ready() -> None:
    """Grain's worker processes read absl flags; outside an absl app (tests, notebooks) nobody parsed
    them, so take their defaults instead of failing."""
    from absl import flags  # absl comes with Grain

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def default_read_options(batch_size: int) -> grain.ReadOptions:
    """Few reader threads and a buffer of a few batches: Grain's defaults (16 threads, 500 records)
    would hold hundreds of decoded full-resolution Cityscapes frames per process."""
    return grain.ReadOptions(num_threads=4, prefetch_buffer_size=max(4 * batch_size, 16))


class _Augment(grain.RandomMapTransform):
    """Grain random map calling `fn(record, generator)` with a generator derived from (seed, position)."""

    def __init__(self, fn: Callable[[Record, np.random.Generator], Record], seed: int):
        self.fn, self.seed = fn, seed

    def random_map(self, element: Record, rng: np.random.Generator) -> Record:
        return self.fn(element, np.random.default_rng([self.seed, int(rng.integers(2**63))]))


class _Preprocess(grain.MapTransform):
    def __init__(self, fn: Callable[[Record], Record]):
        self.fn = fn

    def map(self, element: Record) -> Record:
        return self.fn(element)


class TrainIterator(Iterator[Record]):
    """Endless iterator of training batches with a savable position.

    Grain delivers single examples in stream order (with workers too: it
    interleaves them back into order); this iterator stacks `batch_size` of them.
    Batching here rather than in a Grain `Batch` inside the workers keeps every
    batch independent of the worker count (each worker would batch its own
    round-robin share).

    `get_state()` -> JSON-serialisable dict `{"version", "examples", "seed",
    "num_records", "shard_count"}`: examples consumed per process, the same on
    every process, so any process's state resumes any process, with any
    worker count. `set_state(state)` restores it.
    """

    def __init__(self, loader: grain.DataLoader, *, batch_size: int, seed: int, num_records: int,
                 shard_options: grain.ShardOptions, worker_count: int):
        self.grain_iterator = iter(loader)
        self._batch_size, self._seed, self._num_records = batch_size, seed, num_records
        self._shard, self._workers = shard_options, worker_count
        self._template = json.loads(self.grain_iterator.get_state())  # Grain's state fields, position 0
        self._examples = 0

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> Record:
        examples = [next(self.grain_iterator) for _ in range(self._batch_size)]
        self._examples += self._batch_size
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    def get_state(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "examples": self._examples, "seed": self._seed,
                "num_records": self._num_records, "shard_count": self._shard.shard_count}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"not a data-iterator state of version {_STATE_VERSION}: {state!r:.200}")
        for key, mine in (("seed", self._seed), ("num_records", self._num_records),
                          ("shard_count", self._shard.shard_count)):
            if state[key] != mine:
                raise ValueError(f"the data position was saved with {key}={state[key]}, this run has {mine}; "
                                 "resume with the same data, seed and number of processes")
        grain_state = grain_loader_state(self._template, int(state["examples"]), self._shard, self._workers)
        self.grain_iterator.set_state(json.dumps(grain_state).encode())
        self._examples = int(state["examples"])


def grain_loader_state(template: dict, examples: int, shard: grain.ShardOptions, worker_count: int) -> dict:
    """Grain's DataLoader state (format version 2) after `examples` elements of shard `shard`.

    Grain hands stream positions round-robin to its W workers (one "worker"
    when running in-process) and records, per worker, the global index of the
    last element it produced: shard_index - W*P + i*P + n_i*W*P for worker i
    having produced n_i, with P shards. `template` is a fresh iterator's state
    (sampler and source descriptions, worker count), of which this sets the position.
    """
    if template.get("version") != 2:
        raise ValueError(f"unsupported Grain DataLoader state version {template.get('version')!r}")
    w, p = max(worker_count, 1), shard.shard_count
    produced = [(examples - i + w - 1) // w for i in range(w)]
    return dict(template,
                last_seen_indices={str(i): shard.shard_index - w * p + i * p + n * w * p
                                   for i, n in enumerate(produced)},
                last_worker_index=(examples % w) - 1 if worker_count else -1)


def make_train_iterator(source: Sequence[Record], augment: Callable[[Record, np.random.Generator], Record], *,
                        batch_size: int, seed: int, worker_count: int = 0,
                        shard_options: Optional[grain.ShardOptions] = None,
                        read_options: Optional[grain.ReadOptions] = None,
                        state: Optional[dict] = None) -> TrainIterator:
    """Endless shuffled, augmented batches of this process's shard of `source`.

    Args:
      source: random-access records (`len`, `[]`), e.g. `sources.open_source(...)`.
      augment: `augment(record, generator) -> record` (e.g. `SegTrainAugment`); must be picklable
        when `worker_count > 0`.
      batch_size: per-process batch size (see `per_process_batch_size`).
      seed: shuffling and augmentation seed, in [0, 2**32).
      worker_count: Grain worker processes; 0 runs in this process.
      shard_options: default `ShardByJaxProcess(drop_remainder=True)`.
      state: a `TrainIterator.get_state()` result to resume from.
    Returns:
      a `TrainIterator` of dicts of stacked arrays, e.g. image (B, h, w, 3) float32, label (B, h, w) int32.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    shard_options = shard_options or grain.ShardByJaxProcess(drop_remainder=True)
    if len(source) < shard_options.shard_count:
        raise ValueError(f"{len(source)} training examples cannot be split across {shard_options.shard_count} "
                         "processes")
    if worker_count:
        _absl_flags_ready()
    sampler = grain.IndexSampler(num_records=len(source), shard_options=shard_options, shuffle=True,
                                 num_epochs=None, seed=int(seed))
    loader = grain.DataLoader(
        data_source=source, sampler=sampler, shard_options=shard_options, worker_count=worker_count,
        operations=[_Augment(augment, int(seed))], read_options=read_options or default_read_options(batch_size))
    iterator = TrainIterator(loader, batch_size=batch_size, seed=int(seed), num_records=len(source),
                             shard_options=shard_options, worker_count=worker_count)
    if state is not None:
        iterator.set_state(state)
    return iterator


class _Slice:
    """Records [start, end) of a source, as a source (repr stays short: Grain logs it)."""

    def __init__(self, source: Sequence[Record], start: int, end: int):
        self._source, self._start, self._len = source, start, end - start

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, key: int) -> Record:
        return self._source[self._start + int(key)]

    def __repr__(self) -> str:
        return f"_Slice({self._source!r}, start={self._start}, len={self._len})"


def eval_batch_count(num_examples: int, batch_size: int, shard_count: int) -> int:
    """Batches each process yields: enough for the largest shard, ceil(ceil(n / shards) / batch)."""
    return math.ceil(math.ceil(num_examples / shard_count) / batch_size)


def make_eval_iterator(source: Sequence[Record], preprocess: Callable[[Record], Record], *, batch_size: int,
                       worker_count: int = 0, shard_options: Optional[grain.ShardOptions] = None,
                       read_options: Optional[grain.ReadOptions] = None) -> Iterator[Record]:
    """One ordered pass over this process's contiguous share of `source`, in full batches.

    Yields dicts of the preprocessed arrays stacked to `batch_size`, plus
    `valid`: (B,) bool, False on padding rows (zeros; label 255). Over all
    processes every example appears exactly once with valid=True, and every
    process yields `eval_batch_count(len(source), batch_size, shard_count)` batches.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if shard_options is None:
        import jax  # see per_process_batch_size

        shard_options = grain.ShardOptions(jax.process_index(), jax.process_count())
    n, count, index = len(source), shard_options.shard_count, shard_options.shard_index
    start, end = n * index // count, n * (index + 1) // count  # sizes differ by at most one
    loader = None
    if worker_count:
        _absl_flags_ready()
    if end > start:
        part = _Slice(source, start, end)
        loader = grain.DataLoader(
            data_source=part, shard_options=grain.NoSharding(), worker_count=worker_count,
            sampler=grain.IndexSampler(num_records=len(part), shard_options=grain.NoSharding(), shuffle=False,
                                       num_epochs=1),
            operations=[_Preprocess(preprocess)], read_options=read_options or default_read_options(batch_size))
    return _padded_batches(loader, eval_batch_count(n, batch_size, count), batch_size,
                           lambda: preprocess(source[0]))


def _padded_batches(loader: Optional[grain.DataLoader], count: int, batch_size: int,
                    example: Callable[[], Record]) -> Iterator[Record]:
    """The loader's examples in batches padded to `batch_size`, then all-padding batches up to `count`.

    Batches are stacked here, not in Grain's workers, so they do not depend on the worker count.
    """
    it = iter(loader or ())
    template = None
    for _ in range(count):
        rows = list(itertools.islice(it, batch_size))
        if template is None:
            template = rows[0] if rows else example()  # an empty shard takes the shapes from any example
        yield _pad_batch(rows, template, batch_size)


def _pad_batch(rows: list[Record], template: Record, batch_size: int) -> Record:
    """Stack `rows` (k <= batch_size examples) and pad to batch_size (zeros; label 255); add `valid` (B,) bool."""
    out = {}
    for key, value in template.items():
        fill = IGNORE if key == "label" else 0
        pad = [np.full(np.shape(value), fill, np.asarray(value).dtype)] * (batch_size - len(rows))
        out[key] = np.stack([r[key] for r in rows] + pad)
    out["valid"] = np.arange(batch_size) < len(rows)
    return out
