"""Train-step throughput with and without the distillation loss: what CanKD costs per step.

Each case is one of our configs, built exactly as `train.py` builds it (networks,
connector, loss, optimizer, sharded state, the jitted and donated step), fed
random batches of the config's global batch so the input pipeline is not
measured:

  demo        configs/demo.py: FCN R18-d8 students on 64x64 synthetic scenes, batch 16
  dlv3        configs/cityscapes.py: DeepLabV3 R101-d8 -> R18-d8, 512x1024 crops, batch 8
  pspnet      configs/cityscapes.py:head=pspnet: PSPNet R101-d8 -> R18-d8, likewise
  det_demo    configs/detection_demo.py: FCOS R18 w8 students on 128x128 synthetic scenes, batch 8
  retinanet   configs/coco.py: RetinaNet R101 trunk -> RetinaNet R50, distilled on P3-P6 (four loss modules),
              800x1344 (the landscape bucket of 1333x800) x 2 per device
  fcos        configs/coco.py:detector=fcos: FCOS R101-caffe trunk -> FCOS R50-caffe, likewise

For each: the student alone (task loss only); the student distilled with
CanKD (teacher forward in inference mode + connector + CanKD loss + the task);
and, to separate the teacher's forward pass from the loss itself, the student
distilled with FitNet (the same teacher forward and connector, then a plain
MSE). Overheads are extra time per step relative to the student alone. On a CPU backend the
Cityscapes cases shrink to 128x256 crops and batch 2, the COCO ones to 256x384 and batch 2
(said in the table); `--height/--width/--batch` set them anywhere (the COCO cases at the
paper's size: `--cases retinanet fcos --height 800 --width 1344 --batch 2N` on N devices).
Detection batches carry random boxes (6 per image, up to 16). Teachers are randomly
initialised (speed does not depend on the weights).

`--eval` adds, for the detection cases, the evaluation side: the jitted post-processing alone
(per-level top-1000 of logits drawn so that most pairs pass the 0.05 threshold, as a trained
detector's do, decode, class-aware NMS, the best 100) in images/s; the evaluator's whole jitted
function (the student's inference forward + post-processing); and the host side, collecting
100 detections per image and pycocotools' COCOeval against a ground truth of 7 objects per
image (COCO val2017's average), in images/s.

Timing: the first step (compilation) is reported separately; then `--steps`
steps, each waited for; steps/s = steps / seconds, images/s = batch x steps/s.

    python benchmarks/train_speed.py
    python benchmarks/train_speed.py --cases dlv3 --steps 20 --loss mgd
    python benchmarks/train_speed.py --cases retinanet fcos --eval
    python benchmarks/train_speed.py --cases retinanet fcos --height 800 --width 1344 --batch 2   # one GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import numpy as np

from cankd_jax.config_arg import load_config
from cankd_jax.data.detection import bucket_shapes
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
    "det_demo": ("detection_demo.py", "loss={loss}", ("student", "{loss}")),
    "retinanet": ("coco.py", "detector=retinanet,teacher=retinanet_r101,loss={loss}", None),
    "fcos": ("coco.py", "detector=fcos,teacher=fcos_r101,loss={loss}", None),
}
DETECTION = ("det_demo", "retinanet", "fcos")
MAX_BOXES = 16


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


def random_batch(config, local: int, size: tuple[int, int], rng: np.random.Generator) -> dict:
    """A batch of the config's task: images and labels (segmentation maps, classes, or padded boxes)."""
    image = rng.standard_normal((local, *size, 3), np.float32)
    k = config.task.num_classes
    if config.task.name != "detection":
        return {"image": image, "label": rng.integers(0, k, (local, *size)).astype(np.int32)}
    h, w = size
    xy = rng.uniform(0, 0.7, (local, MAX_BOXES, 2)) * (w, h)
    wh = rng.uniform(0.05, 0.3, (local, MAX_BOXES, 2)) * (w, h)
    boxes = np.concatenate([xy, np.minimum(xy + wh, (w, h))], -1).astype(np.float32)
    return {"image": image,
            "label": {"boxes": boxes, "labels": rng.integers(0, k, (local, MAX_BOXES)).astype(np.int32),
                      "valid": np.arange(MAX_BOXES)[None].repeat(local, 0) < 6,
                      "img_shape": np.tile(np.float32(size), (local, 1)),
                      "pad_shape": np.tile(np.float32(size), (local, 1))}}


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
    batch = global_batch(random_batch(config, local, size, np.random.default_rng(0)), mesh)
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


