"""`cankd_jax.detection.topk.top_k`: `lax.top_k`'s results, computed where the rows live on a mesh."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from cankd_jax.detection.topk import top_k
from cankd_jax.rehearse import collectives

RNG = np.random.default_rng(0)
X = np.round(RNG.random((8, 3000)) * 30).astype(np.float32)  # many ties


def _same(got, want):
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("k", [0, 1, 57, 3000])
def test_equals_lax_top_k_with_its_tie_order(k):
    want = jax.lax.top_k(X, k)
    _same(jax.jit(lambda a: top_k(a, k))(X), want)
    _same(jax.jit(jax.vmap(lambda r: top_k(r, k)))(X), want)
    _same(top_k(X[3], k), jax.lax.top_k(X[3], k))
    nested = jax.jit(jax.vmap(jax.vmap(lambda r: top_k(r, k))))(X.reshape(2, 4, 3000))
    _same((nested[0].reshape(8, k), nested[1].reshape(8, k)), want)


def test_rows_split_over_devices_stay_on_their_device():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("data",))
    split = NamedSharding(mesh, P("data"))
    abstract = jax.ShapeDtypeStruct(X.shape, X.dtype, sharding=split)

    def kinds(fn):
        return {c["kind"] for c in collectives(jax.jit(fn, out_shardings=split).lower(abstract).compile().as_text(), 4)}

    assert kinds(lambda a: jax.lax.top_k(a, 50)[1]) == {"all-gather"}  # what this module exists for
    assert kinds(lambda a: top_k(a, 50)[1]) == set()
    assert kinds(jax.vmap(lambda r: top_k(r, 50)[1])) == set()
    _same(jax.jit(lambda a: top_k(a, 50))(jax.device_put(X, split)), jax.lax.top_k(X, 50))


def test_k_out_of_range():
    with pytest.raises(ValueError, match="k=3001 for an axis of 3000"):
        top_k(X, 3001)
