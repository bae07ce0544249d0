"""The benchmark's PyTorch step builds the networks a config names and runs; the peak table finds devices."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cankd_jax.config_arg import load_config
from cankd_jax.timing import peak_bf16

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
    assert peak_bf16(kind)[0] == peak


BLOCKED = ("grain", "tensorflow_datasets", "tensorflow", "tensorboardX", "tensorboard", "PIL", "cv2")


def test_the_report_path_needs_no_data_or_logging_library():
    """`--report` runs where only JAX, Flax, Optax, chex, Orbax, NumPy and ml_collections are installed: its worker
    builds the step of a config for a given input size with the data and logging libraries made unimportable."""
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, {os.path.join(ROOT, "benchmarks")!r})
import jax
import train_speed
from cankd_jax.train import build
from cankd_jax.train.sharding import make_mesh
from cankd_jax.train.state import plan_state
from cankd_jax.train.step import make_train_step
for case in ("demo", "dlv3"):
    train_speed.case_config(case, "loss", "cankd")
from cankd_jax.config_arg import load_config
from cankd_jax.timing import peak_bf16
config = load_config({os.path.join(ROOT, "configs", "smoke.py")!r})
run = build.build_run(config, make_mesh(jax.devices()[:1]), input_size=(32, 32), abstract_teacher=True)
assert run.data is None
plan_state(run.init_variables, run.tx, 0, make_mesh(jax.devices()[:1]))
print(sorted({{m.split(".")[0] for m in sys.modules}} & set({BLOCKED!r})))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_report_figures_from_a_measurement(monkeypatch, tmp_path, capsys):
    """What `--report` derives from a worker's measurement: images/s, TFLOP/s per device, the fraction of the
    device's bf16 peak; a row per (case, dtype), the JSON rewritten after each."""
    measured = {"sec": 0.5, "times": [0.5], "compile_s": 30.0, "flops": 2.0e14, "peak_bytes": 3e10,
                "device_peak_bytes": 3.2e10, "devices": 2, "device_kind": "NVIDIA H100 80GB HBM3", "backend": "gpu"}
    calls = []
    monkeypatch.setattr(train_speed, "spawn", lambda kind, case, variant, a, timeout=None: calls.append(
        (case, a.dtype, a.batch)) or dict(measured))
    args = train_speed.parser().parse_args(["--report", "--cases", "dlv3", "--height", "64", "--width", "128",
                                            "--batch", "4", "--steps", "2", "--json", str(tmp_path / "r.json")])
    rows = train_speed.report_rows(args)
    assert calls == [("dlv3", "bfloat16", 4), ("dlv3", "float32", 4)]
    r = rows[0]
    assert r["images_per_s"] == 8.0 and r["images_per_device"] == 2
    assert r["tflops_per_device"] == pytest.approx(400.0)
    assert r["fraction_of_bf16_peak"] == pytest.approx(400.0 / 989.0)
    import json

    assert [x["dtype"] for x in json.load(open(tmp_path / "r.json"))["rows"]] == ["bfloat16", "float32"]
    assert "40.4% of 989" in capsys.readouterr().out
