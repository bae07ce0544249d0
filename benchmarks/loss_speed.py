"""CanKD loss: forward + backward time and peak memory, ours against the PyTorch formulation.

For the FPN levels of an 800x1333 detection image (B=2, C=256, Ci=128), one
training-mode step of the loss: value and gradients w.r.t. the student feature
and every loss parameter. "PyTorch" is the literal reference formulation in
tests/torch_reference.py (the authors' matmul order: the P x N attention matrix
is built), on the same machine in the same run, with as many threads as JAX.

Each measurement runs in a fresh subprocess so its peak resident memory
(ru_maxrss, which includes the framework's own, about 0.25-0.35 GB) is its own. The
literal form is skipped where its attention matrices would not fit in
--torch-mem-limit-gb.

    python benchmarks/loss_speed.py                 # all levels
    python benchmarks/loss_speed.py --levels P3 P4  # some
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from arg_types import count, positive  # this folder's command-line value types  # noqa: E402

LEVELS = {"P2": (200, 336), "P3": (100, 168), "P4": (50, 84), "P5": (25, 42), "P6": (13, 21)}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _time(fn, reps: int) -> float:
    """Median seconds of `reps` calls after one warm-up (compilation) call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def worker_jax(h: int, w: int, b: int, c: int, reps: int, attention: str) -> dict:
    import jax

    from cankd_jax.losses import CanKDLoss

    ks, kt, kp = jax.random.split(jax.random.key(0), 3)
    s = jax.random.normal(ks, (b, h, w, c))
    t = jax.random.normal(kt, (b, h, w, c))
    loss = CanKDLoss(c, loss_weight=10.0, attention=attention)
    v = jax.jit(lambda: loss.init(kp, s, t, train=False))()

    @jax.jit
    def step(params, batch_stats, s, t):
        def f(p, x):
            return loss.apply({"params": p, "batch_stats": batch_stats}, x, t, train=True, mutable=["batch_stats"])

        (value, upd), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, s)
        return value, grads, upd

    base = _peak_rss_gb()
    sec = _time(lambda: jax.block_until_ready(step(v["params"], v["batch_stats"], s, t)), reps)
    return {"sec": sec, "peak_gb": _peak_rss_gb(), "base_gb": base, "device": str(jax.devices()[0].device_kind)}


def worker_torch(h: int, w: int, b: int, c: int, reps: int, attention: str, threads: int) -> dict:
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import torch_reference as ref

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    s = torch.randn(b, c, h, w, requires_grad=True)
    t = torch.randn(b, c, h, w)
    loss = ref.CanKDLoss(c, loss_weight=10.0, attention=attention).train()

    def step():
        loss.zero_grad(set_to_none=True)
        s.grad = None
        loss(s, t).backward()

    base = _peak_rss_gb()
    sec = _time(step, reps)
    return {"sec": sec, "peak_gb": _peak_rss_gb(), "base_gb": base, "device": f"cpu x{threads} threads"}


def _run_worker(framework: str, level: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--levels", level,
           "--batch", str(args.batch), "--channels", str(args.channels), "--reps", str(args.reps),
           "--attention", args.attention, "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["killed"]
        return {"error": f"exit {proc.returncode}: {tail[0][:80]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", nargs="+", default=list(LEVELS), choices=list(LEVELS))
    p.add_argument("--batch", type=count(1), default=2)
    p.add_argument("--channels", type=count(1), default=256)
    p.add_argument("--reps", type=count(1), default=3)
    p.add_argument("--attention", default="dot")
    p.add_argument("--threads", type=count(1), default=os.cpu_count() or 1, help="PyTorch intra-op threads")
    p.add_argument("--torch-mem-limit-gb", type=positive, default=12.0,
                   help="skip the literal form where its attention matrices (value, gradient, softmax) exceed this")
    p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        h, w = LEVELS[args.levels[0]]
        if args.worker == "jax":
            out = worker_jax(h, w, args.batch, args.channels, args.reps, args.attention)
        else:
            out = worker_torch(h, w, args.batch, args.channels, args.reps, args.attention, args.threads)
        print(json.dumps(out))
        return

    rows = []
    for level in args.levels:
        h, w = LEVELS[level]
        p_, n_ = h * w, (h // 2) * (w // 2)
        a_gb = args.batch * p_ * n_ * 4 / 2**30  # one float32 P x N matrix for the batch
        ours = _run_worker("jax", level, args)
        if 3 * a_gb > args.torch_mem_limit_gb:
            theirs = {"error": f"skipped: the literal form needs > {3 * a_gb:.0f} GB"}
        else:
            theirs = _run_worker("torch", level, args)
        rows.append((level, h, w, a_gb / args.batch, ours, theirs))
        print(f"  measured {level}", file=sys.stderr, flush=True)

    import jax

    print(f"\nCanKD loss ({args.attention}), forward + backward, B={args.batch}, C={args.channels}, "
          f"Ci={args.channels // 2}; device: {jax.devices()[0].device_kind} ({os.cpu_count()} cores); "
          f"median of {args.reps}\n")
    header = "| level | H x W | literal P x N map / image | JAX ms | JAX peak RSS GB | PyTorch ms | PyTorch peak RSS GB | speed-up |"
    print(header)
    print("|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|")
    for level, h, w, a_gb, ours, theirs in rows:
        j_ms = f"{ours['sec'] * 1e3:.1f}" if "sec" in ours else ours["error"]
        j_gb = f"{ours['peak_gb']:.2f}" if "sec" in ours else "-"
        if "sec" in theirs:
            t_ms, t_gb = f"{theirs['sec'] * 1e3:.1f}", f"{theirs['peak_gb']:.2f}"
            ratio = f"{theirs['sec'] / ours['sec']:.1f}x" if "sec" in ours else "-"
        else:
            t_ms, t_gb, ratio = theirs["error"], "-", "-"
        print(f"| {level} | {h} x {w} | {a_gb:.2f} GB | {j_ms} | {j_gb} | {t_ms} | {t_gb} | {ratio} |")


if __name__ == "__main__":
    main()
