"""Multi-scale deformable attention against mmcv 2.1 itself: `multi_scale_deformable_attn_pytorch` (the form
mmcv runs everywhere but on CUDA) for the sampling, and its `MultiScaleDeformableAttention` module with the
same weights for the projections, the offsets' two reference forms, the padding mask and the residual.

The sampling is compared in float64, values and gradients with respect to the value map, the locations and
the weights, so any difference beyond rounding is a wrong index, corner or weight: locations reach outside
the maps (zero padding), sit exactly on pixel centres and borders, and levels include 1 x 1 and 1 x W maps.
The module is compared in float32 to 1e-5 relative (float32 rounding through three matmuls and a softmax).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import openmmlab_reference as mr
import train_cli
from cankd_jax.models.deform_attn import MultiScaleDeformableAttention, ms_deform_attn
from conftest import assert_close

pytestmark = pytest.mark.skipif(mr.available() is not None, reason=str(mr.available()))

SHAPES = ((6, 9), (3, 5), (1, 7), (1, 1))
B, Q, HEADS, D, P = 2, 11, 3, 4, 3


def _mmcv():
    from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttention as M
    from mmcv.ops.multi_scale_deform_attn import multi_scale_deformable_attn_pytorch as f
    return f, M


def _inputs(rng, dtype=np.float64):
    s = sum(h * w for h, w in SHAPES)
    value = rng.normal(size=(B, s, HEADS, D))
    loc = rng.uniform(-0.25, 1.25, size=(B, Q, HEADS, len(SHAPES), P, 2))
    # exact pixel centres, pixel corners and the maps' own borders of every level
    h, w = np.array(SHAPES)[:, 0], np.array(SHAPES)[:, 1]
    loc[0, 0, :, :, 0, 0] = (np.arange(HEADS)[:, None] % w + 0.5) / w
    loc[0, 0, :, :, 0, 1] = 0.5 / h
    loc[0, 1, :, :, :, :] = 0.0
    loc[0, 2, :, :, :, :] = 1.0
    loc[1, 0, :, :, 1, 0] = 1.0 / w
    loc[1, 0, :, :, 1, 1] = 1.0 / h
    weights = rng.uniform(0, 1, size=(B, Q, HEADS, len(SHAPES), P))
    return [a.astype(dtype) for a in (value, loc, weights)]


def _theirs(value, loc, weights):
    """mmcv's output and its gradients w.r.t. (value, loc, weights) of <output, cotangent>."""
    f, _ = _mmcv()
    ts = [torch.tensor(a, requires_grad=True) for a in (value, loc, weights)]
    out = f(ts[0], torch.tensor(SHAPES), ts[1], ts[2])
    cot = torch.tensor(np.random.default_rng(9).normal(size=out.shape), dtype=out.dtype)
    (out * cot).sum().backward()
    return out.detach().numpy(), [t.grad.numpy() for t in ts], cot.numpy()


def _ours(value, loc, weights, cot):
    def f(v, l, w):
        return jnp.sum(ms_deform_attn(v, SHAPES, l, w) * cot)
    out = jax.jit(ms_deform_attn, static_argnums=1)(value, SHAPES, loc, weights)
    return np.asarray(out), [np.asarray(g) for g in jax.jit(jax.grad(f, argnums=(0, 1, 2)))(value, loc, weights)]


def test_sampling_matches_mmcv_float64(rng):
    value, loc, weights = _inputs(rng)
    want, want_grads, cot = _theirs(value, loc, weights)
    with jax.enable_x64():
        got, got_grads = _ours(*(jnp.asarray(a) for a in (value, loc, weights)), jnp.asarray(cot))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    for name, g, w in zip(("value", "locations", "weights"), got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-11, err_msg=f"d/d{name}")
    # the test's locations do reach outside every map, where the samples must be zero
    assert (loc < 0).any() and (loc > 1).any()


def test_sampling_matches_mmcv_float32(rng):
    value, loc, weights = _inputs(rng, np.float32)
    want, want_grads, cot = _theirs(value, loc, weights)
    got, got_grads = _ours(value, loc, weights, cot)
    assert_close(got, want, rtol=1e-5, what="output")
    for name, g, w in zip(("value", "locations", "weights"), got_grads, want_grads):
        assert_close(g, w, rtol=1e-5, what=f"d/d{name}")


