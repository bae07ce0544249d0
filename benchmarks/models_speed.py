"""Network throughput: teacher forward (inference) and student forward + backward, in images/s.

The paper's networks at the paper's sizes: DeepLabV3 on ResNet-101-d8 (teacher)
and ResNet-18-d8 (student) at 512x1024 (Cityscapes crops), and the ResNet-50
FPN detection trunk (mmdet's RetinaNet neck, `frozen_stages=1`, `norm_eval`) at
800x1333; batch 2, float32 and bfloat16 compute (float32 parameters). The
student step is one `jax.value_and_grad` of a stand-in loss (mean square of
every output the task uses) with BatchNorm in training mode.

Timing: the first call (compilation) is excluded and reported separately;
then `--steps` calls, each waited for with `block_until_ready`; images/s =
batch x steps / seconds. On a CPU backend the default inputs shrink to 128x256
and 200x333 (said in the table); `--height/--width` set every case's input.

    python benchmarks/models_speed.py
    python benchmarks/models_speed.py --cases r18_d8_student --dtypes bfloat16 --steps 10
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cankd_jax import models
from arg_types import count  # this folder's command-line value types  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
    label: str
    build: Callable[[object], object]  # dtype -> model
    task: str  # "seg" or "det": picks the input size
    train: bool  # student forward + backward, else teacher inference


CASES = {
    "r101_d8_teacher": Case("DeepLabV3 R101-d8, teacher forward",
                            lambda dt: models.make_model("deeplabv3", backbone="resnet101_v1c_d8", num_classes=19,
                                                         dtype=dt), "seg", False),
    "r18_d8_student": Case("DeepLabV3 R18-d8, student fwd+bwd",
                           lambda dt: models.make_model("deeplabv3", backbone="resnet18_v1c_d8", num_classes=19,
                                                        dtype=dt), "seg", True),
    "r50_fpn_teacher": Case("R50-FPN trunk, forward",
                            lambda dt: models.make_model("retinanet_fpn", backbone="resnet50", dtype=dt), "det", False),
    "r50_fpn_student": Case("R50-FPN trunk, student fwd+bwd",
                            lambda dt: models.make_model("retinanet_fpn", backbone="resnet50", dtype=dt), "det", True),
}
FULL_SIZES = {"seg": (512, 1024), "det": (800, 1333)}
CPU_SIZES = {"seg": (128, 256), "det": (200, 333)}


def synthetic_variables(model, x) -> dict:
    """Variables of the right shapes without compiling an init (threefry init compiles slowly on CPU):
    He-normal kernels, unit BatchNorm, zero biases and statistics; values only need to be finite and O(1)."""
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = str(path[-1].key)
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), leaf.shape).astype(np.float32))
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _task_outputs(out: dict) -> list:
    return [v for k, v in out.items() if k in ("logits", "aux_logits") or k.startswith("fpn.")]


def make_step(model, train: bool) -> Callable:
    if not train:
        return jax.jit(lambda v, x: model.apply(v, x, train=False))

    def loss(params, stats, x):
        out, upd = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"],
                               rngs={"dropout": jax.random.key(0)})
        return sum(jnp.mean(jnp.square(o.astype(jnp.float32))) for o in _task_outputs(out)), upd

    grad = jax.value_and_grad(loss, has_aux=True)
    return jax.jit(lambda v, x: grad(v["params"], v["batch_stats"], x))


def measure(case: Case, dtype, size: tuple[int, int], batch: int, steps: int) -> tuple[float, float]:
    """(compile + first call seconds, images/s)."""
    model = case.build(dtype)
    x = jax.random.normal(jax.random.key(1), (batch, *size, 3), jnp.float32)
    variables = synthetic_variables(model, x)
    step = make_step(model, case.train)
    t0 = time.perf_counter()
    jax.block_until_ready(step(variables, x))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(step(variables, x))
    return first, batch * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--height", type=count(1), help="input height for every case (default: the case's, see above)")
    p.add_argument("--width", type=count(1), help="input width for every case")
    p.add_argument("--batch", type=count(1), default=2)
    p.add_argument("--steps", type=count(1), help="timed calls per row (default 10; 2 on CPU)")
    args = p.parse_args()

    on_cpu = jax.default_backend() == "cpu"
    sizes = CPU_SIZES if on_cpu else FULL_SIZES
    steps = args.steps or (2 if on_cpu else 10)
    rows = []
    for name in args.cases:
        case = CASES[name]
        size = (args.height or sizes[case.task][0], args.width or sizes[case.task][1])
        for dt in args.dtypes:
            first, ips = measure(case, jnp.dtype(dt), size, args.batch, steps)
            rows.append((case.label, dt, size, first, ips))
            print(f"  measured {name} {dt}: {ips:.2f} images/s", file=sys.stderr, flush=True)

    device = jax.devices()[0]
    kind = f"{device.device_kind} ({os.cpu_count()} cores)" if on_cpu else device.device_kind
    note = ""
    if on_cpu and not (args.height or args.width):
        note = (f" CPU backend: inputs reduced from 512x1024 / 800x1333 to {CPU_SIZES['seg'][0]}x{CPU_SIZES['seg'][1]}"
                f" / {CPU_SIZES['det'][0]}x{CPU_SIZES['det'][1]}.")
    print(f"\nNetwork throughput on {kind}, jax {jax.__version__}; batch {args.batch}, {steps} timed steps after "
          f"one compile + warm-up call.{note}\n")
    print("| network | compute dtype | input H x W | first call s (compile) | images/s |")
    print("|---|---|---|---|---|")
    for label, dt, size, first, ips in rows:
        print(f"| {label} | {dt} | {size[0]} x {size[1]} | {first:.1f} | {ips:.2f} |")


if __name__ == "__main__":
    main()
