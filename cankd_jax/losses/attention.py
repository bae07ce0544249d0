"""The non-local attention forms, as functions of flattened queries, keys, values.

Shapes: queries `q (B, P, Cq)` from the student's P = H*W positions; keys
`k (B, N, Cq)` and values `v (B, N, Ci)` from the N (pooled) teacher positions.
Each function returns `y (B, P, Ci)`, row i being sum_j f(q_i, k_j) v_j.

Each form has an `impl='quadratic'` path that builds the P x N matrix literally,
as the reference does (kept for parity tests), and an `'efficient'` path that
never holds it:
- dot: f = q_i.k_j / N has no softmax, so (q k^T) v = q (k^T v): O((P+N) Ci^2)
  time, O(Ci^2) extra memory.
- embedded Gaussian / Gaussian: softmax over N, computed for blocks of
  `query_block` queries at a time under `jax.checkpoint`, so neither the forward
  nor the backward pass holds more than one (B, block, N) slab.
- concatenation: f = relu(a_i + b_j) / N with scalars a_i = w_q.q_i and
  b_j = w_k.k_j. With the keys sorted by b, the j that pass the ReLU for query i
  are a suffix, so y_i = (a_i * sum_suffix v + sum_suffix b v) / N: sorting and
  suffix sums, O(N log N + P log N + (P + N) Ci).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array
IMPLS = ("efficient", "quadratic")


def dot_attention_matrix(q: Array, k: Array) -> Array:
    """The dot-product form's P x N matrix, `q k^T / N`: `(B,P,C),(B,N,C) -> (B,P,N)` (what 'quadratic' builds)."""
    return jnp.einsum("bpc,bnc->bpn", q, k) / k.shape[1]


def dot_attention(q: Array, k: Array, v: Array, *, impl: str = "efficient") -> Array:
    """Dot-product form without softmax, scaled by 1/N. `(B,P,C),(B,N,C),(B,N,Ci) -> (B,P,Ci)`."""
    n = k.shape[1]
    if impl == "quadratic":
        return jnp.einsum("bpn,bnd->bpd", dot_attention_matrix(q, k), v)
    # k^T v sums over all N keys: accumulated and scaled in float32 (it is only Cq x Ci per image), then
    # used in the queries' dtype.
    kv = jnp.einsum("bnc,bnd->bcd", k, v, preferred_element_type=jnp.float32) / n
    return jnp.einsum("bpc,bcd->bpd", q, kv.astype(q.dtype))


def _softmax_rows(q: Array, k: Array, v: Array) -> Array:
    logits = jnp.einsum("bpc,bnc->bpn", q, k, preferred_element_type=jnp.float32)
    a = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bpn,bnd->bpd", a, v)


def softmax_attention(q: Array, k: Array, v: Array, *, impl: str = "efficient", query_block: int = 1024) -> Array:
    """Softmax over the N keys (the (embedded) Gaussian forms). `-> (B, P, Ci)`."""
    b, p, _ = q.shape
    if impl == "quadratic" or p <= query_block:
        return _softmax_rows(q, k, v)
    n_blocks = -(-p // query_block)
    pad = n_blocks * query_block - p
    qb = jnp.pad(q, ((0, 0), (0, pad), (0, 0)))
    qb = qb.reshape(b, n_blocks, query_block, q.shape[-1]).swapaxes(0, 1)
    # Recompute each block's softmax in the backward pass instead of storing
    # all of them, which would be the whole P x N matrix again.
    rows = jax.checkpoint(_softmax_rows)
    yb = jax.lax.map(lambda qq: rows(qq, k, v), qb)
    return yb.swapaxes(0, 1).reshape(b, n_blocks * query_block, v.shape[-1])[:, :p]


def concat_attention(a: Array, b: Array, v: Array, *, impl: str = "efficient") -> Array:
    """Concatenation form: y_i = sum_j relu(a_i + b_j) v_j / N.

    Args:
      a: `(B, P)` query scores, the projection of each query onto the first half
        of the concatenation conv's weight.
      b: `(B, N)` key scores, likewise with the second half.
      v: `(B, N, Ci)` values.
    """
    n = b.shape[1]
    if impl == "quadratic":
        f = jax.nn.relu(a[:, :, None] + b[:, None, :]) / n
        return jnp.einsum("bpn,bnd->bpd", f, v)
    order = jnp.argsort(b, axis=1)
    b_sorted = jnp.take_along_axis(b, order, axis=1)
    v_sorted = jnp.take_along_axis(v, order[..., None], axis=1)

    def suffix_sums(x: Array) -> Array:  # (B, N, D) -> (B, N + 1, D), row N is zero
        s = jnp.flip(jnp.cumsum(jnp.flip(x, 1), axis=1), 1)
        return jnp.pad(s, ((0, 0), (0, 1), (0, 0)))

    s_v = suffix_sums(v_sorted)
    s_bv = suffix_sums(b_sorted[..., None] * v_sorted)
    # First sorted key with a_i + b_j > 0 (strictly: relu'(0) = 0, as in PyTorch).
    first = jax.vmap(functools.partial(jnp.searchsorted, side="right"))(jax.lax.stop_gradient(b_sorted), -a)
    y = a[..., None] * jnp.take_along_axis(s_v, first[..., None], axis=1)
    y = y + jnp.take_along_axis(s_bv, first[..., None], axis=1)
    return y / n
