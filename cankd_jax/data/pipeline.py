"""Batches with Grain: one global order, each process reading its rows of every global batch, resumable anywhere.

Training order is a function of (seed, global step) alone, never of the
number of processes, devices or Grain workers:

- the *global stream* visits the records epoch after epoch, each epoch an
  order drawn from `(seed, epoch)` by an *epoch plan* (`ShuffledEpochs`: a
  permutation; `GroupedEpochs`: detection's batches of one padded image shape,
  mmdet's aspect-ratio grouping);
- global batch k is stream positions `[k*G, (k+1)*G)` (G = global batch size);
- a process reads only its rows `[r0, r1)` of each global batch: the rows its
  devices hold in the global array (`sharding.process_rows`);
- the augmentation of stream position g draws from `np.random.default_rng([seed, g])`, or, under a plan
  that groups records by the augmentation's own draw (`DrawnGroupEpochs`: a random crop decides the
  padded shape), from the plan's generator of (epoch, record), the one the plan grouped it with.

So the global batch of step k is the same on 1 device, 8 devices or 2 hosts, and
the data position is one number, the count of global batches consumed, valid
on any topology. Grain runs the reading and augmentation (in worker processes
when `workers > 0`), through a `Sampler` that maps Grain's local index i to
stream position `(k0 + i // L) * G + r0 + i % L` (L = r1 - r0, k0 the batch the
iterator starts at). A resumed iterator is a new Grain loader started at k0:
Grain's own iterator state records per-worker positions of one shard layout and
refuses another worker count, so it cannot carry a position across topologies.
What we rely on from Grain (pinned by `tests/test_data_pipeline.py`): the
`DataLoader` asks its sampler for indices 0, 1, 2, ... and delivers the records
in that order whatever the worker count, and a `RandomMapTransform` receives
the `rng` its sampler put in the record's metadata.

Evaluation: one pass over the split in order, split evenly across processes,
every batch full-sized with `valid` marking real examples, and every process
producing the same number of batches (collectives in the eval step need that).
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import grain.python as grain
import numpy as np

from cankd_jax.data.detection_index import IndexedRecords
from cankd_jax.data.image_ops import IGNORE

Record = dict[str, np.ndarray]
_STATE_VERSION = 2


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
    """Grain random map calling `fn(record, generator)` with the generator of the record's stream position."""

    def __init__(self, fn: Callable[[Record, np.random.Generator], Record]):
        self.fn = fn

    def random_map(self, element: Record, rng: np.random.Generator) -> Record:
        return self.fn(element, rng)


class _Preprocess(grain.MapTransform):
    def __init__(self, fn: Callable[[Record], Record]):
        self.fn = fn

    def map(self, element: Record) -> Record:
        return self.fn(element)


def _check_rows(rows: Sequence[int], global_batch_size: int) -> tuple[int, int]:
    r0, r1 = (int(r) for r in rows)
    if not 0 <= r0 < r1 <= global_batch_size:
        raise ValueError(f"rows {tuple(rows)} are not a non-empty part of a global batch of {global_batch_size}")
    return r0, r1


class ShuffledEpochs:
    """The default epoch plan: epoch e visits every record once, in a permutation drawn from `(seed, e)`.

    An epoch plan is any picklable object with `length` (records per epoch, the
    same every epoch) and `__call__(epoch) -> (length,) int array` of record indices.
    """

    def __init__(self, num_records: int, seed: int):
        self.length, self.seed = num_records, seed

    def __call__(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.length)

    def __repr__(self) -> str:
        return f"ShuffledEpochs({self.length}, seed={self.seed})"


class GroupedEpochs:
    """Epoch plan whose every global batch holds records of one group (e.g. one padded image shape).

    mmdet's aspect-ratio grouping (`AspectRatioBatchSampler`), made a function of
    `(seed, epoch)` alone: epoch e draws the permutation `ShuffledEpochs` would, walks
    it putting each record in its group's bucket, and emits a batch whenever a bucket
    holds `global_batch_size` records, so batches come in the order they fill, as
    mmdet yields them. What is left in the buckets at the end of the walk (fewer than
    a batch per group) sits this epoch out; another permutation puts other records
    there next epoch. Every epoch therefore has the same `length` (the sum over
    groups of their whole batches), a multiple of the global batch, so a global
    batch never straddles an epoch or a group. A group with fewer records than one
    batch never trains (`num_groups` counts the groups that do).

    `groups`: `(N,)` small ints, the group of each record (computed once from the
    records' sizes, not from decoded images).
    """

    def __init__(self, groups: np.ndarray, global_batch_size: int, seed: int):
        self.groups = np.asarray(groups, np.int32)
        self.global_batch_size, self.seed = int(global_batch_size), int(seed)
        if self.groups.ndim != 1 or not len(self.groups) or self.groups.min() < 0:
            raise ValueError("GroupedEpochs needs one non-negative group index per record")
        counts = np.bincount(self.groups)
        self.batches_per_group = counts // self.global_batch_size
        self.length = int(self.batches_per_group.sum()) * self.global_batch_size
        if self.length == 0:
            raise ValueError(f"no group holds a whole global batch of {self.global_batch_size} records "
                             f"(group sizes {counts.tolist()}); lower the batch size or use more data")

    @property
    def num_groups(self) -> int:
        """Groups that yield batches (each one distinct batch shape)."""
        return int(np.count_nonzero(self.batches_per_group))

    def __call__(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))
        return _grouped_batches(perm, self.groups, self.global_batch_size)

    def __repr__(self) -> str:
        return (f"GroupedEpochs({len(self.groups)} records, {self.num_groups} groups, "
                f"global_batch_size={self.global_batch_size}, seed={self.seed})")


