"""The benchmark's PyTorch step builds the networks a config names and runs; the peak table finds devices."""

from __future__ import annotations

import os
import sys

import pytest

from cankd_jax.config_arg import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import train_speed  # noqa: E402


def test_the_pytorch_step_of_the_smoke_config_runs():
    pytest.importorskip("torch")
    config = load_config(os.path.join(ROOT, "configs", "smoke.py"))
    out = train_speed.time_torch(config, (32, 32), 2, steps=1, threads=1)
    assert out["sec"] > 0 and len(out["times"]) == 1


@pytest.mark.parametrize("kind,peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                       ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-40GB", 312.0),
                                       ("TPU v5 lite", 197.0), ("TPU v5p", 459.0), ("TPU v4", 275.0),
                                       ("TPU v6 lite", 918.0), ("cpu", None)])
def test_bf16_peaks_by_device_kind(kind, peak):
    assert train_speed.peak_bf16(kind)[0] == peak
