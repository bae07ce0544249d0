"""Does a new `train.py` process find its compiled programs in JAX's persistent compilation cache?

    python benchmarks/persistent_cache.py > results/persistent_cache/cpu.md
    python benchmarks/persistent_cache.py --configs faster_rcnn --devices 1 > results/persistent_cache/cpu_1_device.md

For each config (a segmentation smoke run, the Faster R-CNN and DINO smoke runs) and each setting of JAX's
`jax_remove_custom_partitioning_ptr_from_cache_key`, two processes run the same 1-step run (train step and
evaluation), each in a new workdir, one after the other with one new cache directory (`JAX_COMPILATION_CACHE_DIR`):
the second compiles what the first compiled, as a job restarted in a new process does. Printed: the second
process's programs found in the cache and those it compiled again (`JAX_LOG_COMPILES`), and how it ended.

Why: the detectors' `top_k` (`cankd_jax/detection/topk.py`) is a `custom_partitioning` op, whose lowered program
holds the address of its Python partitioning callback, different in every process (jax-ml/jax#21159); JAX's flag
hashes the program without it. A second run that aborts is XLA:CPU's rendezvous timeout (40 s) in a collective.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Optional
from arg_types import count  # this folder's command-line value types  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.py")
DETECTION = os.path.join(ROOT, "configs", "detection_smoke.py")
CONFIGS = {"segmentation": SMOKE, "faster_rcnn": f"{DETECTION}:detector=faster_rcnn",
           "dino": f"{DETECTION}:detector=dino"}
FLAG = "JAX_REMOVE_CUSTOM_PARTITIONING_PTR_FROM_CACHE_KEY"
TIMEOUT_S = 900  # a run that hangs instead of aborting (no rendezvous timeout on its backend) is reported as hung


def _run(config: str, workdir: str, data_dir: str, cache: str, devices: int,
         flag: bool) -> tuple[Optional[int], str]:
    """One 1-step train.py run; (exit code, or None if it hung and was killed; output)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=cache, JAX_LOG_COMPILES="1",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1", **{FLAG: "1" if flag else "0"},
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={config}", f"--workdir={workdir}",
           f"--config.data.data_dir={data_dir}", "--config.total_steps=1", "--config.eval_every=1",
           "--config.log_every=1"]
    try:
        p = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out
    return p.returncode, p.stdout


def _programs(log: str) -> list[tuple[str, float, bool]]:
    """(name, seconds, from the cache) for each program the run compiled or loaded, in order. JAX logs a cache hit
    just before that program's "Finished XLA compilation" line. Names with their other characters made `_` and
    stripped (`jit(<lambda>)` -> `lambda`)."""
    programs, hit = [], False
    for line in log.splitlines():
        if "Persistent compilation cache hit for 'jit_" in line:
            hit = True
        m = re.search(r"Finished XLA compilation of jit\((.+?)\) in ([0-9.]+) sec", line)
        if m:
            programs.append((re.sub(r"\W", "_", m.group(1)).strip("_") or m.group(1), float(m.group(2)), hit))
            hit = False
    return programs


def _hits(log: str) -> list[str]:
    return sorted({name for name, _, cached in _programs(log) if cached})


def _compiled_again(log: str) -> list[str]:
    """The programs this run compiled itself for 1 s or more (what the cache would have saved)."""
    return [f"{name} {s:.1f} s" for name, s, cached in _programs(log) if s >= 1 and not cached]


def _ending(code: Optional[int], log: str) -> str:
    if code == 0:
        return "finished"
    programs = _programs(log)
    last = f"; the last program it compiled or loaded: {programs[-1][0]}" if programs else ""
    if code is None:
        return f"hung (killed after {TIMEOUT_S} s){last}"
    if "Termination timeout" in log:
        kinds = sorted(set(re.findall(r"Termination timeout for `(all[- ]\w+|\w+)", log)))
        return f"aborted (exit {code}): rendezvous timeout in {', '.join(kinds)}{last}"
    return f"failed (exit {code}): {log.strip().splitlines()[-1][:120] if log.strip() else ''}"


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--devices", type=count(1), default=4, help="host CPU devices per process")
    args = ap.parse_args(argv)
    import jax  # noqa: PLC0415 - only for the versions printed

    tmp = tempfile.mkdtemp(prefix="cankd_persistent_cache_")
    data_dir = os.path.join(tmp, "tfds")
    command = " ".join(["python benchmarks/persistent_cache.py", *argv])
    print(f"Command: `{command}` ({datetime.date.today()}, a {os.cpu_count()}-core CPU machine)\n")
    print(f"jax {jax.__version__}, jaxlib {jax.lib.__version__}; {args.devices} host CPU device(s) per process; "
          f"1-step runs (train step + evaluation), two processes per row sharing a new cache directory\n")
    print("| config | callback address kept out of the key | 2nd run: programs from the cache | 2nd run: compiled "
          "again (>= 1 s) | 2nd run |")
    print("|---|---|---|---|---|")
    try:
        for name in args.configs:
            for flag in (False, True):
                cache = os.path.join(tmp, f"cache_{name}_{int(flag)}")
                runs = [_run(CONFIGS[name], os.path.join(tmp, f"{name}_{int(flag)}_{i}"), data_dir, cache,
                             args.devices, flag) for i in range(2)]
                (code1, log1), (code2, log2) = runs
                if code1 != 0:
                    sys.exit(f"{name}: the first run did not finish ({_ending(code1, log1)}):\n{log1[-3000:]}")
                if "step" not in [p for p, _, _ in _programs(log1)] or (not _hits(log2) and code2 == 0):
                    sys.exit(f"{name}: no compile of jit(step) in the first run's log, or no cache hit at all in the "
                             "second's: this jax's JAX_LOG_COMPILES lines differ from what this script reads")
                print(f"| {name} | {'yes' if flag else 'no (default)'} | {', '.join(_hits(log2)) or '-'} | "
                      f"{', '.join(_compiled_again(log2)) or '-'} | {_ending(code2, log2)} |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
