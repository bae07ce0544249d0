"""Timing and counting a config's train step on this machine: the library side of `benchmarks/train_speed.py`.

`build_step` builds a config's step exactly as `train.py` does (networks, connector, loss, optimizer, the jitted
and donated step on this process's mesh) with a random batch of the config's task; `time_step` times it (median
of steps, compilation apart, with XLA's FLOP count and peak memory); `lowered_flops` counts without compiling;
`time_loss_alone` times the distillation loss at the step's shapes; `eval_speed` the detection evaluation;
`matmul_rate` this machine's float32 matmul rate; `peak_bf16` a device's dense bfloat16 peak. Nothing here
loads data (Grain, TFDS) or writes logs.
"""

from __future__ import annotations

import dataclasses
import gzip
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from cankd_jax.data.detection import empty_train_label
from cankd_jax.train import build
from cankd_jax.train.sharding import check_global_batch, global_batch, make_mesh, replicated
from cankd_jax.train.state import plan_state
from cankd_jax.train.step import jit_step, make_train_step

MAX_BOXES = 16  # padded boxes per image in a random detection batch (six of them objects)
PROFILE_STEPS = 3  # steps `time_step(profile=...)` traces, after the timed ones

# Dense (no sparsity) bfloat16 tensor throughput per JAX device, TFLOP/s, matched against `device_kind` in order
# (first hit wins). NVIDIA: the product datasheets (H100 / H200 Tensor Core GPU, A100, L4, V100); Google: the
# Cloud TPU system-architecture pages (per chip; from v4 on a JAX device is a chip).
PEAK_BF16_TFLOPS = (
    ("H200", 989.0, "NVIDIA H200 datasheet (SXM), as H100 SXM"),
    ("H100 PCIe", 756.0, "NVIDIA H100 datasheet (PCIe)"),
    ("H100", 989.0, "NVIDIA H100 datasheet (SXM)"),
    ("A100", 312.0, "NVIDIA A100 datasheet"),
    ("L4", 121.0, "NVIDIA L4 datasheet"),
    ("V100", 125.0, "NVIDIA V100 datasheet: float16 tensor cores (no bfloat16 tensor cores)"),
    ("TPU v4", 275.0, "Cloud TPU v4 documentation"),
    ("TPU v5 lite", 197.0, "Cloud TPU v5e documentation"),
    ("TPU v5e", 197.0, "Cloud TPU v5e documentation"),
    ("TPU v5p", 459.0, "Cloud TPU v5p documentation"),
    ("TPU v5", 459.0, "Cloud TPU v5p documentation"),
    ("TPU v6 lite", 918.0, "Cloud TPU v6e (Trillium) documentation"),
    ("TPU v6e", 918.0, "Cloud TPU v6e (Trillium) documentation"),
)


def peak_bf16(device_kind: str):
    """(TFLOP/s, source) of the first `PEAK_BF16_TFLOPS` entry found in `device_kind`, else (None, reason)."""
    for key, tflops, source in PEAK_BF16_TFLOPS:
        if key.lower() in device_kind.lower():
            return tflops, source
    return None, f"no bfloat16 peak known for {device_kind!r}"



def random_batch(config, local: int, size: tuple[int, int], rng, max_boxes: int = MAX_BOXES) -> dict:
    """A batch of the config's task: images and labels (segmentation maps, or padded boxes)."""


    image = rng.standard_normal((local, *size, 3), np.float32)
    k = config.task.num_classes
    if config.task.name != "detection":
        return {"image": image, "label": rng.integers(0, k, (local, *size)).astype(np.int32)}
    label = jax.tree.map(lambda *rows: np.stack(rows), *[empty_train_label(size, max_boxes) for _ in range(local)])
    h, w = size
    xy = rng.uniform(0, 0.7, (local, max_boxes, 2)) * (w, h)
    wh = rng.uniform(0.05, 0.3, (local, max_boxes, 2)) * (w, h)
    label["boxes"][:] = np.concatenate([xy, np.minimum(xy + wh, (w, h))], -1)
    label["labels"][:] = rng.integers(0, k, (local, max_boxes))
    label["valid"][:, :6] = True  # six objects an image
    return {"image": image, "label": label}


def build_step(config, size, batch, compile: bool = True):
    """(compiled step, lowered step, state, teacher variables, batch arrays, mesh, compile seconds) for `config`
    at this size (`compile=False`: lowered only; the compiled step None)."""


    config = config.copy_and_resolve_references()
    config.batch_size = batch
    if config.get("distill"):
        config.teacher.checkpoint, config.teacher.random_init = "", True  # speed does not depend on the weights
    mesh = make_mesh()
    run = build.build_run(config, mesh, input_size=size)
    plan = plan_state(run.init_variables, run.tx, config.seed, mesh)
    state, shardings = plan.init(), plan.shardings
    step = jit_step(make_train_step(student=run.student, teacher=run.teacher, terms=run.terms, task=run.task,
                                    tx=run.tx, schedule=run.schedule),
                    mesh=mesh, state_shardings=shardings, teacher_shardings=run.teacher_shardings)
    local = check_global_batch(batch, mesh)
    rng = np.random.default_rng(0)
    data = global_batch(random_batch(config, local, size, rng), mesh)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        lowered = step.lower(state, run.teacher_vars, data)
        compiled = lowered.compile() if compile else None
        compile_s = time.perf_counter() - t0
    return compiled, lowered, state, run.teacher_vars, data, mesh, compile_s