def _timed(fn, *args, repeat: int):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeat):
        out = jax.block_until_ready(fn(*args))
    return out, compile_s, (time.perf_counter() - t0) / repeat


def eval_speed(config, mesh, size: tuple[int, int], batch: int, repeat: int = 5, coco_images: int = 500) -> dict:
    """Images/s of detection evaluation: post-processing alone, forward + post-processing, and COCOeval on the host."""
    config = config.copy_and_resolve_references()
    config.distill = []
    run = build.build_run(config, mesh, input_size=size)
    task, student = run.task, run.student
    params, stats = jax.jit(run.init_variables)(jax.random.key(0))
    variables = {"params": params["student"], "batch_stats": stats["student"]}
    rng = np.random.default_rng(0)
    local = {"image": rng.standard_normal((batch, *size, 3), np.float32),
             "img_shape": np.tile(np.float32(size), (batch, 1)), "scale_factor": np.ones((batch, 2), np.float32),
             "image_id": np.arange(batch, dtype=np.int32), "valid": np.ones(batch, bool)}
    shapes = jax.eval_shape(lambda: student.apply(variables, local["image"], train=False))
    # Logits around -4: about one (prior, class) pair in seven passes the 0.05 threshold, so every level's top-k
    # is full and NMS keeps 100 boxes, as with a trained detector; random deltas / distances around the priors.
    heads = {"cls_scores": [rng.normal(-4.0, 1.0, m.shape).astype(np.float32) for m in shapes["cls_scores"]],
             "bbox_preds": [(np.abs(rng.normal(0, 1, m.shape)) * (20 if config.task.detector == "fcos" else 0.3))
                            .astype(np.float32) for m in shapes["bbox_preds"]]}
    if "centernesses" in shapes:
        heads["centernesses"] = [rng.normal(0, 1, m.shape).astype(np.float32) for m in shapes["centernesses"]]
    detect = jax.jit(task.detect)
    dets, post_compile, post_s = _timed(detect, heads, local["img_shape"], local["scale_factor"], repeat=repeat)
    forward = jax.jit(lambda v, b: task.eval_outputs(student.apply(v, b["image"], train=False), b),
                      out_shardings=replicated(mesh))
    with jax.set_mesh(mesh):
        _, fwd_compile, fwd_s = _timed(forward, variables, global_batch(local, mesh), repeat=repeat)
    # Host side: coco_images images of 100 detections each against 7 objects per image (COCO val2017's average).
    host = {k: np.asarray(v) for k, v in dets._asdict().items()}
    k = task.num_classes
    images = [{"id": i, "height": size[0], "width": size[1]} for i in range(coco_images)]
    annotations = []
    for i in range(coco_images):
        for j in range(7):
            x, y = rng.uniform(0, size[1] * 0.7), rng.uniform(0, size[0] * 0.7)
            w, h = rng.uniform(8, size[1] * 0.3), rng.uniform(8, size[0] * 0.3)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(rng.integers(1, k + 1)),
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    task = dataclasses.replace(task, ground_truth={"images": images, "annotations": annotations,
                                                   "categories": [{"id": c} for c in range(1, k + 1)]})
    t0 = time.perf_counter()
    total = None
    for start in range(0, coco_images, batch):
        ids = np.arange(start, start + batch) % coco_images
        total = task.accumulate(total, {"boxes": host["boxes"], "scores": host["scores"], "labels": host["labels"],
                                        "num_valid": host["num_valid"], "image_id": ids,
                                        "valid": np.arange(start, start + batch) < coco_images})
    task.summarize(total)
    coco_s = time.perf_counter() - t0
    return {"post_images_per_s": batch / post_s, "post_compile_s": post_compile,
            "forward_images_per_s": batch / fwd_s, "forward_compile_s": fwd_compile,
            "coco_images_per_s": coco_images / coco_s}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--loss", default="cankd", help="distillation loss (a preset name, e.g. cankd, mgd, cwd)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default on CPU: 20 for demo, else 5; 50 on accelerators)")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="global batch of the Cityscapes and COCO cases")
    ap.add_argument("--eval", action="store_true", help="also time detection post-processing and COCO evaluation")
    args = ap.parse_args(argv)

    # The students' state init compiles far sooner on CPU with rbg than with threefry; speed does not
    # depend on the initial values.
    jax.config.update("jax_default_prng_impl", "rbg")
    mesh = make_mesh()
    cpu = jax.default_backend() == "cpu"
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})"
    print(f"device: {device}; jax {jax.__version__}; loss: {args.loss}\n")
    print(f"| case | input | batch | student alone: steps/s | images/s | + {args.loss}: steps/s | images/s | "
          f"overhead | + fitnet: steps/s | overhead | {args.loss} over fitnet | {args.loss}'s share of its step | "
          f"compile s (alone / +{args.loss}) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    evals = []
    for case in args.cases:
        without, with_loss = case_configs(case, args.loss)
        if case == "demo":
            size = (without.data.image_size,) * 2
        elif case == "det_demo":
            size = bucket_shapes(without.data.scale)[0]
        else:
            full = tuple(without.data.crop_size) if case in ("dlv3", "pspnet") else bucket_shapes(without.data.scale)[0]
            size = ((128, 256) if case in ("dlv3", "pspnet") else (256, 384)) if cpu else full
            size = (args.height or size[0], args.width or size[1])
            batch = args.batch or (2 if cpu else 2 * jax.device_count() if case in DETECTION else without.batch_size)
            without.batch_size = with_loss.batch_size = batch
        steps = args.steps or (50 if not cpu else 20 if case in ("demo", "det_demo") else 5)
        reference = reference_loss_config(case)
        reference.batch_size = without.batch_size
        a = time_step(without, mesh, size, steps)
        b = time_step(with_loss, mesh, size, steps)
        f = time_step(reference, mesh, size, steps)
        over = lambda r: 100.0 * (a["steps_per_s"] / r["steps_per_s"] - 1.0)  # noqa: E731
        loss_ms = 1000.0 * (1.0 / b["steps_per_s"] - 1.0 / f["steps_per_s"])
        print(f"| {case} | {size[0]}x{size[1]} | {without.batch_size} | {a['steps_per_s']:.2f} | {a['images_per_s']:.1f} | "
              f"{b['steps_per_s']:.2f} | {b['images_per_s']:.1f} | +{over(b):.0f}% | {f['steps_per_s']:.2f} | "
              f"+{over(f):.0f}% | {loss_ms:+.0f} ms/step | {100 * loss_ms * b['steps_per_s'] / 1000:.0f}% | "
              f"{a['compile_s']:.0f} / {b['compile_s']:.0f} |", flush=True)
        if args.eval and case in DETECTION:
            evals.append((case, size, without.batch_size, eval_speed(without, mesh, size, without.batch_size)))
    print("\noverhead: extra time per step relative to the student alone (teacher forward, connector, loss and "
          "their backward); 'over fitnet': the loss's own cost, with the teacher and connector the same; its share: "
          "that cost over the whole distilled step.")
    if evals:
        print("\n| case | input | batch | post-processing images/s | forward + post-processing images/s | "
              "COCOeval (collect + evaluate) images/s | compile s (post-processing / forward) |")
        print("|---|---|---|---|---|---|---|")
        for case, size, batch, e in evals:
            print(f"| {case} | {size[0]}x{size[1]} | {batch} | {e['post_images_per_s']:.1f} | "
                  f"{e['forward_images_per_s']:.1f} | {e['coco_images_per_s']:.0f} | "
                  f"{e['post_compile_s']:.0f} / {e['forward_compile_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
