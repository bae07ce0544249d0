"""One sitting on a lent accelerator: the measurements issue 22 asks for, in a fixed order, within a time budget.

    python benchmarks/device_session.py --out DIR --budget 400 [--cases profile triton retinanet fcos ...]
    python benchmarks/device_session.py --out DIR --budget 400 --cases profile@wgrad dlv3@batched

A case written NAME@FORM runs with dilated convolutions in that form (`cankd_jax.compute.dilated_conv`:
auto, batched, wgrad, native) instead of --dilated-conv's.

Each case is one `train_speed.py --report` run in its own process (a compiler abort
loses that case only), given what is left of the budget and at most its own cap;
its figures are written to DIR as soon as it ends, so a sitting cut short keeps
what it measured. Cases, in the default order:

  env        the device, driver and package versions (nvidia-smi, jax, flax, optax)
  profile    the paper's Cityscapes step (dlv3: DeepLabV3 R101-d8 -> R18-d8 + CanKD, 512x1024, 8 images
             per device, bfloat16): step time and a profiler trace of 3 steps, summed per kernel and per HLO
             op (`trace_summary.py`), with the compiled program's text
  dlv3       the same step, timed only (no trace)
  triton     the demo step compiled with XLA's Triton GEMM fusion on (the default): does this jax still
             abort on our step (`triton_tiling_propagation.cc ... subdim_size_accumulator == dim_size`)?
  retinanet  the COCO RetinaNet R101 -> R50 step at 800x1344, 2 images per device, bfloat16
  fcos       the COCO FCOS R101 -> R50 step, likewise
  dlv3_16    the Cityscapes step with 16 images per device
  retinanet_8, fcos_8  the COCO steps with 8 images per device
  retinanet_profile    the COCO RetinaNet step (2 images per device) with a trace, as `profile`

Every case but `triton` compiles with `--xla_gpu_enable_triton_gemm=false` (cuBLAS for the
matmuls), which the abort forces on jax 0.11.2. A compilation cache under /tmp serves a case
run twice in one sitting. Files in DIR: `session.log` (everything printed), `env.txt`,
`results.json` (one row per case, as `train_speed.py --report --json` writes them, with
the case's name, wall time and exit status), and for each traced case the trace summary
(`CASE_FORM_ops.md`) and the trace (`CASE_FORM_trace.json.gz`), with the compiled program
(`CASE_FORM_hlo.txt.gz`) for the first one only: at most the 8 files a device call brings back.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

from arg_types import positive  # this folder's command-line value types

HERE = os.path.dirname(os.path.abspath(__file__))
TRITON_OFF = "--xla_gpu_enable_triton_gemm=false"
# case -> (train_speed.py --report arguments, cap in seconds)
CASES = {
    "profile": (["--cases", "dlv3", "--images-per-device", "8", "--profile", "{tmp}/{case}"], 150),
    "dlv3": (["--cases", "dlv3", "--images-per-device", "8"], 120),
    "triton": (["--cases", "demo", "--steps", "3"], 70),
    "retinanet": (["--cases", "retinanet", "--images-per-device", "2"], 240),
    "fcos": (["--cases", "fcos", "--images-per-device", "2"], 200),
    "dlv3_16": (["--cases", "dlv3", "--images-per-device", "16"], 120),
    "retinanet_8": (["--cases", "retinanet", "--images-per-device", "8"], 240),
    "fcos_8": (["--cases", "fcos", "--images-per-device", "8"], 200),
    "retinanet_profile": (["--cases", "retinanet", "--images-per-device", "2", "--profile", "{tmp}/{case}"], 240),
}
FORMS = ("auto", "batched", "wgrad", "native")
DEFAULT = ("env", "profile", "triton", "retinanet", "fcos", "dlv3_16")
MIN_SECONDS = 45  # a case is not started with less than this left: no compile of ours finishes sooner


def log(out: str, text: str) -> None:
    print(text, flush=True)
    with open(os.path.join(out, "session.log"), "a") as f:
        f.write(text + "\n")


def env_case(out: str) -> None:
    parts = []
    for cmd in (["nvidia-smi"], [sys.executable, "-c", "import jax, flax, optax, jaxlib; print('jax', jax.__version__, "
                                 "'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__, "
                                 "jax.devices())"]):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            parts.append(f"$ {' '.join(cmd[:1])}\n{p.stdout}{p.stderr}")
        except (OSError, subprocess.TimeoutExpired) as e:
            parts.append(f"$ {cmd[0]}: {e}")
    with open(os.path.join(out, "env.txt"), "w") as f:
        f.write("\n".join(parts))
    log(out, "\n".join(parts))


def run_case(case: str, out: str, tmp: str, seconds: float, results: list, dilated_conv: str) -> None:
    name, _, form = case.partition("@")
    dilated_conv = form or dilated_conv
    tag = f"{name}_{dilated_conv}"
    args, _ = CASES[name]
    args = [a.format(tmp=tmp, case=tag) for a in args]
    part = os.path.join(tmp, f"{tag}.json")
    cmd = [sys.executable, os.path.join(HERE, "train_speed.py"), "--report", "--dtypes", "bfloat16",
           "--json", part, "--timeout", str(int(seconds - 5)), "--dilated-conv", dilated_conv, *args]
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace(TRITON_OFF, "").strip()
    env["XLA_FLAGS"] = flags if name == "triton" else f"{flags} {TRITON_OFF}".strip()
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tmp, "jax_cache"))
    log(out, f"\n## {name}: {' '.join(cmd[2:])} (XLA_FLAGS={env['XLA_FLAGS']!r}, {seconds:.0f} s)")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds)
        status, text = p.returncode, p.stdout + p.stderr[-4000:]
    except subprocess.TimeoutExpired as e:
        status, text = "timeout", (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    wall = time.perf_counter() - t0
    log(out, text.strip())
    rows = json.load(open(part))["rows"] if os.path.exists(part) else []
    for row in rows or [{}]:
        results.append({"session_case": case, "dilated_conv": dilated_conv, "session_wall_s": wall, "exit": status,
                        **row})
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if "--profile" in args:
        kept = ["ops.md", "trace.json.gz"]
        if not glob.glob(os.path.join(out, "*_hlo.txt.gz")):
            kept.append("hlo.txt.gz")
        for suffix in kept:
            for path in glob.glob(os.path.join(tmp, tag, f"*.{suffix}"))[:1]:
                if os.path.getsize(path) < 15 * 2**20:  # what a device call brings back, per file
                    shutil.copy(path, os.path.join(out, f"{tag}_{suffix}"))


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the results (the device call's $OUT)")
    ap.add_argument("--budget", type=positive, default=400, help="seconds for the whole sitting")
    ap.add_argument("--cases", nargs="+", default=list(DEFAULT),
                    help=f"cases in order, each NAME or NAME@FORM: {', '.join(['env', *CASES])}; forms "
                         f"{', '.join(FORMS)}")
    ap.add_argument("--tmp", default="/tmp/device_session")
    ap.add_argument("--dilated-conv", default="auto", choices=FORMS,
                    help="how dilated convolutions are computed (cankd_jax.compute.dilated_conv)")
    args = ap.parse_args(argv)
    for case in args.cases:
        name, at, form = case.partition("@")
        if name not in ("env", *CASES) or (at and form not in FORMS) or (name == "env" and at):
            ap.error(f"unknown case {case!r}: cases are {', '.join(['env', *CASES])}, optionally NAME@FORM with "
                     f"FORM one of {', '.join(FORMS)}")
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.tmp, exist_ok=True)
    end = time.monotonic() + args.budget
    results: list = []
    for name in args.cases:
        left = end - time.monotonic()
        if name == "env":
            env_case(args.out)
            continue
        if left < MIN_SECONDS:
            log(args.out, f"\n## {name}: not started ({left:.0f} s of the budget left)")
            continue
        run_case(name, args.out, args.tmp, min(left, CASES[name.partition("@")[0]][1]), results, args.dilated_conv)
    log(args.out, f"\nsitting done: {args.budget - (end - time.monotonic()):.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
