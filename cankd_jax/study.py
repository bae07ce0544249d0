"""Seeded distillation study: every loss against the student alone and CanKD, several seeds, error bars.

The library side of `benchmarks/kd_study.py` (its command line is `main`); the paths below are this checkout's
(`ROOT` is the folder holding `cankd_jax/`, `configs/` and `train.py`).

    python benchmarks/kd_study.py --study demo --seeds 5            # run (or resume) the grid, then report
    python benchmarks/kd_study.py --study demo --report              # table.md and chart.png from cells.csv alone
    python benchmarks/kd_study.py --study demo --plan                # list the cells and which are finished
    python benchmarks/kd_study.py --study demo --seeds 5 --jobs 2   # two runs side by side

A *cell* is (setting, loss, seed): one ordinary training run (`train_and_evaluate`, resumable) in its own
workdir `ROOT/<study>/<setting>/<loss>/seed<k>`, trained in a child process so a study of ~100 runs never
accumulates compiled programs in one process. Finished cells are skipped, an interrupted one resumes from its
newest checkpoint, so a study may be stopped (SIGTERM or Ctrl-C: the running cell saves a checkpoint first) and
continued in later sittings, or extended by more seeds (`--seeds 8`) or losses (`--losses`). Each run's output
goes to `study.log` in its workdir.

`--jobs N` trains N runs side by side (a setting's teacher first, alone if nothing else can run), for machines
with more cores than one run of these small networks keeps busy; on this project's 2-core machine one demo
cell already keeps 1.6 cores busy, so the study here runs one at a time. A run's numbers do not depend on N
(XLA's CPU thread pool and every random draw are the same whatever else runs); its wall time does, so
`cells.csv` records beside `wall_s` the run's share of the machine, `machine_s` (its wall time, each moment
divided by the number of runs going then).

Each setting trains ONE teacher (seed 0), just before the setting's first cell, that every loss and seed of
that setting distils from: the teacher is the most expensive run of a setting (twice the student's steps at
twice its width), and one shared teacher makes every comparison paired (same teacher, same seed = same student initialisation and data order, only the loss
differs). The spread over seeds is therefore that of the student's initialisation and data order for a fixed
teacher; teacher-to-teacher variation is not part of it.

A seed sets the config's `seed`: the student's (and the loss modules') initialisation and the training data
order (a function of (seed, step)). Seed 0 at the demo setting runs `configs/demo.py`'s phases unchanged
(its numbers differ from the README's older one-seed table: that was measured before the data order became
one global order, commit b87ed7b).

Every loss runs at its preset (`cankd_jax/losses/presets.py`; the ablations are CanKD's preset with one option
changed); no weight is retuned for this toy problem, so no sweep is run and no seed is held out.

Results go to `results/<study>/`: `cells.csv` (one row per finished cell: setting, loss, seed, metric, steps,
wall seconds, teacher metric, load; and one per setting for its teacher, loss 'teacher'), `table.md` and `chart.png`. `--commit` commits them (in the current git
work tree) as cells finish, at most every `--commit-every` seconds and at the end.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo.py")

# The paper's ablations of CanKD, then the baselines; 'none' is the student alone.
ALL_LOSSES = ("none", "cankd", "cankd_no_in", "cankd_no_skip", "cankd_gaussian", "cankd_embedded_gaussian",
              "cankd_concatenation", "cankd_dcn", "in_mse", "nonlocal_self", "fitnet", "pkd", "mgd", "cwd", "at")
LARGE_LOSSES = ("none", "cankd", "in_mse", "nonlocal_self", "fitnet", "pkd", "cwd")
LABELS = {
    "none": "student alone", "cankd": "CanKD", "cankd_no_in": "CanKD w/o IN", "cankd_no_skip": "CanKD w/o skip",
    "cankd_gaussian": "CanKD gaussian", "cankd_embedded_gaussian": "CanKD emb. gaussian",
    "cankd_concatenation": "CanKD concatenation", "cankd_dcn": "CanKD deformable (DCN_NLKD)",
    "in_mse": "IN only (no block)",
    "nonlocal_self": "self-attn non-local", "fitnet": "FitNet", "pkd": "PKD", "mgd": "MGD", "cwd": "CWD", "at": "AT",
}
TEACHER_SEED = 0
CSV_FIELDS = ("setting", "loss", "seed", "metric", "value", "steps", "wall_s", "teacher_value", "status",
              "load_start", "load_end", "sittings", "machine_s")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One problem size: the demo's networks and data at `image_size`, with these step counts."""

    image_size: int
    steps: int            # each student cell
    teacher_steps: int
    batch_size: int = 16
    eval_every: int = 0   # 0: the demo's
    num_train: int = 2000
    num_test: int = 500
    description: str = ""