def _grouped_batches(perm: np.ndarray, groups: np.ndarray, batch: int) -> np.ndarray:
    """mmdet's aspect-ratio grouping of one epoch: walking `perm`, each record joins its group's bucket and a
    bucket of `batch` records is emitted; the whole batches (flat) in the order they fill, leftovers dropped."""
    in_order = groups[perm]
    ends, members = [], []
    for group, whole in enumerate(np.bincount(groups) // batch):
        if not whole:
            continue
        slots = np.flatnonzero(in_order == group)[: whole * batch].reshape(whole, -1)
        ends.append(slots[:, -1])  # the walk position at which each batch fills
        members.append(perm[slots])
    if not ends:
        return np.zeros((0,), np.int64)
    order = np.argsort(np.concatenate(ends), kind="stable")
    return np.concatenate(members)[order].reshape(-1)


class DrawnGroupEpochs:
    """Epoch plan for an augmentation whose random draw decides a record's group (a crop's orientation, so its
    padded shape): `GroupedEpochs` with groups drawn anew each epoch.

    Record i's group in epoch e is `group_of(sizes[i], generator(e, i))`, and the sampler hands the
    augmentation of that record in that epoch the same generator (`generator(e, i)` =
    `default_rng([seed, e, i])`), so it makes the same draw and the image fits its batch. The order is
    `GroupedEpochs`'s walk over the permutation of `(seed, e)`. Group sizes vary between epochs, so each
    epoch yields a fixed `length`: the whole batches any split of the records into `num_groups` groups
    holds at least, `(N // B - (num_groups - 1)) * B`, the first to fill (at most `num_groups - 1` batches
    more sit out than `GroupedEpochs` would drop).

    The groups of an epoch cost one generator and one draw per record (a few seconds for COCO's 117k), paid
    once per epoch by each process.
    """

    def __init__(self, sizes: np.ndarray, group_of: Callable[[np.ndarray, np.random.Generator], int],
                 num_groups: int, global_batch_size: int, seed: int):
        self.sizes, self.group_of = np.asarray(sizes), group_of
        self.num_groups, self.global_batch_size, self.seed = int(num_groups), int(global_batch_size), int(seed)
        batches = len(self.sizes) // self.global_batch_size - (self.num_groups - 1)
        if batches <= 0:
            raise ValueError(f"{len(self.sizes)} records in up to {self.num_groups} groups do not surely fill a "
                             f"global batch of {self.global_batch_size}; lower the batch size or use more data")
        self.length = batches * self.global_batch_size

    def generator(self, epoch: int, record: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, record])

    def groups(self, epoch: int) -> np.ndarray:
        """`(N,)` each record's group in `epoch`."""
        groups = [self.group_of(size, self.generator(epoch, i)) for i, size in enumerate(self.sizes)]
        groups = np.asarray(groups, np.int32)
        if groups.min() < 0 or groups.max() >= self.num_groups:
            raise ValueError(f"group_of gave groups outside [0, {self.num_groups})")
        return groups

    def __call__(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.sizes))
        return _grouped_batches(perm, self.groups(epoch), self.global_batch_size)[: self.length]

    def __repr__(self) -> str:
        return (f"DrawnGroupEpochs({len(self.sizes)} records, up to {self.num_groups} groups, "
                f"global_batch_size={self.global_batch_size}, seed={self.seed})")


