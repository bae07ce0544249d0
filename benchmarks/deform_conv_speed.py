"""Deformable convolution, forward and forward + backward: `cankd_jax.models.deform_conv.deform_conv2d` against
mmcv's `deform_conv2d` on the PyTorch port of mmcv's CPU kernels (`tests/mmcv_ext.py`), in the same run.

The case RepPoints trains on: its head's deformable 3x3 convs (`reppoints_cls_conv`, `reppoints_pts_refine_conv`,
256 -> 256 channels, one deformable group) over P3 of an 800x1344 image (100x168), 2 images, float32, offsets
drawn uniformly in +-2 px. Forward + backward is the gradient of `sum(out * cotangent)` with respect to the input,
the offsets and the weight on both sides; the results are checked to agree (max |diff| printed). The plain 3x3
convolution of the same shapes is timed beside it on both sides, as the floor a deformable conv is measured
from. Timing: compilation excluded, median of `--repeats` calls (`--torch-repeats` for the port, whose call takes
tens of seconds), each waited for; the machine's load is printed.

    python benchmarks/deform_conv_speed.py                      # needs the openmmlab test extra
    python benchmarks/deform_conv_speed.py --height 50 --width 84 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cankd_jax.models.deform_conv import deform_conv2d
from roi_align_speed import time_calls  # this folder's scripts: the same median-of-calls timer
from arg_types import count  # this folder's command-line value types  # noqa: E402


def make_case(height: int, width: int, channels: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, height, width, channels)).astype(np.float32)
    offset = rng.uniform(-2, 2, (2, height, width, 18)).astype(np.float32)
    kernel = (rng.standard_normal((3, 3, channels, channels)) / np.sqrt(9 * channels)).astype(np.float32)
    cotangent = rng.standard_normal((2, height, width, channels)).astype(np.float32)
    return x, offset, kernel, cotangent


def jax_side(x, offset, kernel, cotangent, repeats: int) -> dict:
    def deform(x, offset, kernel):
        return deform_conv2d(x, offset, kernel, padding=1)

    def plain(x, offset, kernel):
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), [(1, 1)] * 2,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    args = tuple(jnp.asarray(a) for a in (x, offset, kernel))
    out = {}
    for name, f in (("deformable", deform), ("plain", plain)):
        fwd = jax.jit(f)
        both = jax.jit(jax.value_and_grad(lambda *a, f=f: jnp.sum(f(*a) * cotangent), argnums=(0, 1, 2)))
        t0 = time.perf_counter()
        jax.block_until_ready(both(*args))
        compile_s = time.perf_counter() - t0
        t_fwd, y = time_calls(lambda: jax.block_until_ready(fwd(*args)), repeats)
        t_both, (_, grads) = time_calls(lambda: jax.block_until_ready(both(*args)), repeats)
        out[name] = dict(forward=t_fwd, both=t_both, compile=compile_s, y=np.asarray(y),
                         grads=[np.asarray(g) for g in grads])
    return out


def torch_side(x, offset, kernel, cotangent, repeats: int) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import torch

    import mmcv_ext
    mmcv_ext.install()
    from mmcv.ops import deform_conv2d as mmcv_deform_conv2d

    def nchw(a):
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))

    xt, ot, g = nchw(x).requires_grad_(True), nchw(offset).requires_grad_(True), nchw(cotangent)
    wt = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))).requires_grad_(True)
    out = {}
    for name, f in (("deformable", lambda: mmcv_deform_conv2d(xt, ot, wt, 1, 1)),
                    ("plain", lambda: torch.nn.functional.conv2d(xt, wt, padding=1))):
        def forward(f=f):
            with torch.no_grad():
                return f()

        def both(f=f):
            for t in (xt, ot, wt):
                t.grad = None
            (f() * g).sum().backward()
            return [t.grad for t in (xt, ot, wt)]

        t_fwd, y = time_calls(forward, repeats)
        t_both, grads = time_calls(both, repeats)
        grads = [grads[0].numpy().transpose(0, 2, 3, 1),
                 None if grads[1] is None else grads[1].numpy().transpose(0, 2, 3, 1),
                 grads[2].numpy().transpose(2, 3, 1, 0)]
        out[name] = dict(forward=t_fwd, both=t_both, y=y.numpy().transpose(0, 2, 3, 1), grads=grads)
    return out


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--height", type=count(1), default=100)
    ap.add_argument("--width", type=count(1), default=168)
    ap.add_argument("--channels", type=count(1), default=256)
    ap.add_argument("--repeats", type=count(1), default=3)
    ap.add_argument("--torch-repeats", type=count(1), default=1)
    args = ap.parse_args(argv)
    x, offset, kernel, cotangent = make_case(args.height, args.width, args.channels)
    print(f"{jax.devices()[0].device_kind} x {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; 2 x "
          f"{args.height}x{args.width}x{args.channels}, 3x3 -> {args.channels}, offsets U(-2, 2)", flush=True)
    ours = jax_side(x, offset, kernel, cotangent, args.repeats)
    ref = torch_side(x, offset, kernel, cotangent, args.torch_repeats)
    print("| implementation | forward ms | forward + backward ms |\n|---|---|---|")
    for name in ("deformable", "plain"):
        j, t = ours[name], ref[name]
        what = "mmcv deform_conv2d on the torch port of its CPU kernels" if name == "deformable" else "torch conv2d"
        print(f"| cankd_jax, {name} (jit; compile {j['compile']:.1f} s) | {1e3 * j['forward']:.0f} | "
              f"{1e3 * j['both']:.0f} |")
        print(f"| PyTorch, {what} | {1e3 * t['forward']:.0f} | {1e3 * t['both']:.0f} |")
    j, t = ours["deformable"], ref["deformable"]
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip([j["y"]] + j["grads"], [t["y"]] + t["grads"])]
    assert max(diffs) < 1e-3 * max(1.0, float(np.abs(t["y"]).max())), diffs
    print("\nmax |diff| against mmcv: output {:.2e}, d input {:.2e}, d offset {:.2e}, d weight {:.2e}".format(*diffs))
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
