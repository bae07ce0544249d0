"""Multi-scale deformable attention's sampling, forward and backward: `cankd_jax.models.deform_attn.ms_deform_attn`
against mmcv's `multi_scale_deformable_attn_pytorch` (what mmcv runs on every backend but CUDA), in the same run.

DINO-4scale's shapes: 8 heads of 32 channels, 4 levels, 4 points; the levels of an `--height` x `--width`
image at strides 8, 16, 32, 64 (the ResNet's C3-C5 and the ChannelMapper's extra level: 100x167, 50x84,
25x42, 13x21 at 800x1333). Two cases: the encoder's self-attention (every position a query, (x, y)
reference points) and the decoder's cross-attention (`--queries`, DINO's 900 matching + 200 denoising
queries, box reference points). Locations are drawn around the reference points as a trained model's are
(offsets of a few pixels, some reaching outside the maps). Both sides compute the output and the gradient of
`sum(output * cotangent)` with respect to the value map, the locations and the weights; the results are
checked to agree (max |diff| printed). Timing: compilation excluded, median of `--repeats` calls, each waited
for.

    python benchmarks/deform_attn_speed.py                        # needs the openmmlab test extra
    python benchmarks/deform_attn_speed.py --height 400 --width 667 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cankd_jax.models.deform_attn import ms_deform_attn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from roi_align_speed import time_calls  # this folder's scripts: the same median-of-calls timer  # noqa: E402
from arg_types import count  # this folder's command-line value types  # noqa: E402

STRIDES = (8, 16, 32, 64)
HEADS, DIMS, POINTS = 8, 32, 4


def level_shapes(height: int, width: int) -> tuple[tuple[int, int], ...]:
    """The maps of a ResNet's C3-C5 (stride-2 convs: ceil halving) and one more stride-2 level."""
    shapes, h, w = [], height, width
    for s in (2, 2, 2, 2, 2, 2):  # stem conv, max pool, layer2, layer3, layer4, extra level
        h, w = -(-h // s), -(-w // s)
        shapes.append((h, w))
    return tuple(shapes[2:])


def make_case(shapes, queries: int, batch: int, seed: int = 0):
    """(value, locations, weights, cotangent) as float32 numpy arrays; `queries=0`: the encoder's case."""
    rng = np.random.default_rng(seed)
    s = sum(h * w for h, w in shapes)
    levels = len(shapes)
    q = queries or s
    value = rng.standard_normal((batch, s, HEADS, DIMS)).astype(np.float32)
    if queries:  # decoder: boxes anywhere, points spread over the box
        centre = rng.uniform(0, 1, (batch, q, 1, 1, 1, 2))
        size = np.exp(rng.uniform(np.log(0.02), np.log(0.8), (batch, q, 1, 1, 1, 2)))
        loc = centre + rng.uniform(-1, 1, (batch, q, HEADS, levels, POINTS, 2)) * size / 2
    else:  # encoder: every pixel centre, points a few pixels of its level away
        centres = np.concatenate([np.stack(np.meshgrid((np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h),
                                           -1).reshape(-1, 2) for h, w in shapes])
        pixel = np.array([[1 / w, 1 / h] for h, w in shapes], np.float64)[None, None, None, :, None, :]
        loc = centres[None, :, None, None, None, :] + rng.normal(0, 3, (batch, q, HEADS, levels, POINTS, 2)) * pixel
    logits = rng.standard_normal((batch, q, HEADS, levels * POINTS))
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    cot = rng.standard_normal((batch, q, HEADS * DIMS)).astype(np.float32)
    return (value, loc.astype(np.float32), weights.reshape(batch, q, HEADS, levels, POINTS).astype(np.float32),
            cot)


def jax_side(shapes, case, repeats: int):
    value, loc, weights, cot = (jnp.asarray(a) for a in case)

    def loss(v, l, w):
        return jnp.sum(ms_deform_attn(v, shapes, l, w) * cot)

    fwd = jax.jit(lambda v, l, w: ms_deform_attn(v, shapes, l, w))
    both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    t0 = time.perf_counter()
    jax.block_until_ready(both(value, loc, weights))
    compile_s = time.perf_counter() - t0
    t_fwd, y = time_calls(lambda: jax.block_until_ready(fwd(value, loc, weights)), repeats)
    t_both, (_, grads) = time_calls(lambda: jax.block_until_ready(both(value, loc, weights)), repeats)
    return {"forward": t_fwd, "forward+backward": t_both, "compile": compile_s}, np.asarray(y), grads


def torch_side(shapes, case, repeats: int):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import torch

    import openmmlab_reference as mr
    if mr.available():
        raise SystemExit(mr.available())
    from mmcv.ops.multi_scale_deform_attn import multi_scale_deformable_attn_pytorch as f

    value, loc, weights, cot = (torch.from_numpy(a) for a in case)
    ts = [t.clone().requires_grad_(True) for t in (value, loc, weights)]
    hw = torch.tensor(shapes)

    def forward():
        with torch.no_grad():
            return f(value, hw, loc, weights)

    def both():
        for t in ts:
            t.grad = None
        (f(ts[0], hw, ts[1], ts[2]) * cot).sum().backward()
        return [t.grad for t in ts]

    t_fwd, y = time_calls(forward, repeats)
    t_both, grads = time_calls(both, repeats)
    return {"forward": t_fwd, "forward+backward": t_both}, y.numpy(), [g.numpy() for g in grads]


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--height", type=count(1), default=800)
    ap.add_argument("--width", type=count(1), default=1333)
    ap.add_argument("--batch", type=count(1), default=1)
    ap.add_argument("--queries", type=count(1), default=1100, help="the decoder case's queries")
    ap.add_argument("--repeats", type=count(1), default=3)
    ap.add_argument("--cases", nargs="+", default=["encoder", "decoder"], choices=["encoder", "decoder"])
    args = ap.parse_args(argv)
    shapes = level_shapes(args.height, args.width)
    print(f"{jax.devices()[0].device_kind} x {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; "
          f"{args.batch} x {args.height}x{args.width}, levels {shapes}, {HEADS} heads x {DIMS}, {POINTS} points, "
          f"float32", flush=True)
    print("| case | implementation | forward ms | forward + backward ms | max abs diff (out, grads) |\n"
          "|---|---|---|---|---|")
    for name in args.cases:
        case = make_case(shapes, 0 if name == "encoder" else args.queries, args.batch)
        q = case[1].shape[1]
        tt, ty, tg = torch_side(shapes, case, args.repeats)
        jt, jy, jg = jax_side(shapes, case, args.repeats)
        diff_y = float(np.max(np.abs(jy - ty)))
        diff_g = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(jg, tg))
        print(f"| {name}, {q} queries | cankd_jax (jit; compile {jt['compile']:.1f} s) | "
              f"{1e3 * jt['forward']:.0f} | {1e3 * jt['forward+backward']:.0f} | {diff_y:.1e}, {diff_g:.1e} |",
              flush=True)
        print(f"| {name}, {q} queries | mmcv multi_scale_deformable_attn_pytorch | {1e3 * tt['forward']:.0f} | "
              f"{1e3 * tt['forward+backward']:.0f} | |", flush=True)
    print(f"\nload after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