class GlobalOrderSampler:
    """Grain sampler: this process's rows of the global batches, from global batch `start_batch` on.

    Local index i -> stream position g = (start_batch + i // L) * G + r0 + i % L,
    record `plan(g // plan.length)[g % plan.length]`, generator `default_rng([seed, g])` (or the plan's).
    Endless (epochs follow each other); `len` is effectively infinite.
    """

    def __init__(self, plan: Any, *, global_batch_size: int, rows: tuple[int, int], seed: int,
                 start_batch: int = 0):
        r0, r1 = _check_rows(rows, global_batch_size)
        self.plan, self.global_batch_size, self.rows = plan, global_batch_size, (r0, r1)
        self.seed, self.start_batch = seed, start_batch
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        return sys.maxsize // 4  # endless; a length spares Grain a bisection over indices

    def position(self, index: int) -> int:
        """The global stream position of local index `index`."""
        r0, r1 = self.rows
        batch, row = divmod(index, r1 - r0)
        return (self.start_batch + batch) * self.global_batch_size + r0 + row

    def record_key(self, position: int) -> int:
        epoch, offset = divmod(position, self.plan.length)
        if epoch != self._epoch:  # one plan per epoch, kept while the epoch lasts
            self._epoch, self._order = epoch, self.plan(epoch)
        return int(self._order[offset])

    def generator(self, position: int, record: int) -> np.random.Generator:
        """The augmentation's generator at `position`: the plan's of (epoch, record) where it has one."""
        plan_generator = getattr(self.plan, "generator", None)
        if plan_generator is not None:
            return plan_generator(position // self.plan.length, record)
        return np.random.default_rng([self.seed, position])

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if index < 0:
            raise IndexError(index)
        g = self.position(index)
        key = self.record_key(g)
        return grain.RecordMetadata(index=index, record_key=key, rng=self.generator(g, key))

    def __repr__(self) -> str:  # Grain logs it
        return (f"GlobalOrderSampler({self.plan!r}, global_batch_size={self.global_batch_size}, "
                f"rows={self.rows}, seed={self.seed}, start_batch={self.start_batch})")


class TrainIterator(Iterator[Record]):
    """Endless iterator of this process's rows of each global training batch, with a savable position.

    `next()` -> dict of stacked arrays, `rows[1] - rows[0]` examples. Grain
    delivers single examples in stream order (workers included); they are
    stacked here rather than in a Grain `Batch` inside the workers, which would
    batch each worker's own round-robin share.

    `get_state()` -> `{"version", "global_batches", "global_batch_size", "seed",
    "num_records"}`, JSON-serialisable: the position is `global_batches`, the
    same on every process and valid for any number of processes, devices and
    workers. `set_state(state)` continues from it.
    """

    def __init__(self, source: Sequence[Record], augment: Callable[[Record, np.random.Generator], Record], *,
                 global_batch_size: int, rows: tuple[int, int], seed: int, worker_count: int = 0,
                 read_options: Optional[grain.ReadOptions] = None, epoch_plan: Any = None, dataset: str = ""):
        self._source, self._augment, self._dataset = source, augment, dataset
        self._plan = epoch_plan or ShuffledEpochs(len(source), seed)
        self._global_batch_size, self._rows, self._seed = global_batch_size, _check_rows(rows, global_batch_size), seed
        self._workers = worker_count
        self._read_options = read_options or default_read_options(rows[1] - rows[0])
        self._batches = 0
        self._examples: Optional[Iterator[Record]] = None

    def _start(self, batch: int) -> None:
        sampler = GlobalOrderSampler(self._plan, global_batch_size=self._global_batch_size, rows=self._rows,
                                     seed=self._seed, start_batch=batch)
        loader = grain.DataLoader(data_source=self._source, sampler=sampler, shard_options=grain.NoSharding(),
                                  worker_count=self._workers, operations=[_Augment(self._augment)],
                                  read_options=self._read_options)
        self._examples, self._batches = iter(loader), batch

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> Record:
        if self._examples is None:
            self._start(self._batches)
        examples = [next(self._examples) for _ in range(self._rows[1] - self._rows[0])]
        self._batches += 1
        return stack_records(examples)

    def get_state(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "global_batches": self._batches, "seed": self._seed,
                "global_batch_size": self._global_batch_size, "num_records": len(self._source),
                "dataset": self._dataset}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"not a data-iterator state of version {_STATE_VERSION}: {state!r:.200}")
        for key, mine in (("seed", self._seed), ("num_records", len(self._source)),
                          ("global_batch_size", self._global_batch_size)):
            if state[key] != mine:
                raise ValueError(f"the data position was saved with {key}={state[key]}, this run has {mine}; "
                                 "resume with the same data, seed and global batch size")
        # Another set of the same length (a synthetic set at another image size) would resume silently by
        # length alone; states saved before the identity was kept have none, and are checked as before.
        if state.get("dataset") and self._dataset and state["dataset"] != self._dataset:
            raise ValueError(f"the data position was saved on data set {state['dataset']}, this run reads "
                             f"{self._dataset}; resume with the same data, seed and global batch size")
        self._start(int(state["global_batches"]))