SETTINGS: dict[str, Setting] = {
    # configs/demo.py unchanged: 64x64 images, layer4 8x8.
    "demo": Setting(64, 1000, 2000, description="64x64 images, layer4 8x8 (configs/demo.py as it is)"),
    # Four times the pixels, layer4 16x16 (256 query and 64 pooled key positions instead of 64 and 16):
    # the same networks, half the student steps, so a cell costs about twice a demo cell.
    "large": Setting(128, 500, 2000, eval_every=500,
                     description="128x128 images, layer4 16x16, the demo's teacher recipe, half the student steps"),
    # For tests and a first look: seconds per cell.
    "tiny": Setting(32, 3, 4, batch_size=4, eval_every=3, num_train=32, num_test=8, description="harness test"),
}

STUDIES: dict[str, dict[str, tuple[str, ...]]] = {
    "demo": {"demo": ALL_LOSSES, "large": LARGE_LOSSES},
    "tiny": {"tiny": ("none", "cankd", "in_mse")},
}


@dataclasses.dataclass(frozen=True)
class Cell:
    setting: str
    loss: str
    seed: int

    @property
    def key(self) -> tuple[str, str, int]:
        return self.setting, self.loss, self.seed


# --- configs -------------------------------------------------------------------------------------------------


def setting_dir(root: str, study: str, setting: str) -> str:
    return os.path.join(root, study, setting)


def cell_dir(root: str, study: str, cell: Cell) -> str:
    return os.path.join(setting_dir(root, study, cell.setting), cell.loss, f"seed{cell.seed}")


def teacher_dir(root: str, study: str, setting: str) -> str:
    return os.path.join(setting_dir(root, study, setting), "teacher")


def run_config(setting: str, loss: str, seed: int, *, root: str, study: str, data_dir: str = ""):
    """The config of one cell (`loss='teacher'` for the setting's teacher): a phase of configs/demo.py, resized."""
    from cankd_jax.config_arg import load_config  # noqa: PLC0415 - keep --report free of JAX
    from cankd_jax.train.runner import phase_config  # noqa: PLC0415

    s = SETTINGS[setting]
    phase = {"none": "student"}.get(loss, loss)
    base = load_config(DEMO_CONFIG, "" if loss in ("none", "teacher") else f"loss={loss}")
    # The teacher checkpoint '{workdir}/teacher/export' resolves to this setting's shared teacher.
    cfg = phase_config(base, phase, setting_dir(root, study, setting))
    cfg.seed = TEACHER_SEED if loss == "teacher" else int(seed)
    cfg.total_steps = s.teacher_steps if loss == "teacher" else s.steps
    cfg.batch_size = s.batch_size
    if s.eval_every:
        cfg.eval_every = s.eval_every
    cfg.checkpoint_every = min(cfg.checkpoint_every, cfg.total_steps)
    cfg.data.image_size = s.image_size
    cfg.data.num_train, cfg.data.num_test = s.num_train, s.num_test
    cfg.data.eval_batch_size = min(cfg.data.eval_batch_size, s.num_test)
    if data_dir:
        cfg.data.data_dir = data_dir
    # Only the teacher's export is read later (by the cells); the students' .pth would only cost time.
    cfg.export.pytorch = False
    # The teacher's held-out number is measured once, by its own run (the same for every cell of the setting).
    cfg.evaluate_teacher = False
    return cfg


# --- the grid -------------------------------------------------------------------------------------------------


def grid(study: str, seeds: int, settings: Optional[list[str]] = None,
         losses: Optional[list[str]] = None) -> list[Cell]:
    """Seed-major order (seed 0 of every setting and loss first), so a stopped study has whole seeds."""
    plan = STUDIES[study]
    out = []
    for seed in range(seeds):
        for setting, setting_losses in plan.items():
            if settings and setting not in settings:
                continue
            for loss in (losses or setting_losses):
                out.append(Cell(setting, loss, seed))
    return list(dict.fromkeys(out))  # a loss named twice is one cell (two runs in one workdir would collide)


