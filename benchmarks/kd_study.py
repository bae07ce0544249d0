"""Seeded distillation study: every loss against the student alone and CanKD, several seeds, error bars.

    python benchmarks/kd_study.py --study demo --seeds 5            # run (or resume) the grid, then report
    python benchmarks/kd_study.py --study demo --report              # table.md and chart.png from cells.csv alone
    python benchmarks/kd_study.py --study demo --plan                # list the cells and which are finished
    python benchmarks/kd_study.py --study demo --seeds 5 --jobs 2   # two runs side by side

The study itself (cells, scheduler, report) is `cankd_jax/study.py`, which documents it; this is its command line.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # this checkout's cankd_jax, installed or not
    sys.path.insert(0, ROOT)

from cankd_jax.study import main  # noqa: E402

if __name__ == "__main__":
    main()
