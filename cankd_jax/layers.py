"""Layers shared by the losses and the networks, with PyTorch's semantics.

Parameters move between this library and PyTorch checkpoints in both directions,
so the pieces both sides have (default initialisation, BatchNorm statistics)
follow PyTorch exactly rather than Flax's defaults. All arrays are NHWC.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

# PyTorch's default conv/linear weight init is kaiming_uniform(a=sqrt(5)), i.e.
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)) = variance_scaling(1/3, fan_in, uniform).
# Flax kernels are (..., in, out), so fan_in counts every axis but the last.
torch_kernel_init: Initializer = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@jax.custom_jvp
def rounded(x: Array) -> Array:
    """`x` itself, bit for bit, at a point no fused multiply-add can span (gradient: the identity).

    LLVM, under XLA on CPU and GPU, may contract a multiply and the add that consumes it into one FMA, which
    rounds once instead of twice, and it decides per fusion. XLA recomputes a cheap elementwise value in every
    fusion that reads it, so one value can round one way where a sampler computes its pixel indices and the
    other way where it computes their bilinear weights; at a location that lands on a pixel boundary (every
    DINO encoder point on a padded image, at init) the weights then go to the wrong pixels. Pass a product
    through this before it is added to something that is floored: the integer OR (with 0, or with 1 on a NaN,
    which stays a NaN) is opaque to both compilers, so the multiply and the add round separately everywhere,
    as in eager PyTorch. XLA:CPU drops `optimization_barrier`s before fusing, so a barrier does not do this.
    """
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"int{8 * x.dtype.itemsize}"))
    return jax.lax.bitcast_convert_type(bits | jnp.isnan(x).astype(bits.dtype), x.dtype)


rounded.defjvps(lambda t, ans, x: t)


def torch_bias_init(fan_in: int) -> Initializer:
    """PyTorch's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key: Array, shape, dtype=jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Conv1x1(nn.Module):
    """A 1x1 convolution, computed as a matmul over the channel axis.

    Input `(..., C_in)`, output `(..., features)`. Params: `kernel (C_in, features)`
    (PyTorch's `weight[:, :, 0, 0].T`) and `bias (features,)`. Default init is
    PyTorch's Conv2d default, so a fresh module matches a fresh PyTorch one in law.
    """

    features: int
    use_bias: bool = True
    kernel_init: Initializer = torch_kernel_init
    bias_init: Optional[Initializer] = None  # None: PyTorch's fan-in uniform
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c_in = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (c_in, self.features), self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", self.bias_init or torch_bias_init(c_in), (self.features,), self.param_dtype)
        return dense_nhwc(x, kernel, bias, dtype=self.dtype)


def dense_nhwc(x: Array, kernel: Array, bias: Optional[Array] = None, *, dtype: Optional[Dtype] = None) -> Array:
    """`(..., C_in) @ (C_in, C_out) + bias` with the leading axes flattened first.

    One 2-D matmul: on CPU its weight gradient is about twice as fast as the
    same contraction written as a 4-D einsum (which XLA lowers with transposes).
    """
    dtype = dtype or jnp.result_type(x, kernel)
    y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(dtype), kernel.astype(dtype))
    if bias is not None:
        y = y + bias.astype(dtype)
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


class BatchNorm(nn.Module):
    """BatchNorm over every axis but the last, with PyTorch's statistics.

    Differences from `flax.linen.BatchNorm`, all to match `torch.nn.BatchNorm2d`:
    `momentum` is PyTorch's (weight of the *new* batch, default 0.1); the running
    variance is updated with the unbiased batch variance; a `num_batches_tracked`
    counter is kept so PyTorch state dicts round-trip exactly. Normalisation in
    training uses the biased batch variance. Statistics are computed in float32.

    Under `jax.jit` with a sharded batch the reductions are over the global batch
    (GSPMD inserts the cross-device sums), so no `axis_name` is needed.

    Variables: `params` {scale, bias} (C,), `batch_stats` {mean, var} (C,) and
    `num_batches_tracked` () int32.
    """

    use_running_average: Optional[bool] = None
    momentum: float = 0.1
    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, use_running_average: Optional[bool] = None) -> Array:
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        count = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype) if self.use_bias else None
        out_dtype = self.dtype or x.dtype
        if use_ra:
            y, _, _ = _normalize(x, scale, bias, ra_mean.value, ra_var.value, self.epsilon, out_dtype)
            return y
        # Training: statistics and normalisation under one jax.checkpoint, so the backward pass keeps `x` in its
        # own dtype (bfloat16 under mixed precision) and recomputes the float32 intermediates (elementwise,
        # fused) instead of keeping a float32 copy of every normalised activation.
        y, mean, var = jax.checkpoint(_normalize, static_argnums=(5, 6), policy=jax.checkpoint_policies.nothing_saveable)(
            x, scale, bias, None, None, self.epsilon, out_dtype)
        if not self.is_initializing():
            n = math.prod(x.shape[:-1])
            unbiased = var * (n / max(n - 1, 1))
            m = self.momentum
            mean, unbiased = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(unbiased)
            ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
            ra_var.value = (1.0 - m) * ra_var.value + m * unbiased
            count.value = count.value + 1
        return y


def _normalize(x: Array, scale: Optional[Array], bias: Optional[Array], mean: Optional[Array],
               var: Optional[Array], epsilon: float, out_dtype: Any) -> tuple[Array, Array, Array]:
    """`(y, mean, var)`: `x` normalised in float32 (with the batch's biased statistics where `mean` / `var` are
    None), scaled and shifted, cast to `out_dtype`."""
    x32 = x.astype(jnp.float32)
    if mean is None:
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(x32, axis=axes)
        var = jnp.mean(jnp.square(x32 - mean), axis=axes)
    y = (x32 - mean) * jax.lax.rsqrt(var + epsilon)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype), mean, var


def instance_norm(x: Array, epsilon: float = 1e-5) -> Array:
    """Instance norm without affine parameters, as `torch.nn.InstanceNorm2d`.

    `x (B, H, W, C)`: per sample and channel, subtract the mean over (H, W) and
    divide by sqrt(biased variance + epsilon). Computed in float32.
    """
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + epsilon)


def max_pool_2x2(x: Array) -> Array:
    """2x2 max-pool, stride 2, VALID (odd edges dropped), as `nn.MaxPool2d(2)`.

    `(B, H, W, C) -> (B, H // 2, W // 2, C)`, as a reshape and a max: forward and
    backward about 3x faster on CPU than reduce_window/select_and_scatter. The
    one difference from PyTorch is where a window holds tied maxima: PyTorch
    sends the gradient to one of them, this splits it evenly. Ties come from
    identical inputs (e.g. zero padding), for which the gradient reaching the
    parameters before the pool is the same either way.
    """
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]
    return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def resize_bilinear(x: Array, size: tuple[int, int]) -> Array:
    """`F.interpolate(mode='bilinear', align_corners=False)` to `size = (H', W')`.

    `(B, H, W, C) -> (B, H', W', C)`. `jax.image.resize` uses the same
    half-pixel sampling and border clamping; antialiasing is off because
    PyTorch's bilinear mode never antialiases (it matters only when shrinking).
    """
    b, h, w, c = x.shape
    if (h, w) == tuple(size):
        return x
    return jax.image.resize(x, (b, size[0], size[1], c), method="bilinear", antialias=False)
