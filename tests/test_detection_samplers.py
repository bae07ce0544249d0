"""`samplers.random_sample` against mmdet's `RandomSampler` rules: how many of each kind it takes, that it takes
only candidates, that every candidate is equally likely, and that the draw is a function of the key alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cankd_jax.detection.samplers import random_sample, sample_key


@pytest.mark.parametrize("n_pos, n_neg", [(0, 50), (3, 500), (40, 500), (200, 100), (200, 20), (0, 0)])
def test_counts_follow_mmdets_random_sampler(n_pos, n_neg):
    """`int(num * pos_fraction)` positives at most, then `num - positives taken` negatives at most."""
    n = 1000
    r = np.random.default_rng(n_pos + n_neg)
    perm = r.permutation(n)
    pos = np.zeros(n, bool)
    neg = np.zeros(n, bool)
    pos[perm[:n_pos]] = True
    neg[perm[n_pos:n_pos + n_neg]] = True
    s = jax.jit(lambda k: random_sample(k, jnp.asarray(pos), jnp.asarray(neg), num=256, pos_fraction=0.5))(
        jax.random.key(3))
    taken_pos, taken_neg = np.asarray(s.pos), np.asarray(s.neg)
    expected_pos = min(n_pos, 128)
    assert taken_pos.sum() == expected_pos
    assert taken_neg.sum() == min(n_neg, 256 - expected_pos)
    assert not (taken_pos & ~pos).any() and not (taken_neg & ~neg).any() and not (taken_pos & taken_neg).any()


def test_every_candidate_equally_likely():
    """2000 draws of 10 out of 40 candidates: each is taken 500 times in expectation; the counts' spread is
    binomial (sd ~19), so all within 500 +- 100 (over 5 sd) unless the draw favours some positions."""
    pos = jnp.zeros(100, bool).at[jnp.arange(30, 70)].set(True)
    draw = jax.jit(jax.vmap(lambda k: random_sample(k, pos, jnp.zeros(100, bool), num=20, pos_fraction=0.5).pos))
    counts = np.asarray(draw(jax.random.split(jax.random.key(0), 2000))).sum(0)
    assert counts[:30].sum() == counts[70:].sum() == 0
    assert np.all(np.abs(counts[30:70] - 500) < 100), counts[30:70]


def test_draw_is_a_function_of_the_key():
    pos = jnp.asarray(np.random.default_rng(0).random(300) < 0.3)
    neg = ~pos
    k1 = sample_key(jax.random.key(7), 12, 5)
    a = random_sample(k1, pos, neg, num=64, pos_fraction=0.25)
    b = random_sample(sample_key(jax.random.key(7), 12, 5), pos, neg, num=64, pos_fraction=0.25)
    c = random_sample(sample_key(jax.random.key(7), 12, 6), pos, neg, num=64, pos_fraction=0.25)
    assert np.array_equal(a.pos, b.pos) and np.array_equal(a.neg, b.neg)
    assert not np.array_equal(a.neg, c.neg)