def program_flops(lowered) -> float:
    """FLOPs of a lowered program, from XLA's cost analysis of the HLO before the backend's passes: a GPU's
    compiled program calls cuDNN for its convolutions, which its own cost analysis leaves out (measured on an
    H200: 0.076 of the 14.8 TFLOP of the Cityscapes step); the lowered count is the same on every backend and
    equals XLA:CPU's compiled count to 1%."""
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def time_step(config, size, batch, steps: int, profile: str = "", hlo: str = "") -> dict:
    """Median step time of `config`'s compiled step, its compile time, FLOPs and peak memory.

    `profile`: a folder for a `jax.profiler` trace of 3 more steps after the timed ones (with its per-op summary,
    `benchmarks/trace_summary.py`); `hlo`: a path for the compiled program's text (gzip if it ends in .gz)."""

    compiled, lowered, state, teacher_vars, data, mesh, compile_s = build_step(config, size, batch)
    if hlo:
        write_text(hlo, compiled.as_text())
    times = []
    with jax.set_mesh(mesh):
        state, metrics = compiled(state, teacher_vars, data)  # first run: allocation, caches
        jax.block_until_ready(metrics)
        for _ in range(steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, teacher_vars, data)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        if profile:
            with jax.profiler.trace(profile, create_perfetto_trace=True):
                for _ in range(PROFILE_STEPS):
                    state, metrics = compiled(state, teacher_vars, data)
                    jax.block_until_ready(metrics)
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return {"sec": statistics.median(times), "times": times, "compile_s": compile_s, "flops": program_flops(lowered),
            "peak_bytes": peak, "device_peak_bytes": (stats or {}).get("peak_bytes_in_use"),
            "devices": jax.device_count(), "device_kind": device.device_kind, "backend": jax.default_backend()}




def write_text(path: str, text: str) -> None:

    with (gzip.open(path, "wt") if path.endswith(".gz") else open(path, "w")) as f:
        f.write(text)


def lowered_flops(config, size, batch) -> dict:
    """The step's FLOPs from the lowered program alone (no compilation, no step run): what `--report`'s FLOPs
    column needs where the device's backend cannot count them (jax 0.11.2 on a GPU returns none)."""
    lowered = build_step(config, size, batch, compile=False)[1]
    return {"flops": program_flops(lowered), "size": list(size), "batch": batch}


def timed(fn, *args, repeat: int):

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
    dets, post_compile, post_s = timed(detect, heads, local["img_shape"], local["scale_factor"], repeat=repeat)
    forward = jax.jit(lambda v, b: task.eval_outputs(student.apply(v, b["image"], train=False), b),
                      out_shardings=replicated(mesh))
    with jax.set_mesh(mesh):
        _, fwd_compile, fwd_s = timed(forward, variables, global_batch(local, mesh), repeat=repeat)
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


def matmul_rate(n: int = 2048, reps: int = 10) -> dict:
    """This machine's float32 matmul rate through XLA: median of `reps` (n x n) @ (n x n) products."""

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {"gflops": 2 * n**3 / sec / 1e9, "n": n, "sec": sec, "times": times}


def time_loss_alone(config, size, batch, steps: int) -> dict:
    """The distillation loss alone, as the step runs it: forward + backward (gradients for its parameters and the
    student map) in training mode, at the shapes of the case's distilled features. Median time and XLA's FLOPs."""


    config = config.copy_and_resolve_references()
    config.batch_size = batch
    config.teacher.checkpoint, config.teacher.random_init = "", True
    run = build.build_run(config, make_mesh(), input_size=size, abstract_teacher=True)
    (term,) = run.terms
    x = jax.numpy.zeros((batch, *size, 3))
    s_shape = jax.eval_shape(lambda: run.student.apply(run.student.init(jax.random.key(0), x, train=False), x,
                                                       train=False))[term.student_feature]
    t_shape = jax.eval_shape(lambda tv: run.teacher.apply(tv, x, train=False), run.teacher_vars)[term.teacher_feature]
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    s = jax.random.normal(k1, (*s_shape.shape[:-1], term.loss.in_channels), s_shape.dtype)
    t = jax.random.normal(k2, t_shape.shape, t_shape.dtype)
    v = jax.jit(lambda: term.loss.init({"params": k3, "mask": k3}, s, t, train=False))()

    def f(p, x):
        return term.loss.apply({"params": p, "batch_stats": v["batch_stats"]}, x, t, train=True,
                               mutable=["batch_stats"], rngs={"mask": k3})[0]

    lowered = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(v["params"], s)
    compiled = lowered.compile()
    jax.block_until_ready(compiled(v["params"], s))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(v["params"], s))
        times.append(time.perf_counter() - t0)
    return {"sec": statistics.median(times), "times": times, "flops": program_flops(lowered),
            "shape": list(t_shape.shape)}
