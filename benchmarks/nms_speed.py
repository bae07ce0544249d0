"""Class-aware NMS on static shapes: the library's jumping loop against the suppression-matrix forms.

The case the detectors' post-processing hands NMS: K candidates of one image (5
levels x nms_pre=1000 = 5000 for RetinaNet), random boxes clustered so that many
overlap, 80 classes, keep at most 100. Three implementations, each jitted, each
result checked equal to the library's:

- `loop`: `cankd_jax.detection.nms.batched_nms` (while_loop over kept boxes, one IoU row each)
- `matrix_fori`: K x K suppression matrix, then a fori_loop over all K sorted boxes
- `matrix_jump`: K x K suppression matrix, then the library's jumping loop reading its rows

Timing: compilation excluded; median of `--repeats` calls, each waited for.

    python benchmarks/nms_speed.py
    python benchmarks/nms_speed.py --k 1000 --repeats 50
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from cankd_jax.detection.boxes import pairwise_iou
from cankd_jax.detection.nms import batched_nms, sort_order
from arg_types import count, fraction  # this folder's command-line value types  # noqa: E402


def _suppression_matrix(boxes, labels, order, thr):
    sb, sl = boxes[order], labels[order]
    iou = pairwise_iou(sb, sb)
    return (iou > thr) & (sl[:, None] == sl[None, :])


def nms_matrix_fori(boxes, scores, labels, valid, *, iou_threshold, max_out):
    k = boxes.shape[0]
    order = sort_order(scores, valid)
    sup = _suppression_matrix(boxes, labels, order, iou_threshold)
    later = jnp.arange(k)[None, :] > jnp.arange(k)[:, None]
    sup = sup & later

    def body(i, alive):
        return alive & ~(sup[i] & alive[i])

    alive = jax.lax.fori_loop(0, k, body, valid[order])
    rank = jnp.where(alive, jnp.arange(k), k)
    first = jnp.sort(rank)[:max_out]
    keep = jnp.where(first < k, order[jnp.minimum(first, k - 1)], -1)
    return keep.astype(jnp.int32), jnp.minimum(jnp.sum(alive), max_out).astype(jnp.int32)


def nms_matrix_jump(boxes, scores, labels, valid, *, iou_threshold, max_out):
    k = boxes.shape[0]
    order = sort_order(scores, valid)
    sup = _suppression_matrix(boxes, labels, order, iou_threshold)
    positions = jnp.arange(k)

    def cond(s):
        return (s[2] < max_out) & jnp.any(s[0])

    def body(s):
        alive, keep, n = s
        i = jnp.argmax(alive)
        return alive & ~sup[i] & (positions != i), keep.at[n].set(i), n + 1

    alive, keep, n = jax.lax.while_loop(cond, body, (valid[order], jnp.full((max_out,), -1, jnp.int32), jnp.int32(0)))
    return jnp.where(keep >= 0, order[jnp.maximum(keep, 0)], -1).astype(jnp.int32), n


def make_case(k: int, num_classes: int, seed: int = 0):
    r = np.random.default_rng(seed)
    centres = r.uniform(0, 800, (k // 20 + 1, 2))[r.integers(0, k // 20 + 1, k)] + r.normal(0, 8, (k, 2))
    wh = r.uniform(10, 120, (k, 2))
    boxes = np.concatenate([centres - wh / 2, centres + wh / 2], 1).astype(np.float32)
    scores = r.uniform(0.05, 1, k).astype(np.float32)
    labels = r.integers(0, num_classes, k).astype(np.int32)
    valid = np.ones(k, bool)
    return tuple(jnp.asarray(a) for a in (boxes, scores, labels, valid))


def time_fn(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=count(1), default=5000)
    ap.add_argument("--classes", type=count(1), default=80)
    ap.add_argument("--max-out", type=count(1), default=100)
    ap.add_argument("--iou", type=fraction, default=0.5)
    ap.add_argument("--repeats", type=count(1), default=20)
    a = ap.parse_args()
    args = make_case(a.k, a.classes)
    impls = {"loop": batched_nms, "matrix_fori": nms_matrix_fori, "matrix_jump": nms_matrix_jump}
    ref = None
    print(f"K={a.k}, {a.classes} classes, max_out={a.max_out}, IoU {a.iou}, {jax.devices()[0].platform}")
    print("| implementation | ms (median) | kept |")
    print("|---|---|---|")
    for name, f in impls.items():
        fn = jax.jit(lambda b, s, l, v, f=f: tuple(f(b, s, l, v, iou_threshold=a.iou, max_out=a.max_out)))
        keep, n = fn(*args)
        if ref is None:
            ref = np.asarray(keep)
        assert np.array_equal(np.asarray(keep), ref), f"{name} disagrees with the library's NMS"
        print(f"| {name} | {time_fn(fn, args, a.repeats):.2f} | {int(n)} |")


if __name__ == "__main__":
    main()
