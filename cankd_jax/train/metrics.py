"""Metrics out of the loop: `metrics.jsonl`, TensorBoard event files, a terminal progress bar.

Only process 0 writes. JSON lines hold plain floats and ints, one object per
logging step, so `pandas.read_json(path, lines=True)` or `jq` read them as is.
A resumed run first cuts both back to the step it resumed from, so a crash
between checkpoints never leaves a step logged twice.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np


def _plain(v: Any) -> Any:
    if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "dtype"):
        v = np.asarray(v).item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsWriter:
    """Appends to `workdir/metrics.jsonl` and writes TensorBoard scalars to `workdir` (process 0 only).

    `resume_step`: the step the run (re)starts from. Rows written after it by an
    earlier attempt (one that crashed after its last checkpoint) are dropped
    from `metrics.jsonl` (rewritten atomically) and hidden from TensorBoard
    (`purge_step`); at 0 every earlier row goes.
    """

    def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        _truncate_after(self.path, resume_step if resume_step > 0 else -1)
        if tensorboard:
            from tensorboardX import SummaryWriter  # noqa: PLC0415 - only process 0 needs it

            self._tb = SummaryWriter(workdir, flush_secs=30, purge_step=resume_step + 1 if resume_step > 0 else 0)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, int(step))

    def has_row(self, step: int, prefix: str) -> bool:
        """Whether `metrics.jsonl` holds a row of `step` with a key starting with `prefix` (process 0's answer;
        False on the others)."""
        if not self.enabled or not os.path.exists(self.path):
            return False
        with open(self.path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("step") == step and any(k.startswith(prefix) for k in row):
                    return True
        return False

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _truncate_after(path: str, step: int) -> None:
    """Keep the rows of `path` with `"step" <= step` (and drop a torn last line); atomic by rename."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the crash
            continue
        if row.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) == len(lines):
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Progress:
    """A one-line progress bar with rate and ETA on stderr (a line per update when not a terminal)."""

    def __init__(self, total: int, start: int = 0, *, desc: str = "train", unit: str = "step"):
        self.total, self.start, self.desc, self.unit = total, start, desc, unit
        self.t0 = time.perf_counter()
        self.enabled = jax.process_index() == 0
        self.tty = sys.stderr.isatty()

    def update(self, step: int, extra: str = "") -> None:
        if not self.enabled:
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        line = (f"{self.desc} [{bar}] {step}/{self.total} {rate:.2f} {self.unit}/s "
                f"eta {_fmt_time(eta)} {extra}")
        sys.stderr.write(("\r" + line.ljust(100)) if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def _fmt_time(sec: float) -> str:
    if not math.isfinite(sec):
        return "--:--"
    m, s = divmod(int(sec), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
