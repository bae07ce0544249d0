"""Peak device memory of the compiled train step, from XLA's buffer assignment (`compiled.memory_analysis()`).

The step is built exactly as `train.py` builds it (networks, connector, loss,
optimizer, the jitted and donated step on a one-device mesh) and compiled for
abstract inputs, so nothing is initialised or run and any size can be asked for
on any machine. Per device: the state (parameters, optimizer state, BatchNorm
statistics; donated, so updated in place), the teacher's variables, the batch,
and XLA's temporaries (activations kept for the backward pass, gradients,
workspace). peak = arguments + outputs - aliased (donated) + temporaries.

    python benchmarks/memory.py                                   # the paper's Cityscapes step, 1/2/4 images
    python benchmarks/memory.py --batches 2 --remat none dots_saveable nothing_saveable
    python benchmarks/memory.py --case retinanet --batches 1 2 4   # the COCO step at 800x1344 (FPN P3-P6)
    python benchmarks/memory.py --case faster_rcnn --batches 2     # Faster R-CNN, CanKD on P2-P5
    python benchmarks/memory.py --case dino --batches 2            # DINO R101 -> R50, CanKD on P3-P5

Caveat: XLA's buffer assignment is the compiling backend's. Compiled here for
the CPU it is an estimate of what a GPU / TPU compile needs (their fusion and
scheduling differ; convolution workspaces are not counted; a bfloat16 step on
CPU may hold float32 copies of bfloat16 convolutions, which accelerators do not).
Run it on the accelerator for its own figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from arg_types import count  # this folder's command-line value types  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # this checkout's cankd_jax, installed or not
    sys.path.insert(0, ROOT)
GB = 1e9
# case -> (config file, argument, full-size input (h, w)); detection at the landscape bucket of 1333x800.
CASES = {
    "dlv3": ("cityscapes.py", "head=deeplabv3,loss=cankd", (512, 1024)),
    "pspnet": ("cityscapes.py", "head=pspnet,loss=cankd", (512, 1024)),
    "dlv3_alone": ("cityscapes.py", "head=deeplabv3,loss=none", (512, 1024)),
    "retinanet": ("coco.py", "detector=retinanet,teacher=retinanet_r101,loss=cankd", (800, 1344)),
    "fcos": ("coco.py", "detector=fcos,teacher=fcos_r101,loss=cankd", (800, 1344)),
    "faster_rcnn": ("coco.py", "detector=faster_rcnn,teacher=faster_rcnn_r101,loss=cankd", (800, 1344)),
    "dino": ("coco_detr.py", "teacher=dino_r101,loss=cankd", (800, 1344)),
}
PENDING: dict[str, str] = {}
MAX_BOXES = 100  # padded boxes per image in the detection batch (COCO train2017 has up to 93 per image)
DEVICES_GB = (16, 40, 80)


def analyse(case: str, batch: int, dtype: str, remat: str, size: tuple[int, int]) -> dict:
    """Memory of the compiled step for `batch` images on one device (runs in a worker process)."""
    import jax
    import numpy as np

    from cankd_jax.config_arg import load_config
    from cankd_jax.data.detection import empty_train_example
    from cankd_jax.train.aot import abstract_step, compile_for_analysis
    from cankd_jax.train.sharding import make_mesh

    file, arg, _ = CASES[case]
    config = load_config(os.path.join(ROOT, "configs", file), arg)
    config.dtype, config.remat = dtype, remat
    if config.task.name == "detection":
        example = empty_train_example(size, MAX_BOXES)
    else:
        example = {"image": np.zeros((*size, 3), np.float32), "label": np.zeros(size, np.int32)}
    # planned on one device, never initialised
    step = abstract_step(config, make_mesh(jax.devices()[:1]), example, global_batch=batch)
    run, state, batch_spec = step.run, step.state, step.batch
    t0 = time.perf_counter()
    compiled = compile_for_analysis(step.lower())
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    kept = kept_for_backward(run, state, batch_spec)
    return {"peak": peak, "temp": m.temp_size_in_bytes, "arguments": m.argument_size_in_bytes, "kept": kept,
            "outputs": m.output_size_in_bytes, "aliased": m.alias_size_in_bytes, "state": nbytes(state),
            "teacher": nbytes(run.teacher_vars), "compile_s": compile_s, "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind}


def _category(op_name: str) -> str:
    if any(k in op_name for k in ("CanKDLoss", "Connector", "L2Loss", "checkpoint/rematted")):
        return "distillation term (connector + loss), forward and backward"
    if "transpose(jvp(Segmenter" in op_name:
        return "student backward (gradients, recomputed activations)"
    if "jvp(Segmenter" in op_name:
        return "student activations kept for the backward pass"
    if "Segmenter" in op_name:
        return "teacher forward"
    return "other (layout copies, broadcasts, task loss, optimizer)"


def breakdown(dump_dir: str) -> dict:
    """What is live at the peak of the step's buffer assignment, by part of the step (from XLA's dump files)."""
    import glob
    import re

    [base] = [p[:-len(".txt")] for p in glob.glob(os.path.join(dump_dir, "*jit_step*cpu_after_optimizations.txt"))
              + glob.glob(os.path.join(dump_dir, "*jit_step*gpu_after_optimizations.txt"))][:1] or [None]
    if base is None:
        return {}
    live_text = open(base + "-live-range.txt").read()
    ranges = {(n, i): (int(a), int(b)) for n, i, a, b in
              re.findall(r"^    (\S+)\{([^}]*)\}:(\d+)-(\d+)$", live_text.split("BufferLiveRange:")[1], re.M)}
    sizes = {(n, i.strip("{}") if i != "0" else ""): int(z) for _, n, i, z in
             re.findall(r"value: <(\d+) (\S+) @([^>]*)> \(size=(\d+)", open(base + "-buffer-assignment.txt").read())}
    hlo = open(base + ".txt").read()
    meta = dict(re.findall(r"^\s+%?(\S+) = .*?op_name=\"([^\"]*)\"", hlo, re.M))
    opcode = dict(re.findall(r"^\s+%?(\S+) = \S+ ([a-z\-]+)\(", hlo, re.M))
    values = [(n, sizes.get((n, i), sizes.get((n, ""), 0)), a, b) for (n, i), (a, b) in ranges.items()
              if opcode.get(n) not in ("bitcast", "get-tuple-element", "tuple", "parameter")]
    end = max(b for *_, b in values) + 1
    live = [0] * end
    for _, z, a, b in values:
        for t in range(a, b + 1):
            live[t] += z
    peak_t = max(range(end), key=live.__getitem__)
    parts: dict[str, int] = {}
    for n, z, a, b in values:
        if a <= peak_t <= b:
            parts[_category(meta.get(n, ""))] = parts.get(_category(meta.get(n, "")), 0) + z
    sequence = dict(re.findall(r"^    (\d+):(\S+)$", live_text.split("BufferLiveRange:")[0], re.M))
    return {"at": _category(meta.get(sequence.get(str(peak_t), ""), "")),
            "parts": dict(sorted(parts.items(), key=lambda kv: -kv[1]))}


def kept_for_backward(run, state, batch) -> int:
    """Bytes the step's forward pass keeps for its backward pass, at the JAX level (before XLA): the residuals
    `jax.ad_checkpoint.print_saved_residuals` lists for the differentiated loss, less its arguments and broadcasts.
    Independent of the backend and of XLA's scheduling, and what `config.remat` changes."""
    import contextlib
    import io
    import re

    import jax
    import numpy as np
    from jax.ad_checkpoint import print_saved_residuals

    from cankd_jax.train.step import step_loss

    def total(params, rest):
        # Only the parameters are differentiated, as in the step: a gradient w.r.t. the batch would keep residuals
        # the step never keeps (Faster R-CNN's ground-truth boxes are RoIs: the gathered features of every RoI).
        rest = jax.lax.stop_gradient(rest)
        st = rest["state"].replace(params=params)
        loss_fn, _ = step_loss(student=run.student, teacher=run.teacher, terms=run.terms, task=run.task, state=st,
                               teacher_vars=rest["teacher"], batch=rest["batch"])
        return loss_fn(params)[0]

    plain = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)  # noqa: E731
    rest = {"state": plain(state.replace(params=None)), "teacher": plain(run.teacher_vars), "batch": plain(batch)}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(total, plain(state.params), rest)
    itemsize = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "bool": 1, "s8": 1, "u8": 1}
    kept = 0
    # Not counted: the arguments (the non-parameter ones as the stop_gradient above returns them), and broadcasts
    # (of constants, such as ReLU's zeros: XLA fuses them, stores none).
    skip = r"from the argument|output of broadcast_in_dim|output of stop_gradient from \S*memory\.py:\d+:\d+ \(total\)"
    for dtype, shape in re.findall(rf"^(\w+)\[([\d,]*)\] (?!{skip})", out.getvalue(), re.M):
        kept += int(np.prod([int(d) for d in shape.split(",") if d] or [1])) * itemsize.get(dtype, 4)
    return kept


