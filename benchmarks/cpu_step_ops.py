"""Where a CPU train step's time goes, by kind of op: XLA:CPU (native convolutions and as tap matmuls) and eager PyTorch.

    python benchmarks/cpu_step_ops.py                       # dlv3's student alone, 2 x 128x256
    python benchmarks/cpu_step_ops.py --variant loss        # the paper's pairing (teacher + CanKD)
    python benchmarks/cpu_step_ops.py --out results/train_speed/cpu_ops   # keep the traces and HLO there

Runs `benchmarks/train_speed.py`'s workers, one process each, on the same step: JAX with `--conv-form native`
and with `auto` (on a CPU, convolutions with >= 256 input channels as tap matmuls), each under `jax.profiler`
with its compiled HLO written next to the trace, and PyTorch under `torch.profiler`. Each XLA:CPU thunk of the
trace (a fusion, a convolution, a dot, a copy) is put in a class by what its HLO computes (a `convolution` or a
`dot` inside the fusion it runs, else its name) by direction (an op under `transpose(` in its metadata, or a
kernel-gradient fusion without metadata, is the backward pass) and, for the rest, by the module its metadata
names (a BatchNorm's `bn` modules); each aten op by its name. Times are ms per
step: for JAX, thunk durations summed over the threads that run them (thunks run concurrently, so the sum can
exceed the step); for PyTorch, each op's self CPU time on the calling thread (its kernels use every core).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
from arg_types import count  # this folder's command-line value types  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEED = os.path.join(ROOT, "benchmarks", "train_speed.py")
CLASSES = ("convolution forward", "convolution backward", "matmul forward", "matmul backward",
           "copies, slices, pads, transposes", "BatchNorm", "elementwise, reductions, other")
_COPY = re.compile(r"^(copy|transpose|slice|pad|concatenate|dynamic-slice|dynamic-update-slice)")
_TORCH = (("convolution", re.compile(r"conv")), ("matmul", re.compile(r"^aten::(mm|addmm|bmm|matmul|linear)$")),
          ("BatchNorm", re.compile(r"batch_norm")),
          ("copies, slices, pads, transposes", re.compile(r"copy|contiguous|clone|cat|pad|slice|transpose|permute")))
_TORCH_BACKWARD = re.compile(r"backward|Backward")


def hlo_ops(path: str) -> dict[str, tuple[str, str, bool]]:
    """Compiled HLO text -> {instruction name: ('conv' | 'dot' | '', 'forward' | 'backward', from a BatchNorm)}."""
    body: dict[str, str] = collections.defaultdict(str)
    instrs: list[tuple[str, str, str]] = []  # (name, op_name metadata, called computation)
    comp = None
    with gzip.open(path, "rt") as f:
        for line in f:
            head = re.match(r"^(?:ENTRY )?%(\S+) ", line)
            if head:
                comp = head.group(1)
                continue
            if comp:
                body[comp] += line
            m = re.match(r"\s*(?:ROOT )?%(\S+) = ", line)
            if m:
                meta = re.search(r'op_name="([^"]*)"', line)
                called = re.search(r"calls=%([\w.\-]+)", line)
                instrs.append((m.group(1), meta.group(1) if meta else "", called.group(1) if called else ""))
    out = {}
    for name, meta, called in instrs:
        # What the thunk runs: a convolution or dot instruction in its fused body, or its own op (metadata of the
        # body's other instructions names the ops they were fused from, so only instructions count there).
        ops = set(re.findall(r" (convolution|dot)\(%", body.get(called, "")))
        ops |= {{"conv_general_dilated": "convolution", "dot_general": "dot"}.get(meta.rsplit("/", 1)[-1], "")}
        kind = "conv" if "convolution" in ops else "dot" if "dot" in ops else ""
        # Kernel gradients come out of the fusion pass without metadata; they only exist in the backward pass.
        backward = "transpose(" in meta or (kind != "" and not meta)
        out[name] = (kind, "backward" if backward else "forward", bool(re.search(r"(^|/)\w*bn\w*/", meta)))
    return out


def jax_classes(trace_dir: str, hlo: str, steps: int) -> collections.Counter:
    kinds = hlo_ops(hlo)
    (path,) = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "perfetto_trace.json.gz"))
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ms: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e["name"] not in kinds:  # a thunk's event is named for its HLO instruction
            continue
        kind, direction, bn = kinds[e["name"]]
        if kind == "conv":
            cls = f"convolution {direction}"
        elif kind == "dot":
            cls = f"matmul {direction}"
        elif _COPY.match(e["name"]):
            cls = "copies, slices, pads, transposes"
        elif bn:
            cls = "BatchNorm"
        else:
            cls = "elementwise, reductions, other"
        ms[cls] += e["dur"] / 1e3 / steps
    return ms


def torch_classes(path: str) -> collections.Counter:
    with open(path) as f:
        ops = json.load(f)
    ms: collections.Counter = collections.Counter()
    for name, op in ops.items():
        if not name.startswith("aten::") and "Backward" not in name:
            continue  # the profiler's own and optimizer wrappers; their work is in the aten ops below them
        cls = next((c for c, pat in _TORCH if pat.search(name)), "elementwise, reductions, other")
        if cls in ("convolution", "matmul"):
            cls += " backward" if _TORCH_BACKWARD.search(name) else " forward"
        ms[cls] += op["ms"]
    return ms


def run(args, extra: list[str]) -> dict:
    cmd = [sys.executable, SPEED, "--cases", args.case, "--variant", args.variant, "--steps", str(args.steps)]
    proc = subprocess.run(cmd + extra, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd + extra)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="dlv3", help="a train_speed.py case (default dlv3)")
    ap.add_argument("--variant", default="alone", choices=["alone", "loss", "fitnet"],
                    help="the student alone, or distilled (train_speed.py's variants)")
    ap.add_argument("--steps", type=count(1), default=3, help="profiled steps (after one compiling step)")
    ap.add_argument("--out", default="", help="keep the traces, HLO and PyTorch's op table in this folder")
    args = ap.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="cpu_step_ops_")
    os.makedirs(out, exist_ok=True)
    columns, steps_ms = {}, {}
    for form in ("native", "auto"):
        trace, hlo = os.path.join(out, form), os.path.join(out, f"{form}.hlo.txt.gz")
        r = run(args, ["--worker", "jax", "--conv-form", form, "--profile", trace, "--hlo", hlo])
        columns[f"JAX {form}"], steps_ms[f"JAX {form}"] = jax_classes(trace, hlo, args.steps), 1e3 * r["sec"]
    table = os.path.join(out, "torch_ops.json")
    r = run(args, ["--worker", "torch", "--profile", table])
    columns["PyTorch"], steps_ms["PyTorch"] = torch_classes(table), 1e3 * r["sec"]

    names = list(columns)
    print(f"{args.case}, {args.variant}, {args.steps} profiled steps; ms per step (see the docstring for what each "
          f"column sums); traces in {out}\n")
    print("| op class | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for cls in CLASSES:
        print(f"| {cls} | " + " | ".join(f"{columns[n][cls]:.0f}" for n in names) + " |")
    print("| **sum of the ops** | " + " | ".join(f"**{sum(columns[n].values()):.0f}**" for n in names) + " |")
    print("| step (median, profiled) | " + " | ".join(f"{steps_ms[n]:.0f}" for n in names) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
