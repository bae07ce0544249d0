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
    last = _fails_with_one_line(_command(tmp_path / "run", "--config.optimizer.learning_rate=0.1"),
                                "unknown config key", "learning_rate")
    assert "learning_rate (see" in last  # no stray quote


def test_a_list_item_by_dotted_index_names_the_bracket_form(tmp_path):
    _fails_with_one_line(_command(tmp_path / "run", "--config.distill.0.loss=cwd"),
                         "distill.0.loss", "e.g. --config.distill[0].loss=cwd")


def test_an_argument_to_a_config_without_choices_is_refused_whole(tmp_path):
    last = _fails_with_one_line(_command(tmp_path / "run", config=f"{SMOKE}:detector=dino"))
    assert last.endswith("configs/smoke.py takes no argument after ':', got 'detector=dino'"), last


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
                                  "--config.teacher.random_init=True",
                                  config=os.path.join(ROOT, "configs", "cityscapes.py")),
                         "cityscapes", "not found", "--config.data.data_dir")


def test_num_classes_other_than_the_data_sets_is_refused(tmp_path):
    """Before: 3 classes on the 7-class synthetic scenes trained into NaN at step 1, named only as non-finite."""
    _fails_with_one_line(_command(tmp_path / "run", f"--config.data.data_dir={tmp_path / 'data'}",
                                  "--config.task.num_classes=3"),
                         "task.num_classes=3", "'synthetic' has 7 classes", "--config.task.num_classes=7")


def test_a_value_that_would_train_uphill_is_refused_before_any_data_is_read(tmp_path):
    """A negative clip norm trained to exit 0 with the loss climbing (optax flips every gradient)."""
    _fails_with_one_line(_command(tmp_path / "run", f"--config.data.data_dir={tmp_path / 'data'}",
                                  "--config.optimizer.grad_clip_norm=-1.0"),
                         "optimizer.grad_clip_norm must be a finite number >= 0 (0 or None: no clipping), got -1.0")
    assert not (tmp_path / "data").exists()


def test_a_teacher_without_weights_is_refused_before_any_data_is_read(tmp_path):
    """The paper configs would otherwise distil from a random teacher for 80k steps."""
    for config in ("cityscapes.py", "ade20k.py", "classification.py"):
        last = _fails_with_one_line(
            _command(tmp_path / "run", f"--config.data.data_dir={tmp_path / 'empty'}",
                     config=os.path.join(ROOT, "configs", config)),
            "teacher.checkpoint is empty", "--config.teacher.checkpoint", "teacher.random_init")
        assert "data_dir" not in last  # refused before the (missing) data set was opened
    assert not (tmp_path / "empty").exists()


def test_partial_slurm_environment_is_one_line_and_complete_but_broken_too(tmp_path):
    args = _command(tmp_path / "run", f"--config.data.data_dir={tmp_path / 'data'}")
    partial = dict(_env(), SLURM_JOB_ID="1234", SLURM_NTASKS="2")
    proc = subprocess.run(args, capture_output=True, text=True, env=partial, timeout=300, cwd=ROOT)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert last.startswith("train.py: error: SLURM_JOB_ID is set but SLURM_STEP_NODELIST"), last
    assert "--num_processes=1" in last
    broken = dict(partial, SLURM_STEP_NODELIST="node[001-002]", SLURM_PROCID="0", SLURM_LOCALID="0",
                  SLURM_JOB_ID="not-a-number")
    proc = subprocess.run(args, capture_output=True, text=True, env=broken, timeout=300, cwd=ROOT)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert last.startswith("train.py: error: multi-host auto-detection failed"), last
    assert "--coordinator_address" in last
