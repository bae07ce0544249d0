"""mmdet's `RandomSampler` on static shapes: a uniformly random subset of the positives and of the negatives.

mmdet 3.x, per image: `num_expected_pos = int(num * pos_fraction)` positives, all of them if there are no more,
else a random subset of that size (`torch.randperm`); then `num - (positives taken)` negatives, likewise
(`neg_pos_ub=-1`: no cap relative to the positives). Here each candidate draws an independent uniform key and
the largest keys win (`lax.top_k` over a static count), which picks every subset of a given size with equal
probability, as `randperm` does. The draw depends only on the key, so with a key derived from (seed, step,
image index in the global batch) it is the same on any number of devices and hosts, and resumes exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from cankd_jax.detection.topk import top_k

Array = jax.Array


class Sample(NamedTuple):
    """pos, neg `(N,)` bool: the sampled positives and negatives (disjoint)."""

    pos: Array
    neg: Array


def _take_best(keys: Array, candidates: Array, limit: Array, k: int) -> Array:
    """`(N,)` bool: of `candidates`, the (at most) `limit` with the largest `keys`; `k` >= any `limit`, static."""
    score = jnp.where(candidates, keys, -1.0)  # keys are in [0, 1): every candidate outranks every non-candidate
    top, index = top_k(score, k)
    chosen = (top >= 0.0) & (jnp.arange(k) < limit)
    return jnp.zeros(candidates.shape, bool).at[index].set(chosen)  # top_k's indices are distinct


def random_sample(key: Array, pos: Array, neg: Array, *, num: int, pos_fraction: float) -> Sample:
    """mmdet `RandomSampler(num, pos_fraction, neg_pos_ub=-1)` over `(N,)` candidate masks `pos` and `neg`."""
    chex.assert_rank([pos, neg], 1)
    chex.assert_equal_shape([pos, neg])
    n = pos.shape[0]
    num_pos = int(num * pos_fraction)
    k_pos, k_neg = jax.random.split(key)
    pos_taken = _take_best(jax.random.uniform(k_pos, (n,)), pos, num_pos, min(num_pos, n))
    neg_limit = num - jnp.sum(pos_taken)
    neg_taken = _take_best(jax.random.uniform(k_neg, (n,)), neg & ~pos_taken, neg_limit, min(num, n))
    return Sample(pos_taken, neg_taken)


def sample_key(seed_key: Array, step: Array, image_index: Array) -> Array:
    """The sampling key of one image at one step: `fold_in(fold_in(seed_key, step), image_index)`, the image's
    index in the global batch (not its position on a device)."""
    return jax.random.fold_in(jax.random.fold_in(seed_key, step), image_index)
