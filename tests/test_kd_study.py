"""benchmarks/kd_study.py: the grid skips finished cells and resumes, the report needs only cells.csv, and each
cell is the demo's run with the setting's sizes and its own seed (no training here: the child is faked)."""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import kd_study  # noqa: E402


def _fake_child(calls, hold=0.0, on_start=None):
    """Stands in for the training child: writes the summary.json a finished run would, after `hold` seconds;
    `on_start(setting, loss, seed)` may return False to leave the run unfinished (a run stopped by a signal)."""
    lock = threading.Lock()
    now = [0]

    def run_child(args, log_path, cache_dir, running=None):
        _, study, setting, loss, seed, root, data_dir, workdir = args
        with lock:
            calls.append((setting, loss, int(seed)))
            now[0] += 1
            run_child.most = max(run_child.most, now[0])
        finish = on_start(setting, loss, int(seed)) if on_start else True
        time.sleep(hold)
        with lock:
            now[0] -= 1
        os.makedirs(workdir, exist_ok=True)
        if finish is False:
            return 0, 1.0, 0.1, 0.2
        value = 0.5 if loss == "teacher" else 0.1 + 0.01 * int(seed) + 0.05 * (loss == "cankd")
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump({"finished": True, "metric": "mIoU", "step": 3, "eval": {"mIoU": value}}, f)
        return 0, 1.5, 0.1, 0.2

    run_child.most = 0
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


def test_two_jobs_run_every_cell_once_after_the_teacher_with_the_same_results(tmp_path, monkeypatch):
    common = ["--study", "tiny", "--seeds", "3"]
    one = _fake_child([])
    monkeypatch.setattr(kd_study, "run_child", one)
    kd_study.main([*common, "--root", str(tmp_path / "a"), "--results", str(tmp_path / "ra")])
    calls = []
    two = _fake_child(calls, hold=0.2)
    monkeypatch.setattr(kd_study, "run_child", two)
    kd_study.main([*common, "--jobs", "2", "--root", str(tmp_path / "b"), "--results", str(tmp_path / "rb")])
    assert calls[0] == ("tiny", "teacher", 0) and sorted(calls[1:]) == sorted(
        ("tiny", loss, seed) for seed in range(3) for loss in ("none", "cankd", "in_mse"))
    assert one.most == 1 and two.most == 2  # the teacher alone first, then two cells at a time
    a, b = _cells_csv(tmp_path / "ra"), _cells_csv(tmp_path / "rb")
    assert a.keys() == b.keys() and all(a[k]["value"] == b[k]["value"] for k in a)
    assert {r["jobs"] for r in a.values()} == {"1"} and {r["jobs"] for r in b.values()} == {"2"}


def test_a_signal_stops_every_running_cell_records_none_unfinished_and_the_rerun_completes(tmp_path, monkeypatch):
    common = ["--study", "tiny", "--seeds", "2", "--jobs", "2", "--root", str(tmp_path / "runs"),
              "--results", str(tmp_path / "results")]

    def preempt(setting, loss, seed):
        if (loss, seed) == ("cankd", 0):
            os.kill(os.getpid(), signal.SIGTERM)  # what the scheduler does to the study
            time.sleep(0.5)  # the main thread's handler runs
            return False  # the child saved a checkpoint and exited
        return True

    calls = []
    monkeypatch.setattr(kd_study, "run_child", _fake_child(calls, hold=0.1, on_start=preempt))
    kd_study.main(common)
    rows = _cells_csv(tmp_path / "results")
    assert ("cankd", "0") not in rows and ("teacher", "0") in rows
    assert len(calls) <= 4  # the teacher, the stopped cell and what ran beside it; nothing starts after the stop
    done = {k for k in rows if k != ("teacher", "0")}
    calls.clear()
    monkeypatch.setattr(kd_study, "run_child", _fake_child(calls))
    kd_study.main(common)
    assert ("tiny", "cankd", 0) in calls and ("tiny", "teacher", 0) not in calls
    assert not {(loss, str(seed)) for _, loss, seed in calls} & done  # finished cells never run again
    assert len(_cells_csv(tmp_path / "results")) == 7


def test_report_needs_only_cells_csv(tmp_path):
    out = tmp_path / "results" / "demo"
    out.mkdir(parents=True)
    rows = []
    for seed, (none, cankd, pkd) in enumerate([(18.0, 24.0, 25.0), (19.0, 23.0, 22.0), (17.0, 25.0, 26.0)]):
        for loss, v in (("none", none), ("cankd", cankd), ("pkd", pkd)):
            rows.append(dict(setting="demo", loss=loss, seed=seed, metric="mIoU", value=f"{v:.2f}", steps=1000,
                             wall_s="100.0", teacher_value="37.00", status="ok", load_start=1, load_end=1,
                             sittings=1))
    rows.append(dict(setting="demo", loss="at", seed=0, metric="mIoU", value="", steps=10, wall_s="5.0",
                     teacher_value="37.00", status="failed", load_start=1, load_end=1, sittings=1))
    with open(out / "cells.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=kd_study.CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    kd_study.main(["--study", "demo", "--report", "--results", str(tmp_path / "results")])
    table = (out / "table.md").read_text()
    assert "| CanKD (`cankd`) | 3 | 24.00 ± 1.00 | +6.00 ± 2.00 | 3/3 | - | - | 100 |" in table
    assert "| PKD (`pkd`) | 3 | 24.33 ± 2.08 | +6.33 ± 3.06 | 3/3 | +0.33 ± 1.15 | CanKD > PKD on 1 of 3 | 100 |" in table
    assert "Failed cells (not in the means): demo/at/seed0" in table
    assert (out / "chart.png").stat().st_size > 0


@pytest.mark.parametrize("setting,size", [("demo", 64), ("large", 128)])
def test_a_cell_is_the_demo_run_resized_with_its_own_seed(setting, size):
    from cankd_jax.config_arg import load_config
    from cankd_jax.train.runner import phase_config

    cfg = kd_study.run_config(setting, "cankd_no_skip", 3, root="/r", study="s")
    demo = phase_config(load_config(kd_study.DEMO_CONFIG, "loss=cankd_no_skip"), "cankd_no_skip", "/r/s/" + setting)
    assert cfg.seed == 3 and cfg.data.image_size == size
    assert cfg.teacher.checkpoint == f"/r/s/{setting}/teacher/export"
    plain = lambda d: d.to_dict() if hasattr(d, "to_dict") else dict(d)  # noqa: E731
    assert plain(cfg.distill[0]) == plain(demo.distill[0])
    assert cfg.student.to_dict() == demo.student.to_dict() and cfg.optimizer.to_dict() == demo.optimizer.to_dict()
    assert cfg.total_steps == kd_study.SETTINGS[setting].steps
    teacher = kd_study.run_config(setting, "teacher", 3, root="/r", study="s")
    assert teacher.seed == kd_study.TEACHER_SEED and list(teacher.distill) == [] and teacher.student.kwargs.base_width == 16
    alone = kd_study.run_config(setting, "none", 3, root="/r", study="s")
    assert list(alone.distill) == [] and alone.seed == 3
