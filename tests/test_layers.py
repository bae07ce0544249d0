"""`layers.rounded`: the identity, bit for bit and in its gradient, on every float32 / bfloat16 / float16 class of
value."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cankd_jax.layers import rounded


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_rounded_returns_its_input_bit_for_bit(dtype):
    info = jnp.finfo(dtype)
    x = jnp.asarray([0.0, -0.0, 1.0, -2.5, float(info.tiny), float(info.smallest_subnormal), float(info.max),
                     float("inf"), float("-inf"), 0.1, 1 / 3], dtype)
    bits = lambda a: np.asarray(jax.lax.bitcast_convert_type(a, jnp.dtype(f"uint{8 * a.dtype.itemsize}")))  # noqa: E731
    for f in (rounded, jax.jit(rounded)):
        got = f(x)
        assert got.dtype == x.dtype and got.shape == x.shape
        np.testing.assert_array_equal(bits(got), bits(x))
    nan = jax.jit(rounded)(jnp.asarray([float("nan"), -float("nan")], dtype))
    assert bool(jnp.all(jnp.isnan(nan)))


def test_rounded_passes_gradients_through_unchanged():
    x = jnp.asarray([[0.5, -1.25], [3.0, 7.0]], jnp.float32)
    f = lambda a: jnp.sum(jnp.floor(a) + rounded(a * a) * a)  # noqa: E731
    want = 2 * x * x + x * x  # d/da (a^2 * a) = 3 a^2; floor's derivative is 0
    np.testing.assert_allclose(jax.grad(f)(x), want, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(f))(x), want, rtol=1e-6)
    _, tangent = jax.jvp(rounded, (x,), (jnp.ones_like(x),))
    np.testing.assert_array_equal(tangent, jnp.ones_like(x))
