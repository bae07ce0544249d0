"""Swin on the CPU: `cankd_jax.models.swin` against mmdetection 3.3's `SwinTransformer` itself, same weights, same run.

Two cases, float32, at the COCO size (800x1344):
- `block`: one shifted-window block of stage 1 (200x336 tokens, 96 channels, 3 heads: the widest map Swin
  attends over), forward and forward + backward of `sum(out * cotangent)` w.r.t. the input and the weights;
- `backbone`: the whole Swin-S (the Mask R-CNN teacher's) forward in inference mode, as a teacher runs.

Ours is jitted (compilation excluded, printed); mmdet's runs eagerly (PyTorch's usual mode). Timing: median of
`--repeats` calls, each waited for; the outputs are checked to agree (max |diff| printed).

    python benchmarks/swin_speed.py                    # needs the openmmlab test extra
    python benchmarks/swin_speed.py --height 512 --width 512 --repeats 3 --markdown results/swin/cpu.md
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
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from cankd_jax import models  # noqa: E402
from cankd_jax.interop import torch_models as interop  # noqa: E402
from cankd_jax.models.swin import SwinBlock  # noqa: E402
from arg_types import count  # this folder's command-line value types  # noqa: E402


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def block_case(h: int, w: int, repeats: int) -> dict:
    from mmdet.models.backbones.swin import SwinBlock as TorchBlock

    torch.manual_seed(0)
    tb = TorchBlock(embed_dims=96, num_heads=3, feedforward_channels=384, window_size=7, shift=True).eval()
    ours = SwinBlock(num_heads=3, window=7, shift=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, h, w, 96)).astype(np.float32)
    cot = rng.standard_normal((1, h, w, 96)).astype(np.float32)
    sd = {k: v for k, v in tb.state_dict().items()}
    params, _ = interop.import_state_dict(ours, sd, sample=jnp.zeros((1, h, w, 96)))

    fwd = jax.jit(lambda p, x: ours.apply(p, x, False))
    both = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(ours.apply(p, x, False) * cot), argnums=(0, 1)))
    xj = jnp.asarray(x)
    t0 = time.perf_counter()
    jax.block_until_ready((fwd(params, xj), both(params, xj)))
    compile_s = time.perf_counter() - t0
    out = {"jax forward": median_time(lambda: jax.block_until_ready(fwd(params, xj)), repeats),
           "jax forward+backward": median_time(lambda: jax.block_until_ready(both(params, xj)), repeats),
           "jax compile": compile_s}
    xt = torch.from_numpy(x.reshape(1, h * w, 96))
    ct = torch.from_numpy(cot.reshape(1, h * w, 96))

    def t_fwd():
        with torch.no_grad():
            return tb(xt, (h, w))

    def t_both():
        tb.zero_grad()
        xg = xt.clone().requires_grad_(True)
        (tb(xg, (h, w)) * ct).sum().backward()
        return xg.grad

    out["torch forward"] = median_time(t_fwd, repeats)
    out["torch forward+backward"] = median_time(t_both, repeats)
    diff = np.abs(np.asarray(fwd(params, xj)).reshape(1, h * w, 96) - t_fwd().numpy()).max()
    gx = np.asarray(both(params, xj)[1][1]).reshape(1, h * w, 96)
    out["max |diff| forward / input gradient"] = f"{diff:.1e} / {np.abs(gx - t_both().numpy()).max():.1e}"
    return out


def backbone_case(h: int, w: int, repeats: int) -> dict:
    from mmdet.models.backbones import SwinTransformer

    torch.manual_seed(0)
    tm = SwinTransformer(embed_dims=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7)
    tm.eval()  # mmdet's train() override returns None, so no chaining
    ours = models.make_model("swin_small")
    variables, _ = interop.import_state_dict(ours, tm.state_dict())
    x = np.random.default_rng(1).standard_normal((1, h, w, 3)).astype(np.float32)
    fwd = jax.jit(lambda v, x: ours.apply(v, x, train=False))
    xj = jnp.asarray(x)
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(variables, xj))
    compile_s = time.perf_counter() - t0
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    def t_fwd():
        with torch.no_grad():
            return tm(xt)

    out = {"jax forward": median_time(lambda: jax.block_until_ready(fwd(variables, xj)), repeats),
           "jax compile": compile_s, "torch forward": median_time(t_fwd, repeats)}
    ours_out, theirs = fwd(variables, xj), t_fwd()
    out["max |diff| layer4 / its max"] = (
        f"{np.abs(np.asarray(ours_out['layer4']) - theirs[3].numpy().transpose(0, 2, 3, 1)).max():.1e} / "
        f"{np.abs(theirs[3].numpy()).max():.1e}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--height", type=count(1), default=800)
    p.add_argument("--width", type=count(1), default=1344)
    p.add_argument("--repeats", type=count(1), default=3)
    p.add_argument("--markdown", default="")
    a = p.parse_args(argv)
    import openmmlab_reference  # noqa: F401  (mmcv's kernels' stand-ins, so that mmdet imports)

    rows = [("block (stage 1, shifted)", block_case(a.height // 4, a.width // 4, a.repeats)),
            ("Swin-S backbone, inference", backbone_case(a.height, a.width, a.repeats))]
    lines = [f"# Swin on {os.cpu_count()} CPU cores, {a.height}x{a.width}, 1 image, float32",
             "", f"    python benchmarks/swin_speed.py --height {a.height} --width {a.width} --repeats {a.repeats}", "",
             f"JAX {jax.__version__} (jitted), PyTorch {torch.__version__} (eager, {torch.get_num_threads()} threads); "
             f"median of {a.repeats} calls, seconds; load average before: {os.getloadavg()[0]:.2f}", ""]
    for name, res in rows:
        lines.append(f"## {name}\n")
        lines += [f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in res.items()]
        for what in ("forward", "forward+backward"):
            if f"jax {what}" in res:
                lines.append(f"- torch / jax, {what}: {res[f'torch {what}'] / res[f'jax {what}']:.2f}x")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if a.markdown:
        os.makedirs(os.path.dirname(a.markdown) or ".", exist_ok=True)
        with open(a.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
