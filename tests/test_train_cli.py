"""`train.py` as users run it: one-line errors that name the fix (the runs themselves: test_train_e2e.py)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.py")


def _command(workdir, *overrides, config=SMOKE):
    return [sys.executable, os.path.join(ROOT, "train.py"), f"--config={config}", f"--workdir={workdir}", *overrides]


def _env():
    # Four host devices (conftest sets XLA_FLAGS for this process; children inherit it).
    return dict(os.environ, PYTHONUNBUFFERED="1")


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
