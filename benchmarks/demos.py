"""Re-run the README's demos on this checkout and print their numbers next to the committed ones.

    python benchmarks/demos.py                       # the six demos (about 80 min by their recorded wall times, 2-core CPU)
    python benchmarks/demos.py --demos detection     # one of them
    python benchmarks/demos.py --workdir /tmp/demos  # keep (and resume) the runs there

The committed figures come from `results/`, not from the README's text: `results/demo/summary.json`,
`results/detection_demo/summary.json` and `results/detection_demo/{faster_rcnn,swin,reppoints,dino}/summary.json`,
each the summary of the demo's run on the project's AMD EPYC machine, or, where a `summary_*.json` beside it
was measured on this machine's processor (its 'host' entry, /proc/cpuinfo's model name), that record. Any change
to the step, a loss or a model re-runs this before it lands; a row whose numbers differ means the README's
figures (and those files) are from an older commit, or from another processor without a record: the runs are
deterministic on one machine (the same commit gives the same numbers to the last digit), but XLA:CPU compiles
differently for different processors, and training from scratch turns last-bit differences into different
numbers (`results/demo/README.md`).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# demo -> (config, the phases compared)
DEMOS = {
    "segmentation": ("configs/demo.py", ("teacher", "student", "cankd")),
    "detection": ("configs/detection_demo.py", ("teacher", "student", "cankd")),
    "faster_rcnn": ("configs/detection_demo.py:detector=faster_rcnn", ("teacher", "student", "cankd")),
    "swin": ("configs/detection_demo.py:teacher=swin", ("teacher", "student", "cankd")),
    "reppoints": ("configs/detection_demo.py:detector=reppoints", ("teacher", "student", "cankd")),
    "dino": ("configs/detection_demo.py:detector=dino", ("teacher", "student", "cankd")),
}


RESULTS = {"segmentation": "results/demo/summary.json", "detection": "results/detection_demo/summary.json",
           "faster_rcnn": "results/detection_demo/faster_rcnn/summary.json",
           "swin": "results/detection_demo/swin/summary.json",
           "reppoints": "results/detection_demo/reppoints/summary.json",
           "dino": "results/detection_demo/dino/summary.json"}


def processor() -> str:
    """This machine's processor model as /proc/cpuinfo names it ('' where it does not)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def committed(demo: str, host: str = "") -> tuple[dict[str, float], str]:
    """The committed figures of `demo`'s phases, in percent, and the file they come from: the record measured on
    a processor named `host` (`summary_*.json` beside `summary.json`, with a 'host' entry) where there is one,
    since the figures depend on the processor; else `summary.json`."""
    path = os.path.join(ROOT, RESULTS[demo])
    for other in sorted(glob.glob(os.path.join(os.path.dirname(path), "summary_*.json"))):
        with open(other) as f:
            if host and json.load(f).get("host") == host:
                path = other
    with open(path) as f:
        summary = json.load(f)
    return {phase: 100 * summary[phase] for phase in DEMOS[demo][1]}, os.path.relpath(path, ROOT)


def run(demo: str, workdir: str) -> tuple[dict[str, float], float]:
    """Run (or resume) `demo` in `workdir`: its phases' held-out metric in percent, and the wall seconds."""
    config, phases = DEMOS[demo]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, config),
                    "--workdir", workdir], cwd=ROOT, check=True)
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    return {p: 100 * summary[p] for p in phases}, time.perf_counter() - t0


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demos", nargs="+", default=list(DEMOS), choices=list(DEMOS))
    ap.add_argument("--workdir", default="", help="where the runs go (default: a new temporary folder)")
    args = ap.parse_args(argv)
    root = args.workdir or tempfile.mkdtemp(prefix="cankd_demos_")
    rows, differ = [], False
    host = processor()
    for demo in args.demos:
        got, wall = run(demo, os.path.join(root, demo))
        want, record = committed(demo, host)
        for phase in DEMOS[demo][1]:
            same = f"{got[phase]:.2f}" == f"{want[phase]:.2f}"
            differ |= not same
            rows.append(f"| {demo} | {phase} | {got[phase]:.2f} | {want[phase]:.2f} | {'yes' if same else '**no**'} "
                        f"| {record} |")
        rows.append(f"| {demo} | (wall time) | {wall / 60:.1f} min | | | |")
    print(f"\nprocessor: {host or 'unknown'}\n\n| demo | phase | this checkout | committed | same | record |\n"
          "|---|---|---|---|---|---|\n" + "\n".join(rows))
    print(f"\nruns in {root}")
    if differ:
        print("some figures differ from the committed ones: update results/ and the README from these runs")
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
