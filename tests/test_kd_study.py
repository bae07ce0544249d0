"""cankd_jax/study.py (benchmarks/kd_study.py's study): the grid skips finished cells and resumes, the report needs
only cells.csv, and each cell is the demo's run with the setting's sizes and its own seed (no training here: the
child is faked)."""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time

import pytest

from cankd_jax import study as kd_study


class _FakeProc:
    """What the study's signal handler sees of a child: `send_signal`."""

    def __init__(self):
        self.signalled = threading.Event()

    def send_signal(self, sig):
        assert sig == signal.SIGTERM
        self.signalled.set()


def _fake_child(calls, hold=0.0, on_start=None):
    """Stands in for the training child: registered with the study's children like a real one, a cell runs for `hold`
    seconds (less if signalled: then it leaves the run unfinished, as a child that saved a checkpoint does) and
    writes the summary.json a finished run would. A cell that starts before its setting's teacher has finished
    fails the study. `on_start(setting, loss, seed)` runs as the child starts."""
    lock = threading.Lock()
    now = [0]

    def run_child(args, log_path, cache_dir, children=None):
        _, study, setting, loss, seed, root, data_dir, workdir = args
        if loss != "teacher":
            assert kd_study.finished(kd_study.teacher_dir(root, study, setting)), "a cell started before its teacher"
        t0, proc = time.time(), _FakeProc()
        if children is not None:
            children.add(proc)
        run_child.procs.append(proc)
        with lock:
            calls.append((setting, loss, int(seed)))
            now[0] += 1
            run_child.most = max(run_child.most, now[0])
        if on_start:
            on_start(setting, loss, int(seed))
        proc.signalled.wait(hold if loss != "teacher" else 0.0)  # the teacher never holds: cells wait on it
        with lock:
            now[0] -= 1
        share = children.remove(proc) if children is not None else 0.0
        wall = time.time() - t0 if hold else 1.5
        os.makedirs(workdir, exist_ok=True)
        if proc.signalled.is_set():
            return 0, wall, 0.1, 0.2, share
        value = 0.5 if loss == "teacher" else 0.1 + 0.01 * int(seed) + 0.05 * (loss == "cankd")
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump({"finished": True, "metric": "mIoU", "step": 3, "eval": {"mIoU": value}}, f)
        return 0, wall, 0.1, 0.2, share if hold else wall

    run_child.most = 0
    run_child.procs = []
    return run_child