def test_the_gradient_keeps_no_gathered_corners():
    """Three stacked encoder-like calls, differentiated with respect to everything and compiled: XLA's buffers
    at the peak hold the gathered corners of about one level at a time (3.3 levels' worth seen: the gather,
    the scatter's updates, the rest), not those of every level and layer (9.3 with `jax.checkpoint` of the
    plain gather on XLA:CPU, which drops remat's barriers, merges and hoists the recomputed gathers)."""
    b, heads, d = 2, 8, 32
    shapes = ((40, 60), (20, 30))
    s = sum(h * w for h, w in shapes)

    def encoder(v, loc, weights):
        for layer in range(3):
            v = jnp.tanh(ms_deform_attn(v, shapes, loc[layer], weights[layer])).reshape(b, s, heads, d)
        return jnp.sum(v)

    args = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in
            ((b, s, heads, d), (3, b, s, heads, 2, 4, 2), (3, b, s, heads, 2, 4))]
    compiled = jax.jit(jax.grad(encoder, argnums=(0, 1, 2))).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    corners = b * s * heads * 16 * d * 4  # one level's gathered corners, bytes
    assert temp < 5 * corners, (temp / corners)


@functools.lru_cache(maxsize=None)
def _module_case(ref_dims: int):
    _, M = _mmcv()
    c, heads, levels, points = 16, 4, 3, 2
    shapes = ((5, 6), (3, 3), (2, 1))
    torch.manual_seed(0)
    tm = M(embed_dims=c, num_heads=heads, num_levels=levels, num_points=points, dropout=0.0, batch_first=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # mmcv's init zeroes the offsets' and weights' kernels: give every term a value
        for p in tm.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    rng = np.random.default_rng(3)
    s = sum(h * w for h, w in shapes)
    q = 7
    query = rng.normal(size=(2, q, c)).astype(np.float32)
    value = rng.normal(size=(2, s, c)).astype(np.float32)
    pos = rng.normal(size=(2, q, c)).astype(np.float32)
    mask = np.zeros((2, s), bool)
    mask[1, -4:] = True
    if ref_dims == 2:
        ref = rng.uniform(0, 1, size=(2, q, levels, 2))
    else:
        ref = np.concatenate([rng.uniform(0.2, 0.8, size=(2, q, levels, 2)),
                              rng.uniform(0.1, 0.5, size=(2, q, levels, 2))], -1)
    ref = ref.astype(np.float32)
    with torch.no_grad():
        want = tm(torch.tensor(query), value=torch.tensor(value), query_pos=torch.tensor(pos),
                  key_padding_mask=torch.tensor(mask), reference_points=torch.tensor(ref),
                  spatial_shapes=torch.tensor(shapes), level_start_index=None).numpy()
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    params = {name: {"kernel": sd[f"{name}.weight"].T, "bias": sd[f"{name}.bias"]}
              for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")}
    ours = MultiScaleDeformableAttention(embed_dims=c, num_heads=heads, num_levels=levels, num_points=points)
    got = jax.jit(lambda p, q, v, r, qp, m: ours.apply(p, q, v, reference_points=r, spatial_shapes=shapes,
                                                       query_pos=qp, key_padding_mask=m))(
        {"params": params}, query, value, ref, pos, mask)
    return np.asarray(got), want, tm, ours, (query, value, ref, shapes)


@pytest.mark.parametrize("ref_dims", [2, 4])
def test_module_matches_mmcv(ref_dims):
    got, want, *_ = _module_case(ref_dims)
    assert_close(got, want, rtol=1e-5, what=f"reference points of {ref_dims}")


def test_init_matches_mmcv():
    """Our init gives mmcv's `init_weights` values for the offsets' grid bias and the zero kernels; the
    xavier-initialised projections match it in law (their bounds)."""
    _, M = _mmcv()
    torch.manual_seed(0)
    tm = M(embed_dims=32, num_heads=8, num_levels=4, num_points=4, batch_first=True)
    ours = MultiScaleDeformableAttention(embed_dims=32, num_heads=8, num_levels=4, num_points=4)
    shapes = ((4, 4), (2, 2), (1, 1), (1, 1))
    x = jnp.zeros((1, 22, 32))
    params = jax.jit(lambda k: ours.init(k, x, reference_points=jnp.zeros((1, 22, 4, 2)), spatial_shapes=shapes))(
        jax.random.key(0))["params"]
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    np.testing.assert_allclose(params["sampling_offsets"]["bias"], sd["sampling_offsets.bias"], rtol=1e-6, atol=1e-7)
    for name in ("sampling_offsets", "attention_weights"):
        assert not np.any(params[name]["kernel"]) and not np.any(sd[f"{name}.weight"])
    assert not np.any(params["attention_weights"]["bias"])
    bound = np.sqrt(6.0 / (32 + 32))
    for name in ("value_proj", "output_proj"):
        k = np.asarray(params[name]["kernel"])
        assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound and k.std() > 0.5 * bound / np.sqrt(3)
        assert not np.any(params[name]["bias"]) and not np.any(sd[f"{name}.bias"])


def test_bad_inputs_name_the_problem():
    value = jnp.zeros((1, 10, 2, 4))
    loc = jnp.zeros((1, 3, 2, 2, 1, 2))
    w = jnp.zeros((1, 3, 2, 2, 1))
    with pytest.raises(ValueError, match=r"value has 10 positions but spatial_shapes \(\(3, 3\), \(2, 1\)\) hold 11"):
        ms_deform_attn(value, ((3, 3), (2, 1)), loc, w)
    with pytest.raises(ValueError, match="do not fit value"):
        ms_deform_attn(value, ((2, 2), (3, 2)), loc[:, :, :1], w)
    with pytest.raises(ValueError, match="attention_weights must be"):
        ms_deform_attn(value, ((2, 2), (3, 2)), loc, w[..., :1, :])
    m = MultiScaleDeformableAttention(embed_dims=8, num_heads=2, num_levels=2, num_points=1)
    x = jnp.zeros((1, 10, 8))
    with pytest.raises(ValueError, match=r"reference_points must be \(1, 10, 2, 2 or 4\), got shape \(1, 10, 2, 3\)"):
        m.init(jax.random.key(0), x, reference_points=jnp.zeros((1, 10, 2, 3)), spatial_shapes=((2, 2), (3, 2)))
    with pytest.raises(ValueError, match="spatial_shapes has 1 levels, the module 2"):
        m.init(jax.random.key(0), x, reference_points=jnp.zeros((1, 10, 2, 2)), spatial_shapes=((2, 5),))
    with pytest.raises(ValueError, match="embed_dims must be divisible by num_heads, got 8 and 3"):
        MultiScaleDeformableAttention(embed_dims=8, num_heads=3).init(
            jax.random.key(0), x, reference_points=jnp.zeros((1, 10, 4, 2)), spatial_shapes=((2, 5),) * 4)


def test_bfloat16_samples_where_float32_does():
    """With `dtype=bfloat16` the projections compute in bfloat16 but the sampling locations and weights stay
    float32: on a 167-pixel-wide map a bfloat16 location is only good to about a pixel, which would move the
    samples; here the output stays within bfloat16 rounding of the float32 module's (5% of its scale)."""
    shapes = ((8, 167),)
    rng = np.random.default_rng(4)
    c = 16
    query = jnp.asarray(rng.normal(size=(1, 64, c)), jnp.float32)
    value = jnp.asarray(rng.normal(size=(1, 8 * 167, c)), jnp.float32)
    ref = jnp.asarray(rng.uniform(0.5, 1.0, size=(1, 64, 1, 2)), jnp.float32)
    f32 = MultiScaleDeformableAttention(embed_dims=c, num_heads=2, num_levels=1, num_points=2)
    params = jax.jit(lambda k: f32.init(k, query, value, reference_points=ref, spatial_shapes=shapes))(
        jax.random.key(0))
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(1), p.shape), params)
    bf16 = MultiScaleDeformableAttention(embed_dims=c, num_heads=2, num_levels=1, num_points=2, dtype=jnp.bfloat16)
    def run(m):
        return jax.jit(lambda p: m.apply(p, query, value, reference_points=ref, spatial_shapes=shapes))(params)

    want, got = run(f32), run(bf16)
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want))) / float(jnp.max(jnp.abs(want)))
    assert err < 5e-2, err  # without float32 locations: 1.15 here


@pytest.mark.slow
def test_the_module_gives_the_same_output_on_any_topology():
    """A batch of padded images (DINO's encoder: reference points from each image's valid ratios, the padding
    masked) gives the op-by-op result bitwise whether it runs on one device, split over four, or image by image,
    compiled as users compile (XLA:CPU's default LLVM optimisation, so in a subprocess without conftest's flags).

    Many of these points fall on pixel boundaries; where a program computes them itself, LLVM may fuse the
    valid-ratio product into the sampler's sum in one fusion and not in another, and the sampler's floors and
    weights part (0.25 here, 4 devices and image by image, before `layers.rounded`)."""
    script = os.path.join(os.path.dirname(__file__), "deform_attn_topologies.py")
    run = subprocess.run([sys.executable, script, "inside"], env=train_cli.env(4, optimized=True),
                         cwd=train_cli.ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    diffs = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(diffs) == {"1_devices", "4_devices", "image_by_image"}, diffs
    assert all(d == 0.0 for d in diffs.values()), diffs
