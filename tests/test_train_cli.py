"""`train.py` as users run it: one-line errors that name the fix, and SIGTERM (preemption) saving a checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.py")


def _command(workdir, *overrides, config=SMOKE):
    return [sys.executable, os.path.join(ROOT, "train.py"), f"--config={config}", f"--workdir={workdir}", *overrides]


def _env():
    # Four host devices (conftest sets XLA_FLAGS for this process; children inherit it). The rbg PRNG
    # initialises the smoke networks in a fraction of threefry's compile time on CPU; nothing here
    # depends on the random values.
    return dict(os.environ, PYTHONUNBUFFERED="1", JAX_DEFAULT_PRNG_IMPL="rbg")


def _fails_with_one_line(args, *expected: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: "), proc.stderr
    for text in expected:
        assert text in last, last
    return last


def test_unknown_config_key_names_the_key(tmp_path):
    _fails_with_one_line(_command(tmp_path / "run", "--config.optimizer.learning_rate=0.1"),
                         "unknown config key", "learning_rate")


def test_missing_config_file(tmp_path):
    _fails_with_one_line(_command(tmp_path / "run", config=os.path.join(ROOT, "configs", "nope.py")),
                         "nope.py", "not found")


def test_bad_config_argument_names_the_choices(tmp_path):
    demo = os.path.join(ROOT, "configs", "demo.py")
    _fails_with_one_line(_command(tmp_path / "run", config=f"{demo}:loss=fitnet+kd"), "unknown loss kd", "cankd")


def test_missing_teacher_checkpoint(tmp_path):
    _fails_with_one_line(_command(tmp_path / "run", f"--config.data.data_dir={tmp_path / 'data'}",
                                  f"--config.teacher.checkpoint={tmp_path / 'teacher.pth'}"),
                         "teacher checkpoint", "teacher.pth", "not found", "--config.teacher.checkpoint")


def test_batch_not_divisible_by_the_devices(tmp_path):
    _fails_with_one_line(_command(tmp_path / "run", "--config.batch_size=6"),
                         "batch_size=6", "4 devices", "--config.batch_size=4")


def test_missing_dataset_names_how_to_prepare_it(tmp_path):
    _fails_with_one_line(_command(tmp_path / "run", f"--config.data.data_dir={tmp_path / 'empty'}",
                                  config=os.path.join(ROOT, "configs", "cityscapes.py")),
                         "cityscapes", "not found", "--config.data.data_dir")


def _rows(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def test_sigterm_saves_a_checkpoint_and_the_rerun_continues_from_it(tmp_path):
    workdir = tmp_path / "run"
    base = _command(workdir, f"--config.data.data_dir={tmp_path / 'data'}", "--config.log_every=1",
                    "--config.checkpoint_every=400")
    args = [*base, "--config.total_steps=400", "--config.eval_every=400"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT)
    try:
        deadline = time.time() + 240
        while not _rows(workdir) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.stdout.read()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "SIGTERM received" in out
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert len(steps) == 1 and 1 <= steps[0] < 400, steps
    stopped = steps[0]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["step"] == stopped and not summary["finished"]
    assert not (workdir / "export").exists()  # only a finished run exports

    # The same command again picks up where the preempted run saved (a short remainder keeps the test quick).
    rerun = subprocess.run([*base, f"--config.total_steps={stopped + 2}", f"--config.eval_every={stopped + 2}"],
                           capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed from step {stopped}" in rerun.stderr
    logged = [r["step"] for r in _rows(workdir)]
    assert logged[-2:] == [stopped + 1, stopped + 2], logged
    assert json.loads((workdir / "summary.json").read_text())["finished"]
