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


def test_a_config_file_that_cannot_be_loaded_is_named_with_its_error(tmp_path):
    """Before: a Python traceback through absl and importlib (a syntax error, an import or a raise in the file),
    'unknown config key' for a file without get_config, and two tracebacks for a directory."""
    files = {"syntax.py": "def get_config(:\n    return 1\n", "raises.py": "def get_config(arg=''):\n    raise "
             "RuntimeError('no such sweep')\n", "imports.py": "import no_such_module_xyz\n", "empty.py": "x = 1\n",
             "none.py": "def get_config(arg=''):\n    return None\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    expected = {"syntax.py": ("failed to load: SyntaxError: invalid syntax", "line 1"),
                "raises.py": ("failed to load: RuntimeError: no such sweep",),
                "imports.py": ("failed to load: ModuleNotFoundError: No module named 'no_such_module_xyz'",),
                "empty.py": ("the config file defines no get_config(arg)",),
                "none.py": ("get_config in", "none.py' returned None; it must return the run's ml_collections"),}
    for name, texts in expected.items():
        _fails_with_one_line(_command(tmp_path / "run", config=str(tmp_path / name)), *texts)
    _fails_with_one_line(_command(tmp_path / "run", config=os.path.join(ROOT, "configs")), "is not a file")


def test_flag_and_override_mistakes_name_the_flag(tmp_path):
    """An unknown flag lists train.py's flags (it was called an unknown config key); an index past a list's end
    names the override (an IndexError traceback); an empty --workdir says so ('No such file or directory: ')."""
    _fails_with_one_line(_command(tmp_path / "run", "--worksdir=x"), "Unknown command line flag 'worksdir'",
                         "train.py takes --config, --workdir")
    _fails_with_one_line(_command(tmp_path / "run", "--config.distill[5].loss=cwd"),
                         "--config.distill[5].loss: list index out of range (count list items from 0)")
    _fails_with_one_line(_command("", "--config.total_steps=1"), "--workdir is empty")


def test_a_workdir_that_cannot_be_made_is_named(tmp_path):
    """Before: a PermissionError (or NotADirectoryError) traceback from os.makedirs."""
    (tmp_path / "a_file").write_text("")
    _fails_with_one_line(_command(tmp_path / "a_file" / "run"), "cannot create --workdir", "a_file/run")


def test_a_config_argument_key_given_twice_is_refused(tmp_path):
    """Before: the last value won (`detector=fcos,detector=dino` trained DINO) without a word."""
    detection = os.path.join(ROOT, "configs", "detection_smoke.py")
    _fails_with_one_line(_command(tmp_path / "run", config=f"{detection}:detector=fcos,detector=dino"),
                         "detector is given twice after ':' ('detector=fcos' and 'detector=dino')")


def test_a_message_that_starts_with_a_quote_keeps_it(tmp_path):
    """The parse errors' quote stripping cut "'x.pth' ... starts with b''" to "x.pth' ... starts with b'"."""
    (tmp_path / "empty.pth").write_bytes(b"")
    last = _fails_with_one_line(_command(tmp_path / "run", f"--config.data.data_dir={tmp_path / 'data'}",
                                         f"--config.teacher.checkpoint={tmp_path / 'empty.pth'}",
                                         "--config.teacher.random_init=False"), "is not a PyTorch checkpoint")
    assert last.startswith(f"train.py: error: '{tmp_path / 'empty.pth'}'") and last.endswith("b''"), last


def test_out_of_memory_is_one_line_naming_what_to_change():
    """XLA's RESOURCE_EXHAUSTED (here a real one: a 1 TiB array on the CPU) as the one line train.py prints."""
    import importlib.util

    import jax.numpy as jnp
    import pytest

    spec = importlib.util.spec_from_file_location("train_entry", os.path.join(ROOT, "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    with pytest.raises(Exception, match="RESOURCE_EXHAUSTED") as caught:
        jnp.ones((1 << 38,), jnp.float32).block_until_ready()
    message = train.out_of_memory(caught.value)
    assert message.startswith("out of memory on the device (RESOURCE_EXHAUSTED: Out of memory allocating "
                              "1099511627776 bytes.)"), message
    assert "--config.batch_size" in message and "--config.dtype=bfloat16" in message
    assert train.out_of_memory(ValueError("a shape")) is None


def test_missing_teacher_checkpoint(tmp_path):
    _fails_with_one_line(_command(tmp_path / "run", f"--config.data.data_dir={tmp_path / 'data'}",
                                  f"--config.teacher.checkpoint={tmp_path / 'teacher.pth'}"),
                         "teacher checkpoint", "teacher.pth", "not found", "--config.teacher.checkpoint")


def test_a_teacher_checkpoint_holding_nan_is_named_before_training(tmp_path):
    """A teacher saved from a run that diverged trained into a non-finite loss at step 1 that named no cause."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cankd_jax import models
    from cankd_jax.train import build
    from cankd_jax.train.export import export_student

    sys.path.insert(0, os.path.dirname(SMOKE))
    try:
        config = __import__("smoke").get_config()
    finally:
        sys.path.pop(0)
    teacher = models.make_network(build.network_config(config.teacher), num_classes=config.task.num_classes)
    shapes = jax.eval_shape(lambda: teacher.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    rng = np.random.default_rng(0)  # any values: the run stops before it computes with them
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
    variables["params"]["backbone"]["layer3.1"]["conv2"]["kernel"][0, 0, 0, :2] = np.nan
    export_student(teacher, jax.tree.map(jnp.asarray, variables), str(tmp_path / "diverged"), pytorch=False)
    _fails_with_one_line(_command(tmp_path / "run", f"--config.data.data_dir={tmp_path / 'data'}",
                                  f"--config.teacher.checkpoint={tmp_path / 'diverged'}",
                                  "--config.teacher.random_init=False"),
                         "the teacher's weights hold NaN or infinite values in 1 of ",
                         "['params']['backbone']['layer3.1']['conv2']['kernel']: 2 of 36864",
                         "the weights teacher.checkpoint names are damaged or were saved from a run that diverged")
    assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(tmp_path / "run" / "checkpoints")


def test_batch_not_divisible_by_the_devices(tmp_path):
    _fails_with_one_line(_command(tmp_path / "run", "--config.batch_size=6"),
                         "batch_size=6", "4 devices", "--config.batch_size=4")


def test_an_eval_batch_the_devices_cannot_split_is_refused_before_training(tmp_path):
    """It was found at the first evaluation: after training, for a student whose teacher is not evaluated first."""
    _fails_with_one_line(_command(tmp_path / "run", f"--config.data.data_dir={tmp_path / 'data'}",
                                  "--config.data.eval_batch_size=6",
                                  config=os.path.join(ROOT, "configs", "detection_smoke.py")),  # a trunk teacher
                         "eval_batch_size=6 is not divisible by the 4 devices",
                         "--config.data.eval_batch_size to a multiple of 4")
    assert not (tmp_path / "run" / "checkpoints").exists()


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


def test_a_config_without_its_sections_is_named(tmp_path):
    """An AttributeError traceback from inside ml_collections, for a config file with the loop's keys only."""
    smoke = open(SMOKE).read()
    partial = tmp_path / "partial.py"
    partial.write_text(smoke + "\n\n_full = get_config\n\n\ndef get_config(arg=''):\n    c = _full(arg)\n"
                       "    del c['optimizer'], c['data']\n    return c\n")
    _fails_with_one_line(_command(tmp_path / "run", config=str(partial)),
                         "the config defines no optimizer, data sections")
