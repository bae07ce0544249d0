"""How exact is a resume on another topology? Three `train.py` runs of the smoke config, compared step by step.

    python benchmarks/topology_switch.py [--steps 12] [--switch 6] [--devices 4] > results/topology/smoke.md

- `one`: 1 device, straight through (checkpoints at `--switch` and at the end);
- `many`: `--devices` devices of one process, straight through;
- `switched`: `one`'s workdir with its last checkpoint removed, re-run on `--devices` devices: it restores the
  checkpoint at `--switch` (written on 1 device) and trains the rest on the new topology.

Printed per step: the loss and gradient norm of `one`, and how far `many` and `switched` are from it. A switch
that perturbed anything (a state leaf, the optimizer's count, a key, the data position) would show at the first
step after it; arithmetic differences (the new topology's reductions sum in another order) show as drift that
`many` has too. Each run is a fresh process, as users run it; the runs share a compilation cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from arg_types import count  # this folder's command-line value types  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(workdir: str, devices: int, steps: int, switch: int, cache: str) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=cache,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "smoke.py"),
           "--workdir", workdir, f"--config.total_steps={steps}", "--config.log_every=1",
           f"--config.checkpoint_every={switch}", f"--config.eval_every={steps}", "--config.keep_checkpoints=10"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"train.py failed in {workdir}:\n{proc.stdout[-3000:]}")


def rows(workdir: str) -> dict[int, dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=count(1), default=12)
    ap.add_argument("--switch", type=count(1), default=6, help="the step the switched run resumes from")
    ap.add_argument("--devices", type=count(1), default=4)
    args = ap.parse_args(argv)
    if args.steps % args.switch:
        sys.exit("--steps must be a multiple of --switch (checkpoints are written every --switch steps)")
    root = tempfile.mkdtemp(prefix="cankd_topology_")
    cache = os.path.join(root, "cache")
    one, many, switched = (os.path.join(root, n) for n in ("one", "many", "switched"))
    train(one, 1, args.steps, args.switch, cache)
    train(many, args.devices, args.steps, args.switch, cache)
    shutil.copytree(one, switched)
    # `one` as it was at the switch: its last checkpoint, export and summary gone.
    shutil.rmtree(os.path.join(switched, "checkpoints", str(args.steps)))
    shutil.rmtree(os.path.join(switched, "export"))
    os.remove(os.path.join(switched, "summary.json"))
    train(switched, args.devices, args.steps, args.switch, cache)
    a, m, s = rows(one), rows(many), rows(switched)
    print(f"smoke config, {args.steps} steps: `one` on 1 device, `many` on {args.devices} devices, `switched` "
          f"restored from `one`'s step-{args.switch} checkpoint onto {args.devices} devices\n")
    print("| step | loss (one) | many - one | switched - one | grad_norm (one) | many - one | switched - one |")
    print("|---|---|---|---|---|---|---|")
    for k in sorted(a):
        mark = " (switch)" if k == args.switch + 1 else ""
        print(f"| {k}{mark} | {a[k]['loss']:.6f} | {m[k]['loss'] - a[k]['loss']:+.1e} | "
              f"{s[k]['loss'] - a[k]['loss']:+.1e} | {a[k]['grad_norm']:.5f} | "
              f"{m[k]['grad_norm'] - a[k]['grad_norm']:+.1e} | {s[k]['grad_norm'] - a[k]['grad_norm']:+.1e} |")
    shutil.rmtree(root)


if __name__ == "__main__":
    main(sys.argv[1:])