def make_train_iterator(source: Sequence[Record], augment: Callable[[Record, np.random.Generator], Record], *,
                        global_batch_size: int, seed: int, rows: Optional[tuple[int, int]] = None,
                        worker_count: int = 0, read_options: Optional[grain.ReadOptions] = None,
                        epoch_plan: Any = None, state: Optional[Mapping[str, Any]] = None,
                        dataset: str = "") -> TrainIterator:
    """Endless shuffled, augmented training batches: this process's rows of each global batch.

    Args:
      source: random-access records (`len`, `[]`), e.g. `sources.open_source(...)`.
      augment: `augment(record, generator) -> record` (e.g. `SegTrainAugment`); must be picklable
        when `worker_count > 0`.
      global_batch_size: examples per global batch (all processes together).
      seed: shuffling and augmentation seed, in [0, 2**32).
      rows: `(r0, r1)`, the rows of each global batch this process reads (default: all of them);
        `cankd_jax.train.sharding.process_rows(mesh, global_batch_size)` gives them for a mesh.
      worker_count: Grain worker processes; 0 runs in this process.
      epoch_plan: the order of each epoch (default `ShuffledEpochs(len(source), seed)`).
      state: a `TrainIterator.get_state()` result to resume from.
      dataset: what identifies the records (name, split, a synthetic set's options), kept in the state and
        compared on resume.
    Returns:
      a `TrainIterator` of dicts of stacked arrays, e.g. image (r1-r0, h, w, 3) float32, label (r1-r0, h, w) int32.
    """
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if len(source) == 0:
        raise ValueError("the training split is empty")
    if worker_count:
        _absl_flags_ready()
    iterator = TrainIterator(source, augment, global_batch_size=global_batch_size,
                             rows=rows or (0, global_batch_size), seed=int(seed), worker_count=worker_count,
                             read_options=read_options, epoch_plan=epoch_plan, dataset=dataset)
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


def grouped_eval_batches(source: Any, preprocess: Callable[[Record], Record], parts: Sequence[np.ndarray],
                         image_ids: np.ndarray, *, batch_size: int, worker_count: int,
                         shard_options: Optional[grain.ShardOptions]) -> Iterator[Record]:
    """Detection evaluation, one pass over `source`: each bucket's records (`parts`) in their own batches of one
    shape, split across processes as `make_eval_iterator` splits a source (every process yields the same batch
    count)."""
    for indices in parts:
        if len(indices):
            yield from make_eval_iterator(IndexedRecords(source, indices, image_ids), preprocess,
                                          batch_size=batch_size, worker_count=worker_count,
                                          shard_options=shard_options)


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


def stack_records(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Records (dicts of arrays, possibly nested: a detection label is a dict) -> one dict of stacked arrays."""
    return {k: stack_records([r[k] for r in records]) if isinstance(v, Mapping) else np.stack([r[k] for r in records])
            for k, v in records[0].items()}


def _pad_batch(rows: list[Record], template: Record, batch_size: int) -> Record:
    """Stack `rows` (k <= batch_size examples) and pad to batch_size (zeros; label 255); add `valid` (B,) bool.

    Nested dicts (a detection label) are stacked and padded leaf by leaf, with zeros.
    """
    out = _pad_rows(rows, template, batch_size)
    out["valid"] = np.arange(batch_size) < len(rows)
    return out


def _pad_rows(rows: list[Mapping[str, Any]], template: Mapping[str, Any], batch_size: int,
              top: bool = True) -> dict[str, Any]:
    out = {}
    for key, value in template.items():
        if isinstance(value, Mapping):
            out[key] = _pad_rows([r[key] for r in rows], value, batch_size, top=False)
            continue
        fill = IGNORE if key == "label" and top else 0
        shapes = sorted({np.shape(r[key]) for r in rows})
        if len(shapes) > 1:  # else numpy's "all input arrays must have the same shape", naming nothing
            raise ValueError(f"eval examples of different shapes in one batch ({key}: "
                             f"{', '.join(map(str, shapes))}); give the eval images one size (segmentation: "
                             "--config.data.eval_pad_size (h, w), or a fixed data.eval_scale with "
                             "data.eval_keep_ratio=False) or evaluate one image per process at a time")
        # Padding rows take the shape of this batch's examples; an all-padding batch, the template's.
        like = np.asarray(rows[0][key] if rows else value)
        pad = [np.full(like.shape, fill, like.dtype)] * (batch_size - len(rows))
        out[key] = np.stack([r[key] for r in rows] + pad)
    return out