def _worker(args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--case", args.case, "--batches", str(args.batches[0]),
           "--dtypes", args.dtypes[0], "--remat", args.remat[0], "--height", str(args.height),
           "--width", str(args.width)]
    env, dump = dict(os.environ), None
    if args.breakdown:
        import tempfile

        dump = tempfile.mkdtemp(prefix="cankd_memory_")
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_dump_to={dump} --xla_dump_hlo_module_re=.*jit_step.*".strip()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["killed"]
        return {"error": f"exit {proc.returncode}: {tail[0][:120]}"}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if dump:
        import shutil

        out["breakdown"] = breakdown(dump)
        shutil.rmtree(dump, ignore_errors=True)
    return out


def fits(peak: float) -> str:
    ok = [f"{g}" for g in DEVICES_GB if peak <= g * GB]
    return f"{'/'.join(ok)} GB" if ok else "none"


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="dlv3", choices=[*CASES, *PENDING])
    ap.add_argument("--batches", nargs="+", type=count(1), default=[1, 2, 4], help="images per device")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--remat", nargs="+", default=["none"], help="remat policies (cankd_jax/compute.py)")
    ap.add_argument("--height", type=count(1), default=None)
    ap.add_argument("--width", type=count(1), default=None)
    ap.add_argument("--json", default="", help="also write the rows to this file")
    ap.add_argument("--breakdown", action="store_true",
                    help="also say what is live at the peak, by part of the step (from XLA's dumped buffer assignment)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case in PENDING:
        sys.exit(f"memory.py: {args.case}: pending: {PENDING[args.case]}")
    full = CASES[args.case][2]
    args.height, args.width = args.height or full[0], args.width or full[1]

    if args.worker:
        print(json.dumps(analyse(args.case, args.batches[0], args.dtypes[0], args.remat[0], (args.height, args.width))))
        return

    rows = []
    print("| case | input | images / device | dtype | remat | state GB | teacher GB | kept for backward GB | "
          "temporaries GB | peak GB | fits on | compile s |\n|---|---|---|---|---|---|---|---|---|---|---|---|",
          flush=True)
    for batch in args.batches:
        for dtype in args.dtypes:
            for remat in args.remat:
                one = argparse.Namespace(**{**vars(args), "batches": [batch], "dtypes": [dtype], "remat": [remat]})
                r = _worker(one)
                r.update(case=args.case, batch=batch, dtype=dtype, remat=remat, size=[args.height, args.width])
                rows.append(r)
                if "error" in r:
                    print(f"| {args.case} | {args.height}x{args.width} | {batch} | {dtype} | {remat} | {r['error']} "
                          f"| | | | | | |", flush=True)
                    continue
                print(f"| {args.case} | {args.height}x{args.width} | {batch} | {dtype} | {remat} | "
                      f"{r['state'] / GB:.2f} | {r['teacher'] / GB:.2f} | {r['kept'] / GB:.2f} | {r['temp'] / GB:.2f} | "
                      f"{r['peak'] / GB:.2f} | "
                      f"{fits(r['peak'])} | {r['compile_s']:.0f} |", flush=True)
                if r.get("breakdown"):
                    parts = "; ".join(f"{k} {v / GB:.2f} GB" for k, v in r["breakdown"]["parts"].items())
                    print(f"|  | live at the peak (in: {r['breakdown']['at']}): {parts} ||||||||||", flush=True)
    if rows and "backend" in rows[0]:
        print(f"\ncompiled for: {rows[0]['device']} ({rows[0]['backend']}); peak = arguments + outputs - donated + "
              "temporaries (XLA's buffer assignment); 'kept for backward': the activations the forward pass saves for "
              "the backward pass, at the JAX level (backend-independent; what remat changes); 'fits on': the device "
              "sizes (GB) the peak is within, before the framework's own reserve")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