def read_summary(workdir: str) -> Optional[dict]:
    path = os.path.join(workdir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def finished(workdir: str) -> bool:
    s = read_summary(workdir)
    return bool(s and s.get("finished"))


def read_cells(path: str) -> dict[tuple[str, str, int], dict[str, Any]]:
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as f:
        rows = {(r["setting"], r["loss"], int(r["seed"])): r for r in csv.DictReader(f)}
    for r in rows.values():
        r["machine_s"] = r.get("machine_s") or r["wall_s"]  # rows from before --jobs: one run at a time
    return rows


def write_cells(path: str, rows: dict[tuple[str, str, int], dict[str, Any]]) -> None:
    order = {name: i for i, name in enumerate(("teacher", *ALL_LOSSES))}
    keyed = sorted(rows.values(), key=lambda r: (r["setting"], order.get(r["loss"], 99), r["loss"], int(r["seed"])))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(keyed)
    os.replace(tmp, path)


def _load() -> float:
    return round(os.getloadavg()[0], 2)


class _Children:
    """The training children now running: one signal stops them all, and each run's share of the machine.

    A run's share (`machine_s`) is its wall time with each moment divided by the number of runs going then.
    `stop()` is the signal handler's: it takes no lock (the main thread never holds one), and a child that
    starts after it is stopped as it starts.
    """

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._lock = threading.Lock()
        self._share: dict[Any, float] = {}
        self._t = clock()
        self.stopping = False

    def _advance(self) -> None:
        now = self._clock()
        for proc in self._share:
            self._share[proc] += (now - self._t) / len(self._share)
        self._t = now

    def add(self, proc) -> None:
        with self._lock:
            self._advance()
            self._share[proc] = 0.0
        if self.stopping:  # stop() ran before this child was in the dict
            proc.send_signal(signal.SIGTERM)

    def remove(self, proc) -> float:
        with self._lock:
            self._advance()
            return self._share.pop(proc)

    def __len__(self) -> int:
        return len(self._share)

    def stop(self) -> None:
        self.stopping = True
        for proc in list(self._share):
            proc.send_signal(signal.SIGTERM)


def run_child(args: list[str], log_path: str, cache_dir: str, children: Optional[_Children] = None
              ) -> tuple[int, float, float, float, float]:
    """Run one training child to its end, its output appended to `log_path`; while it runs it is one of
    `children` (whose `stop()` passes SIGTERM on: the child then saves a checkpoint and exits).

    Returns `(returncode, wall seconds, load at start, load at end, share of the machine in seconds)`.
    """
    children = children if children is not None else _Children()
    load0, t0 = _load(), time.time()
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cankd_jax.study", *args], stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT, env=_child_env(cache_dir))
        children.add(proc)
        try:
            rc = proc.wait()
        finally:
            share = children.remove(proc)
    return rc, time.time() - t0, load0, _load(), share


def _child_env(cache_dir: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # One XLA compilation cache per study: the seeds of a loss compile the same programs (the seed is data, not
    # code), so only the first seed of each (setting, loss) pays for compiling. It changes no number.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _record_sitting(workdir: str, wall: float, load0: float, load1: float, rc: int,
                    machine: Optional[float] = None) -> dict:
    """Append one sitting (one child process; `machine`: its share of the machine, `_Children`) to
    `workdir/study_cell.json`; returns the record."""
    path = os.path.join(workdir, "study_cell.json")
    rec = {"sittings": []}
    if os.path.exists(path):
        with open(path) as f:
            rec = json.load(f)
    rec["sittings"].append({"wall_s": round(wall, 1), "load_start": load0, "load_end": load1, "returncode": rc,
                            "machine_s": round(wall if machine is None else machine, 1),
                            "ended": time.strftime("%Y-%m-%d %H:%M:%S")})
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(rec, f, indent=2)
    return rec


def cell_row(cell: Cell, workdir: str, teacher_value: Optional[float]) -> dict[str, Any]:
    """The cells.csv row of a finished (or failed) cell, from its summary.json and study_cell.json."""
    summary = read_summary(workdir) or {}
    rec_path = os.path.join(workdir, "study_cell.json")
    sittings = []
    if os.path.exists(rec_path):
        with open(rec_path) as f:
            sittings = json.load(f)["sittings"]
    value = (summary.get("eval") or {}).get(summary.get("metric", "mIoU"))
    ok = bool(summary.get("finished")) and isinstance(value, float)
    if ok and not sittings:
        # The run finished but the study was stopped before it recorded the sitting: the run's own files date
        # it (config.json is written at its start, summary.json at its end; the process start-up is not counted).
        start, end = (os.path.getmtime(os.path.join(workdir, f)) for f in ("config.json", "summary.json"))
        sittings = [{"wall_s": round(end - start, 1), "load_start": "", "load_end": ""}]
    return dict(setting=cell.setting, loss=cell.loss, seed=cell.seed, metric=summary.get("metric", "mIoU"),
                value=f"{100 * value:.2f}" if ok else "", steps=summary.get("step", ""),
                wall_s=f"{sum(s['wall_s'] for s in sittings):.1f}",
                teacher_value=f"{100 * teacher_value:.2f}" if teacher_value is not None else "",
                status="ok" if ok else "failed",
                load_start=sittings[0]["load_start"] if sittings else "",
                load_end=sittings[-1]["load_end"] if sittings else "", sittings=len(sittings),
                machine_s=f"{sum(s.get('machine_s', s['wall_s']) for s in sittings):.1f}")


def teacher_value(root: str, study: str, setting: str) -> Optional[float]:
    s = read_summary(teacher_dir(root, study, setting))
    if not (s and s.get("finished")):
        return None
    return (s.get("eval") or {}).get(s.get("metric", "mIoU"))


def _git_commit(paths: list[str], message: str) -> None:
    """Commit `paths` (only them) in the git work tree that holds them (the results may live outside ROOT)."""
    cwd = os.path.dirname(os.path.abspath(paths[0]))
    paths = [os.path.abspath(p) for p in paths]
    subprocess.run(["git", "add", "--", *paths], cwd=cwd, check=False)
    diff = subprocess.run(["git", "diff", "--cached", "--quiet", "--", *paths], cwd=cwd)
    if diff.returncode:
        subprocess.run(["git", "commit", "-q", "-m", message, "--", *paths], cwd=cwd, check=False)


class _Scheduler:
    """Which run comes next, for up to `jobs` runs side by side: the cells in grid order, each once its setting's
    teacher has finished; a setting's teacher (one run, never two at once) when the first pending cell of the
    setting needs it. All methods are called under the study's lock."""

    def __init__(self, cells: list[Cell], teacher_done: dict[str, bool]):
        self.pending = list(cells)
        self.teacher = {s: ("done" if ok else "todo") for s, ok in teacher_done.items()}

    def next(self) -> Optional[tuple[str, Any]]:
        """('cell', Cell) or ('teacher', setting) to start now, or None if nothing can start yet."""
        for cell in self.pending:
            state = self.teacher[cell.setting]
            if state == "done":
                self.pending.remove(cell)
                return "cell", cell
            if state == "todo":
                self.teacher[cell.setting] = "running"
                return "teacher", cell.setting
        return None

    def teacher_finished(self, setting: str, ok: bool) -> list[Cell]:
        """Record the teacher's end; if it failed, its setting's pending cells are dropped (returned)."""
        self.teacher[setting] = "done" if ok else "failed"
        dropped = [c for c in self.pending if c.setting == setting and not ok]
        self.pending = [c for c in self.pending if c not in dropped]
        return dropped


def run_study(a: argparse.Namespace) -> None:
    out = os.path.join(a.results, a.study)
    csv_path = os.path.join(out, "cells.csv")
    rows = read_cells(csv_path)
    cells = grid(a.study, a.seeds, a.settings, a.losses)
    data_dir = a.data_dir or os.path.join(a.root, "tfds")
    os.makedirs(os.path.join(a.root, a.study), exist_ok=True)
    cache_dir = os.path.join(a.root, a.study, "xla_cache")
    t_start = time.time()
    lock = threading.Condition()  # guards rows, cells.csv, the scheduler and the counters below
    children = _Children()
    errors: list[str] = []
    active = 0  # runs taken by a worker and not yet recorded
    started = 0  # cells started in this sitting (--max-cells)
    last_commit = time.time()

    def say(msg: str) -> None:
        # One write per line: workers call this outside the lock, and print's separate newline would interleave.
        sys.stdout.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
        sys.stdout.flush()

    def commit(force: bool = False) -> None:
        nonlocal last_commit
        if a.commit and (force or time.time() - last_commit >= a.commit_every):
            report(a.study, a.results)
            n = sum(1 for r in read_cells(csv_path).values() if r["status"] == "ok")
            if not n:
                return
            _git_commit([out], f"kd_study {a.study}: {n} cells finished")
            last_commit = time.time()

    def record(key: tuple[str, str, int], workdir: str, setting: str) -> dict[str, Any]:
        rows[key] = cell_row(Cell(*key), workdir, teacher_value(a.root, a.study, setting))
        write_cells(csv_path, rows)
        return rows[key]

    def child(name: str, setting: str, loss: str, seed: int, workdir: str) -> tuple[int, bool]:
        """Train one run (cell or teacher) in a child; record its sitting. Returns (returncode, finished)."""
        say(f"{name} (load {_load()}, {active} running)")
        rc, wall, l0, l1, share = run_child(["--_cell", a.study, setting, loss, str(seed), a.root, data_dir,
                                             workdir], os.path.join(workdir, "study.log"), cache_dir, children)
        _record_sitting(workdir, wall, l0, l1, rc, share)
        return rc, finished(workdir)

    # Cells recorded already are skipped; a failed one runs again only with --retry-failed.
    todo = [c for c in cells if not (rows.get(c.key) and (rows[c.key]["status"] == "ok" or not a.retry_failed))]
    teachers_done = {s: finished(teacher_dir(a.root, a.study, s)) for s in {c.setting for c in cells}}
    for setting, done in sorted(teachers_done.items()):
        if done and (setting, "teacher", TEACHER_SEED) not in rows:  # e.g. a sitting stopped just after it
            record((setting, "teacher", TEACHER_SEED), teacher_dir(a.root, a.study, setting), setting)
    sched = _Scheduler(todo, {s: teachers_done[s] for s in {c.setting for c in todo}})
    index = {c.key: i + 1 for i, c in enumerate(cells)}

    def take() -> Optional[tuple[str, Any]]:
        """The next run for this worker, or None when it should end (under the lock)."""
        nonlocal active, started
        while True:
            if children.stopping or errors:  # stopped, or a failure: start nothing more
                return None
            if a.max_cells and started >= a.max_cells:
                return None
            nxt = sched.next()
            if nxt is not None:
                kind, what = nxt
                if kind == "cell" and not finished(cell_dir(a.root, a.study, what)):
                    started += 1  # counted as it is handed out, so that jobs cannot overshoot --max-cells
                active += 1
                return nxt
            if not active:  # nothing runs and nothing can start: done
                return None
            lock.wait(timeout=1.0)

    def run_teacher(setting: str) -> None:
        tdir = teacher_dir(a.root, a.study, setting)
        ok = False
        try:
            rc, ok = child(f"{setting}: training the shared teacher in {tdir}", setting, "teacher", TEACHER_SEED,
                           tdir)
        finally:
            with lock:
                if ok:
                    record((setting, "teacher", TEACHER_SEED), tdir, setting)
                    say(f"{setting}: teacher done, held-out {rows[(setting, 'teacher', TEACHER_SEED)]['value']}")
                elif not children.stopping:
                    errors.append(f"the {setting} teacher failed; see {tdir}/study.log")
                    say(errors[-1])
                sched.teacher_finished(setting, ok)

    def run_one_cell(cell: Cell) -> None:
        workdir = cell_dir(a.root, a.study, cell)
        if not finished(workdir):
            child(f"cell {index[cell.key]}/{len(cells)} {cell.setting} {cell.loss} seed {cell.seed}",
                  cell.setting, cell.loss, cell.seed, workdir)
        with lock:
            # A run stopped by a signal saved a checkpoint and resumes next sitting: no row yet.
            if finished(workdir) or not children.stopping:
                r = record(cell.key, workdir, cell.setting)
                say(f"  -> {cell.setting} {cell.loss} seed {cell.seed}: {r['status']} {r['value']} mIoU, "
                    f"{r['wall_s']} s")
                commit()

    def worker() -> None:
        nonlocal active
        while True:
            with lock:
                task = take()
            if task is None:
                return
            kind, what = task
            try:
                run_teacher(what) if kind == "teacher" else run_one_cell(what)
            except BaseException as e:  # noqa: BLE001 - a worker's error ends the study with its message
                with lock:
                    errors.append(f"{kind} {what}: {type(e).__name__}: {e}")
                    say(errors[-1])
            finally:
                with lock:
                    active -= 1
                    lock.notify_all()

    old = {s: signal.signal(s, lambda signum, frame: children.stop()) for s in (signal.SIGTERM, signal.SIGINT)}
    threads = [threading.Thread(target=worker, name=f"kd_study-{i}", daemon=True) for i in range(a.jobs)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)  # a timed join lets the main thread run the signal handler
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        write_cells(csv_path, rows)
        commit(force=True)
    if children.stopping:
        say("stopped: the running cells saved checkpoints and resume on the next run")
    left = [c for c in cells if rows.get(c.key, {}).get("status") != "ok"]
    say(f"{len(cells) - len(left)}/{len(cells)} cells finished ({time.time() - t_start:.0f} s this sitting, "
        f"up to {a.jobs} at a time); {len(left)} left")
    report(a.study, a.results)
    if errors:
        raise SystemExit("; ".join(errors))


def run_cell(study: str, setting: str, loss: str, seed: str, root: str, data_dir: str, workdir: str) -> None:
    """Child process: one cell's training run (resumes if its workdir holds checkpoints)."""
    import logging  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from absl import logging as absl_logging  # noqa: PLC0415

    absl_logging.set_verbosity(absl_logging.WARNING)
    from cankd_jax.train.trainer import train_and_evaluate  # noqa: PLC0415

    cfg = run_config(setting, loss, int(seed), root=root, study=study, data_dir=data_dir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2, default=lambda o: o.to_dict() if hasattr(o, "to_dict") else str(o))
    print(f"=== {study} {setting} {loss} seed {seed} -> {workdir}", flush=True)
    summary = train_and_evaluate(cfg, workdir)
    print(f"=== done: step {summary.get('step')} eval {summary.get('eval')}", flush=True)


# --- the report -----------------------------------------------------------------------------------------------


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, sd


def _pm(m: float, sd: float) -> str:
    return f"{m:.2f} ± {sd:.2f}" if math.isfinite(sd) else f"{m:.2f}"


def _paired(a: dict[int, float], b: dict[int, float]) -> Optional[tuple[float, float, int, int]]:
    """Mean and std of a - b over the seeds both have, and on how many of them a > b."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [a[s] - b[s] for s in seeds]
    m, sd = _mean_std(d)
    return m, sd, sum(x > 0 for x in d), len(d)


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[int, float]]]:
    """setting -> loss -> seed -> value (finished cells only), settings and losses in study order."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    order = {name: i for i, name in enumerate(ALL_LOSSES)}
    for r in sorted(rows, key=lambda r: (list(SETTINGS).index(r["setting"]) if r["setting"] in SETTINGS else 99,
                                         order.get(r["loss"], 99), int(r["seed"]))):
        if r["status"] == "ok" and r["value"] != "" and r["loss"] != "teacher":
            out.setdefault(r["setting"], {}).setdefault(r["loss"], {})[int(r["seed"])] = float(r["value"])
    return out


def table_markdown(rows: list[dict[str, Any]], study: str) -> str:
    data = summarize(rows)
    failed = [r for r in rows if r["status"] != "ok"]
    walls = [float(r["wall_s"]) for r in rows if r["wall_s"]]
    lines = [f"# Study `{study}`: held-out mIoU (%), mean ± std over seeds", "",
             "Generated from `cells.csv` by `python benchmarks/kd_study.py --study "
             f"{study} --report`. Every loss at its preset (`cankd_jax/losses/presets.py`; an ablation is CanKD's "
             "preset with one option changed); no weight was retuned, so no sweep was run and no seed is held out. "
             "One teacher per setting (seed 0), shared by every loss and seed; a seed sets the student's "
             "initialisation and the data order. Paired differences are over the seeds both runs have "
             "(mean ± std of the per-seed difference); 'k/n' counts the seeds on which the first is higher.", ""]
    for setting, losses in data.items():
        teacher = next((r["teacher_value"] for r in rows if r["setting"] == setting and r["teacher_value"]), "")
        t_row = next((r for r in rows if r["setting"] == setting and r["loss"] == "teacher"), None)
        t_steps = f" ({t_row['steps']} steps, {float(t_row['wall_s']):.0f} s)" if t_row and t_row["wall_s"] else ""
        s = SETTINGS.get(setting)
        steps = next((r["steps"] for r in rows if r["setting"] == setting and r["status"] == "ok"
                      and r["loss"] != "teacher"), "")
        lines += [f"## Setting `{setting}`" + (f": {s.description}" if s else ""), "",
                  f"Teacher: {teacher} mIoU{t_steps}. Student steps: {steps}.", "",
                  "| loss | seeds | mIoU | vs student alone | better than alone | vs CanKD | CanKD better "
                  "| machine s/cell |",
                  "|---|---|---|---|---|---|---|---|"]
        alone, cankd = losses.get("none", {}), losses.get("cankd", {})
        for loss, by_seed in losses.items():
            m, sd = _mean_std(list(by_seed.values()))
            cols = [f"{LABELS.get(loss, loss)} (`{loss}`)", str(len(by_seed)), _pm(m, sd)]
            p = _paired(by_seed, alone) if loss != "none" else None
            cols += [f"{p[0]:+.2f} ± {p[1]:.2f}" if p and math.isfinite(p[1]) else (f"{p[0]:+.2f}" if p else "-"),
                     f"{p[2]}/{p[3]}" if p else "-"]
            q = _paired(cankd, by_seed) if loss != "cankd" else None
            cols += [f"{-q[0]:+.2f} ± {q[1]:.2f}" if q and math.isfinite(q[1]) else (f"{-q[0]:+.2f}" if q else "-"),
                     f"CanKD > {LABELS.get(loss, loss)} on {q[2]} of {q[3]}" if q else "-"]
            w = [float(r["machine_s"]) for r in rows if r["setting"] == setting and r["loss"] == loss and r["wall_s"]]
            cols.append(f"{sum(w) / len(w):.0f}" if w else "-")
            lines.append("| " + " | ".join(cols) + " |")
        lines.append("")
    if failed:
        lines += ["Failed cells (not in the means): " + ", ".join(
            f"{r['setting']}/{r['loss']}/seed{r['seed']}" for r in failed), ""]
    if walls:
        # A run's share of the machine (`_Children`; read_cells fills it in for rows from before --jobs): runs
        # trained side by side are not counted twice.
        machine = sum(float(r["machine_s"]) for r in rows if r["wall_s"])
        t_machine = sum(float(r["machine_s"]) for r in rows if r["wall_s"] and r["loss"] == "teacher")
        n_teachers = sum(1 for r in rows if r["wall_s"] and r["loss"] == "teacher")
        overlap = (f"; their wall times add up to {sum(walls) / 3600:.2f} h, as some trained side by side"
                   if machine < sum(walls) - 1 else "")
        lines += [f"Time: {machine / 3600:.2f} h of a 2-core CPU machine in total, {len(walls) - n_teachers} cells "
                  f"({(machine - t_machine) / 3600:.2f} h) and {n_teachers} teachers ({t_machine / 3600:.2f} h). "
                  "A run counts its share of the machine (`machine_s` in `cells.csv`: its wall time, each moment "
                  f"divided by the runs going then){overlap}. The machine was at times shared with other work "
                  "(1-minute load averages at each run's start and end in `cells.csv`); a run's time includes "
                  "starting Python and JAX, compiling (cached across the seeds of a loss), training, evaluating "
                  "and exporting.", ""]
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], path: str, study: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    data = summarize(rows)
    settings = list(data)
    losses = [name for name in ALL_LOSSES if any(name in data[s] for s in settings)]
    losses += sorted({name for s in settings for name in data[s]} - set(losses))
    # Each group holds only its setting's losses, side by side and centred; a loss keeps its colour everywhere.
    present = {s: [name for name in losses if name in data[s]] for s in settings}
    width = 0.8 / max([len(v) for v in present.values()] + [1])
    fig, ax = plt.subplots(figsize=(max(8, 1.2 + 0.55 * sum(len(v) for v in present.values())), 4.8), dpi=120)
    cmap = plt.get_cmap("tab20")
    for j, loss in enumerate(losses):
        xs, ms, sds = [], [], []
        for i, s in enumerate(settings):
            if loss in data[s]:
                m, sd = _mean_std(list(data[s][loss].values()))
                k, n = present[s].index(loss), len(present[s])
                xs.append(i + (k - (n - 1) / 2) * width)
                ms.append(m)
                sds.append(sd if math.isfinite(sd) else 0.0)
        ax.bar(xs, ms, width * 0.92, yerr=sds, capsize=2, color=cmap(j % 20), label=LABELS.get(loss, loss),
               edgecolor="black" if loss in ("none", "cankd") else "none", linewidth=0.8)
    ax.set_xticks(range(len(settings)))
    ax.set_xticklabels([f"{s} (n={max(len(v) for v in data[s].values())} seeds)" for s in settings])
    ax.set_ylabel("held-out mIoU (%)")
    ax.set_title(f"kd_study '{study}': mean ± std over seeds, every loss at its preset")
    if losses:  # a study with only its teachers so far has no bars
        ax.legend(ncol=2, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(study: str, results: str) -> None:
    out = os.path.join(results, study)
    rows = list(read_cells(os.path.join(out, "cells.csv")).values())
    if not rows:
        print(f"no cells in {out}/cells.csv yet")
        return
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table_markdown(rows, study))
    chart(rows, os.path.join(out, "chart.png"), study)


