"""Shared test helpers: NHWC <-> NCHW conversion and float32 comparisons."""

from __future__ import annotations

import os
import sys

# Four host CPU devices for the sharding tests; set before jax is first imported.
# Single-device code is unaffected (it runs on device 0).
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
# The tests' programs run a few times each, so compiling is most of the suite's time, and most of compiling is
# LLVM optimising the generated code: without it, the smoke teacher's init compiles in 5 s instead of 40 (2-core
# CPU). XLA's own HLO passes (fusion, layouts, the order of every reduction) still run; the machine code is
# slower, and its results may differ from an optimised build's in the last bit (LLVM may contract a multiply
# and an add), which every tolerance here allows: the exact-equality tests compare runs built alike. Set the
# flag yourself to test at another level. train.py's end-to-end runs inherit it too (`train_cli.env`; measured on
# the 2-core machine: a 1-device smoke run in 29 s instead of 33, DINO's in 62 instead of 73), except the runs that
# ask for users' flags (`optimized=True`).
FAST_COMPILE = "--xla_backend_optimization_level=0"
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + FAST_COMPILE
    os.environ["CANKD_JAX_TESTS_ADDED_FLAGS"] = FAST_COMPILE

# A compilation cache for this test session: the end-to-end tests build the same steps in several runs
# and subprocesses (which inherit the variables), and on 2 CPU cores compiling is most of their time. (A detector's
# programs on several devices are not found again in another process: results/persistent_cache/README.md.)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cankd_jax_test_xla_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

# Ctrl-C as at a terminal, however pytest was started. A non-interactive shell starts its background jobs
# (`pytest &` in a script) with SIGINT ignored, every process inherits that, and the trainer keeps an ignored SIGINT
# ignored (a launcher's choice, tests/test_train_utils.py): the tests that send SIGINT, in this process or in the
# train.py runs and jobs it starts (exec resets a handled signal to its default), would then see nothing arrive.
# This overrides, for the tests only, the launcher's choice that the trainer respects.
import signal  # noqa: E402

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # tests import torch_reference as a module


def nchw(x: np.ndarray):
    """NHWC numpy -> NCHW torch tensor (float32, a copy)."""
    import torch

    return torch.from_numpy(np.array(np.transpose(np.asarray(x, np.float32), (0, 3, 1, 2))))


def nhwc(t) -> np.ndarray:
    """NCHW torch tensor -> NHWC numpy."""
    return np.transpose(t.detach().cpu().numpy(), (0, 2, 3, 1))


def assert_close(actual, expected, *, rtol: float = 1e-4, scale: float | None = None, what: str = "") -> None:
    """float32-rounding agreement: elementwise rtol, plus an atol of rtol x `scale`.

    `scale` defaults to the largest |expected|; pass a larger one for a tensor
    that is zero up to rounding (e.g. the gradient of a bias that a train-mode
    BatchNorm cancels), which is then compared to the scale of its neighbours.
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if scale is None:
        scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    scale = max(scale, 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# The longest files first. Both tiers hand whole files to the two xdist workers (`--dist loadfile`); in xdist's own
# order (files with the most tests first) the few-test, minute-long end-to-end files started last and one worker ran
# them alone at the end. Longest-first evens the two out. Seconds per file, both tiers together, measured on the
# 2-core machine (2026-12-08); a file not listed keeps its place after these, and stale figures only reorder.
_FILE_SECONDS = {
    "test_train_detection_e2e.py": 298, "test_train_e2e.py": 224, "test_detection_task.py": 151,
    "test_recorder.py": 94, "test_rehearse.py": 85, "test_mmdet_dino.py": 78, "test_roi_align.py": 62,
    "test_configs.py": 49, "test_bf16_resume.py": 45, "test_train_cli.py": 43, "test_viz.py": 40,
    "test_deform_conv.py": 49, "test_config_values.py": 50, "test_swin.py": 32, "test_dilated_conv.py": 33,
    "test_bf16.py": 34, "test_mmdet_faster_rcnn.py": 35, "test_deform_attn.py": 36, "test_losses.py": 30,
    "test_mmdet_parity.py": 30, "test_losses_parity.py": 29, "test_mmseg_parity.py": 26, "test_train_step.py": 26,
    "test_mmdet_reppoints.py": 29,
}


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: -_FILE_SECONDS.get(os.path.basename(str(item.fspath)), 0))  # stable: files stay whole