def test_grid_runs_each_cell_once_resumes_and_extends(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(kd_study, "run_child", _fake_child(calls))
    common = ["--study", "tiny", "--root", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    kd_study.main([*common, "--seeds", "2", "--max-cells", "4"])
    assert calls[0] == ("tiny", "teacher", 0)
    assert calls[1:] == [("tiny", "none", 0), ("tiny", "cankd", 0), ("tiny", "in_mse", 0), ("tiny", "none", 1)]
    calls.clear()
    kd_study.main([*common, "--seeds", "2"])  # the rest of seed 1 only
    assert calls == [("tiny", "cankd", 1), ("tiny", "in_mse", 1)]
    calls.clear()
    kd_study.main([*common, "--seeds", "3"])  # one more seed
    assert calls == [("tiny", "none", 2), ("tiny", "cankd", 2), ("tiny", "in_mse", 2)]
    with open(tmp_path / "results" / "tiny" / "cells.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and {r["status"] for r in rows} == {"ok"}
    assert rows[0]["loss"] == "teacher" and rows[0]["value"] == "50.00" and rows[0]["wall_s"] == "1.5"
    assert {r["teacher_value"] for r in rows} == {"50.00"}
    assert [r["value"] for r in rows if r["loss"] == "cankd"] == ["15.00", "16.00", "17.00"]
    table = (tmp_path / "results" / "tiny" / "table.md").read_text()
    assert "CanKD > student alone on 3 of 3" in table
    assert (tmp_path / "results" / "tiny" / "chart.png").stat().st_size > 0


def _cells_csv(results):
    with open(results / "tiny" / "cells.csv") as f:
        return {(r["loss"], r["seed"]): r for r in csv.DictReader(f)}


def _meet(parties: int):
    """An `on_start` hook: the first `parties` cells (not the teacher) each wait, at most 30 s, until all of them
    have started, so they provably run at the same time (a study that ran them one after the other would break
    the barrier: `threading.BrokenBarrierError`). Later cells pass straight through."""
    barrier, seen, lock = threading.Barrier(parties, timeout=30), [], threading.Lock()

    def on_start(setting, loss, seed):
        if loss == "teacher":
            return
        with lock:
            seen.append((loss, seed))
            first = len(seen) <= parties
        if first:
            barrier.wait()

    return on_start


def test_two_jobs_run_every_cell_once_after_the_teacher_with_the_same_results(tmp_path, monkeypatch):
    common = ["--study", "tiny", "--seeds", "3"]
    one = _fake_child([])
    monkeypatch.setattr(kd_study, "run_child", one)
    kd_study.main([*common, "--root", str(tmp_path / "a"), "--results", str(tmp_path / "ra")])
    calls = []
    two = _fake_child(calls, on_start=_meet(2))
    monkeypatch.setattr(kd_study, "run_child", two)
    # 'none' named twice is one cell: two runs in one workdir would collide.
    kd_study.main([*common, "--jobs", "2", "--losses", "none,cankd,in_mse,none", "--root", str(tmp_path / "b"),
                   "--results", str(tmp_path / "rb")])
    assert calls[0] == ("tiny", "teacher", 0) and sorted(calls[1:]) == sorted(
        ("tiny", loss, seed) for seed in range(3) for loss in ("none", "cankd", "in_mse"))
    # The teacher alone first (each cell checks it has finished), then two cells at a time (the barrier).
    assert one.most == 1 and two.most == 2
    a, b = _cells_csv(tmp_path / "ra"), _cells_csv(tmp_path / "rb")
    assert a.keys() == b.keys() and all(a[k]["value"] == b[k]["value"] for k in a)


def test_machine_share_divides_each_moment_among_the_runs_going():
    """`machine_s`: a run's wall time with each moment divided by the number of runs going then (a fake clock)."""
    now = [100.0]
    children = kd_study._Children(clock=lambda: now[0])
    a, b, c = object(), object(), object()
    children.add(a)           # t=100: a alone
    now[0] = 110.0
    children.add(b)           # t=110: a, b
    now[0] = 120.0
    children.add(c)           # t=120: a, b, c
    now[0] = 150.0
    assert children.remove(a) == pytest.approx(10 + 10 / 2 + 30 / 3)
    now[0] = 160.0
    assert children.remove(c) == pytest.approx(30 / 3 + 10 / 2)
    now[0] = 170.0
    assert children.remove(b) == pytest.approx(10 / 2 + 30 / 3 + 10 / 2 + 10)
    assert len(children) == 0


def test_a_signal_stops_every_running_cell_records_none_unfinished_and_the_rerun_completes(tmp_path, monkeypatch):
    common = ["--study", "tiny", "--seeds", "2", "--jobs", "2", "--root", str(tmp_path / "runs"),
              "--results", str(tmp_path / "results")]

    meet = _meet(2)

    def preempt(setting, loss, seed):
        meet(setting, loss, seed)  # both first cells are running when the signal comes
        if (loss, seed) == ("cankd", 0):
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler does to the study

    calls = []
    first = _fake_child(calls, hold=60.0, on_start=preempt)  # a cell ends early only when signalled
    monkeypatch.setattr(kd_study, "run_child", first)
    kd_study.main(common)
    # The teacher finished; 'none' and 'cankd' seed 0 were running: both were told to stop, neither is recorded,
    # and nothing started after the signal. (Either worker may reach the fake child first.)
    assert calls[0] == ("tiny", "teacher", 0) and sorted(calls[1:]) == [("tiny", "cankd", 0), ("tiny", "none", 0)]
    assert [p.signalled.is_set() for p in first.procs] == [False, True, True]
    assert set(_cells_csv(tmp_path / "results")) == {("teacher", "0")}
    calls.clear()
    monkeypatch.setattr(kd_study, "run_child", _fake_child(calls))
    kd_study.main(common)
    assert sorted(calls) == sorted(("tiny", loss, seed) for seed in range(2) for loss in ("none", "cankd", "in_mse"))
    assert len(_cells_csv(tmp_path / "results")) == 7


def test_the_teacher_row_is_recorded_from_disk_and_a_failing_run_ends_the_study_with_its_error(tmp_path, monkeypatch):
    common = ["--study", "tiny", "--seeds", "1", "--root", str(tmp_path / "runs"), "--results", str(tmp_path / "r")]
    monkeypatch.setattr(kd_study, "run_child", _fake_child([]))
    kd_study.main([*common, "--max-cells", "1"])
    os.remove(tmp_path / "r" / "tiny" / "cells.csv")  # results kept elsewhere, or a fresh --results
    broken = _fake_child([])

    def crash(args, *rest, **kw):
        if args[3] == "cankd":
            raise OSError("disk full")
        return broken(args, *rest, **kw)

    monkeypatch.setattr(kd_study, "run_child", crash)
    with pytest.raises(SystemExit, match="cell .*cankd.*OSError: disk full"):
        kd_study.main([*common, "--jobs", "2"])
    rows = _cells_csv(tmp_path / "r")
    assert ("teacher", "0") in rows and ("cankd", "0") not in rows


def test_a_failing_teacher_under_two_jobs_ends_the_study_before_any_cell(tmp_path, monkeypatch):
    common = ["--study", "tiny", "--seeds", "2", "--jobs", "2", "--root", str(tmp_path / "runs"),
              "--results", str(tmp_path / "r")]
    calls = []

    def teacher_fails(args, log_path, cache_dir, children=None):
        calls.append(args[3])
        os.makedirs(args[-1], exist_ok=True)  # it ran, wrote its log, and exited 1 without a summary
        return 1, 2.0, 0.1, 0.2, 2.0

    monkeypatch.setattr(kd_study, "run_child", teacher_fails)
    with pytest.raises(SystemExit, match="the tiny teacher failed; see .*teacher/study.log"):
        kd_study.main(common)
    assert calls == ["teacher"]  # the second worker never started a cell that has no teacher to distil from
    assert not os.path.exists(tmp_path / "r" / "tiny" / "cells.csv") or not _cells_csv(tmp_path / "r")
    later = []
    monkeypatch.setattr(kd_study, "run_child", _fake_child(later))
    kd_study.main(common)  # fixed, the same command trains the teacher again and then every cell
    assert later[0] == ("tiny", "teacher", 0) and len(later) == 7


def test_max_cells_counts_the_cells_started_by_all_jobs(tmp_path, monkeypatch):
    common = ["--study", "tiny", "--seeds", "3", "--jobs", "2", "--root", str(tmp_path / "runs"),
              "--results", str(tmp_path / "r")]
    calls = []
    monkeypatch.setattr(kd_study, "run_child", _fake_child(calls, hold=0.2))
    kd_study.main([*common, "--max-cells", "3"])
    assert calls[0] == ("tiny", "teacher", 0) and len(calls) == 4  # the teacher is not a cell
    assert len(_cells_csv(tmp_path / "r")) == 4
    first = set(calls[1:])
    calls.clear()
    kd_study.main([*common, "--max-cells", "5"])
    assert len(calls) == 5 and not first & set(calls)
    calls.clear()
    kd_study.main(common)
    assert len(calls) == 1 and len(_cells_csv(tmp_path / "r")) == 10


def test_report_needs_only_cells_csv(tmp_path):
    out = tmp_path / "results" / "demo"
    out.mkdir(parents=True)
    rows = []
    for seed, (none, cankd, pkd) in enumerate([(18.0, 24.0, 25.0), (19.0, 23.0, 22.0), (17.0, 25.0, 26.0)]):
        for loss, v in (("none", none), ("cankd", cankd), ("pkd", pkd)):
            rows.append(dict(setting="demo", loss=loss, seed=seed, metric="mIoU", value=f"{v:.2f}", steps=1000,
                             wall_s="100.0", teacher_value="37.00", status="ok", load_start=1, load_end=1,
                             sittings=1, machine_s="50.0" if loss == "cankd" else ""))  # CanKD beside another
    rows.append(dict(setting="demo", loss="at", seed=0, metric="mIoU", value="", steps=10, wall_s="5.0",
                     teacher_value="37.00", status="failed", load_start=1, load_end=1, sittings=1))
    with open(out / "cells.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=kd_study.CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    kd_study.main(["--study", "demo", "--report", "--results", str(tmp_path / "results")])
    table = (out / "table.md").read_text()
    assert "| CanKD (`cankd`) | 3 | 24.00 ± 1.00 | +6.00 ± 2.00 | 3/3 | - | - | 50 |" in table  # its share
    # 6 runs of 100 s alone, 3 of 50 s shares and a failed 5 s one: 755 s of the machine, 905 s of wall time.
    assert "Time: 0.21 h of a 2-core CPU machine in total, 10 cells (0.21 h) and 0 teachers" in table
    assert "their wall times add up to 0.25 h" in table
    assert "| PKD (`pkd`) | 3 | 24.33 ± 2.08 | +6.33 ± 3.06 | 3/3 | +0.33 ± 1.15 | CanKD > PKD on 1 of 3 | 100 |" in table
    assert "Failed cells (not in the means): demo/at/seed0" in table
    assert (out / "chart.png").stat().st_size > 0


@pytest.mark.parametrize("setting,size,steps", [("demo", 64, 1000), ("large", 128, 500)])
def test_a_cell_is_the_demo_run_resized_with_its_own_seed(setting, size, steps):
    """The README's demo recipe, written out: the student, the ablated CanKD term, AdamW, the sizes."""
    cfg = kd_study.run_config(setting, "cankd_no_skip", 3, root="/r", study="s")
    assert (cfg.seed, cfg.data.image_size, cfg.total_steps, cfg.batch_size) == (3, size, steps, 16)
    assert cfg.teacher.checkpoint == f"/r/s/{setting}/teacher/export"
    plain = lambda d: d.to_dict() if hasattr(d, "to_dict") else dict(d)  # noqa: E731
    assert [plain(d) for d in cfg.distill] == [{
        "name": "cankd_no_skip", "loss": "cankd", "student_feature": "layer4", "teacher_feature": "layer4",
        "connector": 128, "weight": 1.0, "options": {"loss_weight": 10.0, "skip": False, "in_channels": 128}}]
    assert cfg.student.to_dict() == {"name": "fcn", "backbone": "resnet18_v1c_d8", "head_channels": 32,
                                     "backbone_kwargs": {"base_width": 8, "stem_width": 8}, "frozen_stages": -1,
                                     "norm_eval": False}
    assert cfg.optimizer.to_dict() == {"name": "adamw", "lr": 3e-3, "weight_decay": 1e-4, "grad_clip_norm": 0.0,
                                       "schedule": "poly", "power": 0.9, "min_lr": 1e-5, "warmup_steps": 50}
    teacher = kd_study.run_config(setting, "teacher", 3, root="/r", study="s")
    assert teacher.seed == 0 and list(teacher.distill) == [] and teacher.student.backbone_kwargs.base_width == 16
    assert teacher.total_steps == 2000
    alone = kd_study.run_config(setting, "none", 3, root="/r", study="s")
    assert list(alone.distill) == [] and alone.seed == 3 and alone.student.backbone_kwargs.base_width == 8


def test_the_study_runs_as_a_module(tmp_path):
    """Cells train in children started as `python -m cankd_jax.study` (the package's module, not the script): that
    entry point answers as the script does."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "cankd_jax.study", "--study", "demo", "--plan", "--seeds", "1",
                          "--root", str(tmp_path / "runs"), "--results", str(tmp_path / "results")],
                         capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].startswith("0/") and "recorded" in out.stdout



@pytest.mark.parametrize("options, message", [
    (["--study", "tiny", "--seeds", "0"], "--seeds must be at least 1 (seeds 0 .. N-1), got 0"),
    (["--study", "tiny", "--settings", "demo"], "setting 'demo' is not in study 'tiny'; its settings: tiny"),
    (["--study", "tiny", "--max-cells", "-1"], "--max-cells must be >= 0 (0: all), got -1"),
])
def test_options_that_select_no_cell_are_refused(tmp_path, capsys, options, message):
    """Each of these ran nothing and exited 0 ('0/0 cells finished')."""
    with pytest.raises(SystemExit) as e:
        kd_study.main([*options, "--root", str(tmp_path / "runs"), "--results", str(tmp_path / "results")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
