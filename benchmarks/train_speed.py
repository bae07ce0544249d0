"""Train-step throughput with and without the distillation loss: what CanKD costs per step.

Each case is one of our configs, built exactly as `train.py` builds it (networks,
connector, loss, optimizer, sharded state, the jitted and donated step), fed
random batches of the config's global batch so the input pipeline is not
measured:

  demo        configs/demo.py: FCN R18-d8 students on 64x64 synthetic scenes, batch 16
  dlv3        configs/cityscapes.py: DeepLabV3 R101-d8 -> R18-d8, 512x1024 crops, batch 8
  pspnet      configs/cityscapes.py:head=pspnet: PSPNet R101-d8 -> R18-d8, likewise

For each: the student alone (task loss only); the student distilled with
CanKD (teacher forward in inference mode + connector + CanKD loss + the task);
and, to separate the teacher's forward pass from the loss itself, the student
distilled with FitNet (the same teacher forward and connector, then a plain
MSE). Overheads are extra time per step relative to the student alone. On a CPU backend the
Cityscapes cases shrink to 128x256 crops and batch 2 (said in the table);
`--height/--width/--batch` set them anywhere. Teachers are randomly initialised
(speed does not depend on the weights).

Timing: the first step (compilation) is reported separately; then `--steps`
steps, each waited for; steps/s = steps / seconds, images/s = batch x steps/s.

    python benchmarks/train_speed.py
    python benchmarks/train_speed.py --cases dlv3 --steps 20 --loss mgd
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

from cankd_jax.config_arg import load_config
from cankd_jax.train import build
from cankd_jax.train.runner import phase_config
from cankd_jax.train.sharding import batch_sharding, check_global_batch, global_batch, make_mesh, replicated
from cankd_jax.train.state import plan_state
from cankd_jax.train.step import make_train_step

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
# case -> (config file, argument, phases of a comparison config: (without, with) the distillation loss)
CASES = {
    "demo": ("demo.py", "loss={loss}", ("student", "{loss}")),
    "dlv3": ("cityscapes.py", "head=deeplabv3,loss={loss}", None),
    "pspnet": ("cityscapes.py", "head=pspnet,loss={loss}", None),
}


def case_configs(case: str, loss: str):
    """(config without, config with) the distillation loss."""
    file, arg, phases = CASES[case]
    config = load_config(os.path.join(CONFIGS, file), arg.format(loss=loss))
    if phases:
        return tuple(phase_config(config, p.format(loss=loss), "/nonexistent") for p in phases)
    without = config.copy_and_resolve_references()
    without.distill = []
    return without, config


def reference_loss_config(case: str):
    """The case distilled with FitNet: the teacher's forward and the connector, at a negligible loss cost."""
    return case_configs(case, "fitnet")[1]


def time_step(config, mesh, size: tuple[int, int], steps: int) -> dict[str, float]:
    config = config.copy_and_resolve_references()
    config.teacher.checkpoint, config.teacher.random_init = "", True  # speed does not depend on the weights
    run = build.build_run(config, mesh, input_size=size)
    plan = plan_state(run.init_variables, run.tx, config.seed, mesh)
    state, shardings = plan.init(), plan.shardings
    step = jax.jit(
        make_train_step(student=run.student, teacher=run.teacher, terms=run.terms, task=run.task, tx=run.tx,
                        schedule=run.schedule),
        in_shardings=(shardings, run.teacher_shardings, batch_sharding(mesh)),
        out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))
    local = check_global_batch(config.batch_size, mesh)
    rng = np.random.default_rng(0)
    batch = global_batch({"image": rng.standard_normal((local, *size, 3), np.float32),
                          "label": rng.integers(0, config.task.num_classes, (local, *size)).astype(np.int32)}, mesh)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        state, metrics = step(state, run.teacher_vars, batch)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, run.teacher_vars, batch)
            jax.block_until_ready(metrics)
        seconds = time.perf_counter() - t0
    return {"compile_s": compile_s, "steps_per_s": steps / seconds, "images_per_s": config.batch_size * steps / seconds}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--loss", default="cankd", help="distillation loss (a preset name, e.g. cankd, mgd, cwd)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default on CPU: 20 for demo, else 5; 50 on accelerators)")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="global batch of the Cityscapes cases")
    args = ap.parse_args(argv)

    # The students' state init compiles far sooner on CPU with rbg than with threefry; speed does not
    # depend on the initial values.
    jax.config.update("jax_default_prng_impl", "rbg")
    mesh = make_mesh()
    cpu = jax.default_backend() == "cpu"
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})"
    print(f"device: {device}; jax {jax.__version__}; loss: {args.loss}\n")
    print(f"| case | input | batch | student alone: steps/s | images/s | + {args.loss}: steps/s | images/s | "
          f"overhead | + fitnet: steps/s | overhead | {args.loss} over fitnet | compile s (alone / +{args.loss}) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        without, with_loss = case_configs(case, args.loss)
        if case == "demo":
            size = (without.data.image_size,) * 2
        else:
            size = (128, 256) if cpu else tuple(without.data.crop_size)
            size = (args.height or size[0], args.width or size[1])
            batch = args.batch or (2 if cpu else without.batch_size)
            without.batch_size = with_loss.batch_size = batch
        steps = args.steps or (50 if not cpu else 20 if case == "demo" else 5)
        reference = reference_loss_config(case)
        reference.batch_size = without.batch_size
        a = time_step(without, mesh, size, steps)
        b = time_step(with_loss, mesh, size, steps)
        f = time_step(reference, mesh, size, steps)
        over = lambda r: 100.0 * (a["steps_per_s"] / r["steps_per_s"] - 1.0)  # noqa: E731
        loss_ms = 1000.0 * (1.0 / b["steps_per_s"] - 1.0 / f["steps_per_s"])
        print(f"| {case} | {size[0]}x{size[1]} | {without.batch_size} | {a['steps_per_s']:.2f} | {a['images_per_s']:.1f} | "
              f"{b['steps_per_s']:.2f} | {b['images_per_s']:.1f} | +{over(b):.0f}% | {f['steps_per_s']:.2f} | "
              f"+{over(f):.0f}% | {loss_ms:+.0f} ms/step | {a['compile_s']:.0f} / {b['compile_s']:.0f} |", flush=True)
    print("\noverhead: extra time per step relative to the student alone (teacher forward, connector, loss and "
          "their backward); 'over fitnet': the loss's own cost, with the teacher and connector the same.")


if __name__ == "__main__":
    main(sys.argv[1:])
