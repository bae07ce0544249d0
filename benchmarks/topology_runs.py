"""One config through `train.py` on three topologies, compared step by step: 1 process x 1 device, 1 x 4, 2 x 2.

    python benchmarks/topology_runs.py --config configs/detection_smoke.py:detector=faster_rcnn \\
        > results/topology/faster_rcnn.md

Each run is a fresh process (the 2 x 2 run two processes joined by `jax.distributed` on 127.0.0.1), as users run
them, sharing a compilation cache. Printed per logged step: each run's loss, and the largest relative difference of
any logged loss term (`loss`, `task/*`, `distill/*`) between the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices: int, cache: str) -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=cache,
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _run(config: str, workdir: str, devices: int, processes: int, cache: str) -> None:
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", config, "--workdir", workdir]
    if processes == 1:
        procs = [subprocess.Popen(cmd, env=_env(devices, cache), cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [subprocess.Popen(cmd + ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes",
                                         str(processes), "--process_id", str(i)], env=_env(devices, cache), cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in range(processes)]
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            sys.exit(f"train.py failed in {workdir}:\n{out[-3000:]}")


def _losses(workdir: str) -> dict[int, dict[str, float]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: {k: v for k, v in r.items() if k == "loss" or k.startswith(("task/", "distill/"))}
                for r in map(json.loads, f) if "loss" in r}


def _largest(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for k in a)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    args = ap.parse_args(argv)
    root = tempfile.mkdtemp(prefix="cankd_topology_")
    cache = os.path.join(root, "cache")
    runs = {"1x1": (1, 1), "1x4": (4, 1), "2x2": (2, 2)}
    for name, (devices, processes) in runs.items():
        _run(args.config, os.path.join(root, name), devices, processes, cache)
    one, four, two = (_losses(os.path.join(root, n)) for n in runs)
    import jax

    print(f"# `{args.config}` through train.py on three topologies\n\n    python benchmarks/topology_runs.py "
          f"--config {args.config}\n\njax {jax.__version__}; losses from each run's `metrics.jsonl`.\n")
    print("| step | loss, 1 process x 1 device | 1 x 4 | 2 x 2 | largest relative difference of any logged loss "
          "term, 1x4 vs 2x2 | 1x4 vs 1x1 |\n|---|---|---|---|---|---|")
    for k in sorted(one):
        print(f"| {k} | {one[k]['loss']:.6f} | {four[k]['loss']:.6f} | {two[k]['loss']:.6f} | "
              f"{_largest(four[k], two[k]):.1e} | {_largest(four[k], one[k]):.1e} |")
    shutil.rmtree(root)


if __name__ == "__main__":
    main(sys.argv[1:])
