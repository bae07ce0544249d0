"""Resampling and pooling with PyTorch's exact index arithmetic, plus input checks.

Teacher weights come from PyTorch and must give PyTorch's numbers, so every
operation whose edge cases differ between frameworks (pooling windows that do
not divide the map, nearest-neighbour sizes that are not multiples) is written
here from PyTorch's rules instead of taken from a JAX default. All maps NHWC.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cankd_jax.layers import resize_bilinear  # noqa: F401 - shared with the losses; re-exported here

Array = jax.Array


def check_nhwc(x: Array, *, who: str, channels: Optional[int] = None) -> None:
    """Raise a `ValueError` naming the problem unless `x` is a float NHWC batch.

    Shapes are static under `jax.jit`, so this costs nothing at run time and
    replaces an XLA shape error deep inside a convolution.
    """
    shape = tuple(x.shape)
    if x.ndim != 4:
        raise ValueError(f"{who}: expected an NHWC batch (B, H, W, C), got shape {shape} (rank {x.ndim})")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{who}: expected floating-point input, got dtype {x.dtype}; convert images with .astype(jnp.float32)")
    if channels is not None and shape[-1] != channels:
        hint = " (is the batch NCHW? transpose it to NHWC)" if shape[1] == channels else ""
        raise ValueError(f"{who}: expected {channels} channels on the last axis, got shape {shape}{hint}")


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    # PyTorch's nearest rule: src = min(floor(dst * float32(n_in / n_out)), n_in - 1),
    # with the scale and the product in float32 (that rounding decides ties).
    if n_out == n_in:
        return np.arange(n_out)
    scale = np.float32(n_in) / np.float32(n_out)
    idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def resize_nearest(x: Array, size: tuple[int, int]) -> Array:
    """`F.interpolate(mode='nearest', size=size)`: `(B, H, W, C) -> (B, H', W', C)`.

    An exact 2x enlargement (the common FPN case) is a repeat; any other size
    gathers rows and columns by PyTorch's index rule.
    """
    _, h, w, _ = x.shape
    for axis, (n_in, n_out) in ((1, (h, size[0])), (2, (w, size[1]))):
        if n_out == n_in:
            continue
        if n_out == 2 * n_in:
            x = jnp.repeat(x, 2, axis=axis)
        else:
            x = jnp.take(x, jnp.asarray(_nearest_index(n_in, n_out)), axis=axis)
    return x


def _adaptive_pool_matrix(n_in: int, n_bins: int) -> np.ndarray:
    # AdaptiveAvgPool2d's bin i covers [floor(i * n / k), ceil((i + 1) * n / k)):
    # bins overlap when k does not divide n, and each averages its own length.
    m = np.zeros((n_bins, n_in), np.float32)
    for i in range(n_bins):
        start = (i * n_in) // n_bins
        end = -((-(i + 1) * n_in) // n_bins)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x: Array, bins: int) -> Array:
    """`nn.AdaptiveAvgPool2d(bins)`: `(B, H, W, C) -> (B, bins, bins, C)`, in float32.

    Separable: one averaging matrix per spatial axis, exact for PyTorch's
    (possibly overlapping) bins, also when `bins > H`.
    """
    _, h, w, _ = x.shape
    ph, pw = _adaptive_pool_matrix(h, bins), _adaptive_pool_matrix(w, bins)
    y = jnp.einsum("bhwc,ih,jw->bijc", x.astype(jnp.float32), ph, pw, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def max_pool_3x3_s2(x: Array) -> Array:
    """`nn.MaxPool2d(3, stride=2, padding=1)` (the ResNet stem): `(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C)`.

    Flax pads with the reduction's identity (-inf), as PyTorch's max pool does.
    """
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def frozen_boundary(x: Array, frozen: bool) -> Array:
    """`x` with no gradient past it when the layers that made it are frozen: nothing before a frozen stage's
    output trains, so backpropagating into it is wasted work (PyTorch skips it too: requires_grad=False). The
    optimizer's labels still keep weight decay and momentum off the frozen parameters."""
    return jax.lax.stop_gradient(x) if frozen else x