def plan(a: argparse.Namespace) -> None:
    rows = read_cells(os.path.join(a.results, a.study, "cells.csv"))
    cells = grid(a.study, a.seeds, a.settings, a.losses)
    for c in cells:
        r = rows.get(c.key)
        state = r["status"] if r else ("on disk" if finished(cell_dir(a.root, a.study, c)) else "to run")
        print(f"{c.setting:6s} {c.loss:24s} seed {c.seed}: {state}")
    print(f"{sum(1 for c in cells if rows.get(c.key, {}).get('status') == 'ok')}/{len(cells)} recorded")


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_cell":
        run_cell(*argv[1:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--study", default="demo", choices=sorted(STUDIES))
    p.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 of every cell")
    p.add_argument("--settings", type=lambda s: s.split(","), default=None, help="only these settings (a,b)")
    p.add_argument("--losses", type=lambda s: s.split(","), default=None, help="only / also these losses (a,b)")
    p.add_argument("--root", default=os.path.join(ROOT, "runs", "kd_study"), help="where the cells' workdirs go")
    p.add_argument("--results", default=os.path.join(ROOT, "results"), help="cells.csv, table.md, chart.png go "
                   "to RESULTS/<study>/")
    p.add_argument("--data-dir", default="", help="TFDS dir for the synthetic sets (default ROOT/tfds)")
    p.add_argument("--report", action="store_true", help="only regenerate table.md and chart.png from cells.csv")
    p.add_argument("--plan", action="store_true", help="list the cells and their state, run nothing")
    p.add_argument("--max-cells", type=int, default=0, help="stop after training this many cells (0: all)")
    p.add_argument("--retry-failed", action="store_true", help="run cells recorded as failed again")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (one run leaves part of a small "
                   "machine idle); each cell's numbers do not depend on it, its wall time does")
    p.add_argument("--commit", action="store_true", help="git-commit results/<study>/ as cells finish")
    p.add_argument("--commit-every", type=float, default=900.0, help="seconds between commits with --commit")
    a = p.parse_args(argv)
    for name in a.settings or []:
        if name not in SETTINGS:
            p.error(f"unknown setting {name!r}; choose from {', '.join(SETTINGS)}")
        if name not in STUDIES[a.study]:  # else the study selects no cell and "finishes" having run nothing
            p.error(f"setting {name!r} is not in study {a.study!r}; its settings: {', '.join(STUDIES[a.study])}")
    if a.seeds < 1:
        p.error(f"--seeds must be at least 1 (seeds 0 .. N-1), got {a.seeds}")
    if a.max_cells < 0:
        p.error(f"--max-cells must be >= 0 (0: all), got {a.max_cells}")
    for name in a.losses or []:
        if name not in LABELS:
            p.error(f"unknown loss {name!r}; choose from {', '.join(LABELS)}")
    if a.jobs < 1:
        p.error(f"--jobs must be at least 1, got {a.jobs}")
    if a.report:
        report(a.study, a.results)
    elif a.plan:
        plan(a)
    else:
        run_study(a)


if __name__ == "__main__":
    main()
