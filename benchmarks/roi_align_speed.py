"""RoIAlign over a feature pyramid, forward and backward: `cankd_jax.detection.roi_align` against mmdetection's
`SingleRoIExtractor` on the torch port of mmcv's CPU kernel (`tests/mmcv_ext.py`), in the same run.

The case Faster R-CNN's RoI head trains on: 2 images at 800x1344, FPN P2-P5 with 256 channels, 512 sampled
RoIs per image (`RoIAlign(7, sampling_ratio=0, aligned=True)`, finest scale 56), float32. RoIs are drawn like
proposals: log-uniform sizes from 8 to 1000 px, aspect ratios 1/3 to 3, clipped to the image; `--thin N`
replaces N of them with 3-px-tall full-width boxes (the RoIs that need the most grid points). Both sides
compute the features of every RoI and the gradient of `sum(features * cotangent)` with respect to the
pyramid; the results are checked to agree (max |diff| printed). Ours runs twice: as it is (`tiered`: RoIs
sorted by their grid, each chunk on the smallest static grid that covers it) and evaluating the static bound
for every RoI (`tiered=False`). Timing: compilation excluded, median of
`--repeats` calls, each waited for; the machine's load is printed.

    python benchmarks/roi_align_speed.py                       # needs the openmmlab test extra
    python benchmarks/roi_align_speed.py --height 400 --width 672 --rois 256 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cankd_jax.detection.roi_align import extract_roi_features, map_roi_levels, max_grid_samples
from arg_types import count  # this folder's command-line value types  # noqa: E402

STRIDES = (4, 8, 16, 32)


def make_case(height: int, width: int, rois_per_image: int, channels: int, thin: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = [rng.standard_normal((2, -(-height // s), -(-width // s), channels)).astype(np.float32)
             for s in STRIDES]
    n = 2 * rois_per_image
    size = np.exp(rng.uniform(np.log(8), np.log(1000), n))
    ratio = np.exp(rng.uniform(np.log(1 / 3), np.log(3), n))
    w, h = size * np.sqrt(ratio), size / np.sqrt(ratio)
    cx, cy = rng.uniform(0, width, n), rng.uniform(0, height, n)
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    boxes = np.clip(boxes, 0, [width, height, width, height])
    if thin:
        y = rng.uniform(0, height - 3, thin)
        boxes[:thin] = np.stack([np.zeros(thin), y, np.full(thin, width), y + 3], 1)
    b = np.repeat([0, 1], rois_per_image)
    rois = np.concatenate([b[:, None], boxes], 1).astype(np.float32)
    cotangent = rng.standard_normal((n, 7, 7, channels)).astype(np.float32)
    return feats, rois, cotangent


def time_calls(fn, repeats: int) -> tuple[float, object]:
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def jax_side(feats, rois, cotangent, repeats: int, chunk: int, tiered: bool):
    def loss(fs):
        return jnp.sum(extract_roi_features(fs, jnp.asarray(rois), STRIDES, chunk=chunk, tiered=tiered) * cotangent)

    fwd = jax.jit(lambda fs: extract_roi_features(fs, jnp.asarray(rois), STRIDES, chunk=chunk, tiered=tiered))
    both = jax.jit(jax.value_and_grad(loss))
    fs = [jnp.asarray(f) for f in feats]
    t0 = time.perf_counter()
    jax.block_until_ready(both(fs))
    compile_s = time.perf_counter() - t0
    t_fwd, y = time_calls(lambda: jax.block_until_ready(fwd(fs)), repeats)
    t_both, (_, grads) = time_calls(lambda: jax.block_until_ready(both(fs)), repeats)
    return {"forward": t_fwd, "forward+backward": t_both, "compile": compile_s}, np.asarray(y), grads


def torch_side(feats, rois, cotangent, repeats: int):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import torch

    import openmmlab_reference as mr
    if mr.available():
        raise SystemExit(mr.available())
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    cfg = Config.fromfile(f"{mr.CONFIGS}/_base_/models/faster-rcnn_r50_fpn.py").model.roi_head.bbox_roi_extractor
    cfg.out_channels = feats[0].shape[-1]
    with DefaultScope.overwrite_default_scope("mmdet"):
        extractor = MODELS.build(cfg)
    xs = [mr.nchw(f).requires_grad_(True) for f in feats]
    r, g = torch.from_numpy(rois), mr.nchw(cotangent)

    def forward():
        with torch.no_grad():
            return extractor(xs, r)

    def both():
        for x in xs:
            x.grad = None
        y = extractor(xs, r)
        (y * g).sum().backward()
        return [x.grad for x in xs]

    t_fwd, y = time_calls(forward, repeats)
    t_both, grads = time_calls(both, repeats)
    return {"forward": t_fwd, "forward+backward": t_both}, mr.nhwc(y), [mr.nhwc(x) for x in grads]


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--height", type=count(1), default=800)
    ap.add_argument("--width", type=count(1), default=1344)
    ap.add_argument("--rois", type=count(1), default=512, help="RoIs per image (2 images)")
    ap.add_argument("--channels", type=count(1), default=256)
    ap.add_argument("--thin", type=count(0), default=0)
    ap.add_argument("--chunk", type=count(1), default=64)
    ap.add_argument("--repeats", type=count(1), default=3)
    args = ap.parse_args(argv)
    feats, rois, cotangent = make_case(args.height, args.width, args.rois, args.channels, args.thin)
    k = max_grid_samples([f.shape[1:3] for f in feats], STRIDES)
    print(f"{jax.devices()[0].device_kind} x {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; "
          f"2 x {args.height}x{args.width}, {2 * args.rois} RoIs ({args.thin} thin), C={args.channels}, "
          f"P2-P5; static bound {k} grid points per bin, the RoIs' mean {mean_grid(rois):.1f}", flush=True)
    ours = {tiered: jax_side(feats, rois, cotangent, args.repeats, args.chunk, tiered) for tiered in (True, False)}
    tt, ty, tg = torch_side(feats, rois, cotangent, args.repeats)
    print("| implementation | forward ms | forward + backward ms |\n|---|---|---|")
    for tiered, (jt, _, _) in ours.items():
        form = "tiered grids" if tiered else "the static bound for every RoI"
        print(f"| cankd_jax, {form} (jit; compile {jt['compile']:.1f} s) | {1e3 * jt['forward']:.0f} | "
              f"{1e3 * jt['forward+backward']:.0f} |")
    print(f"| mmdet SingleRoIExtractor + mmcv CPU kernel (torch port) | {1e3 * tt['forward']:.0f} | "
          f"{1e3 * tt['forward+backward']:.0f} |")
    for tiered, (_, jy, jg) in ours.items():
        diff_y = float(np.max(np.abs(jy - ty)))
        diff_g = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(jg, tg))
        print(f"\n{'tiered' if tiered else 'static'}: max |diff| against mmcv: features {diff_y:.2e}, "
              f"gradients {diff_g:.2e}", end="")
    print(f"\nload after {os.getloadavg()[0]:.2f}")


def mean_grid(rois: np.ndarray) -> float:
    """The mean of mmcv's adaptive `gh gw` over the RoIs, each on its `map_roi_levels` level."""
    levels = np.asarray(map_roi_levels(jnp.asarray(rois), len(STRIDES)))
    scale = 1.0 / np.asarray(STRIDES, np.float64)[levels]
    h = (rois[:, 4] - rois[:, 2]) * scale
    w = (rois[:, 3] - rois[:, 1]) * scale
    return float(np.mean(np.ceil(h / 7) * np.ceil(w / 7)))


if __name__ == "__main__":
    main(sys.argv[1:])
