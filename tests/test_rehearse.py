"""The pod rehearsal (`cankd_jax.rehearse`): memory and collectives of the compiled step, and the errors it raises.

In-process on this session's 4 fake CPU devices (conftest); the 64-device run through the command line is in the
slow tier.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from cankd_jax import rehearse
from cankd_jax.config_arg import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.py")
N = 4


def smoke(**changes):
    config = load_config(SMOKE)
    for key, value in changes.items():
        config[key] = value
    return config


def param_sizes(row_config, layout_fsdp=False):
    """(path, elements, shape) of the smoke student's and terms' parameters, from an independent build."""
    from cankd_jax.train import build
    from cankd_jax.train.aot import shapes_only
    from cankd_jax.train.sharding import make_mesh

    run = build.build_run(shapes_only(row_config), make_mesh(), input_size=(32, 32), abstract_teacher=True)
    params = jax.eval_shape(lambda: run.init_variables(jax.random.key(0))[0])
    return [("/".join(str(getattr(k, "key", k)) for k in p), math.prod(x.shape), x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]


def test_student_alone_reduces_each_gradient_once_at_the_parameters_size():
    config = smoke(distill=[])
    [row] = rehearse.analyse(config, per_device_batch=1, max_boxes=0, all_shapes=True)
    params = param_sizes(config)
    total = sum(n * 4 for _, n, _ in params)
    assert row["devices"] == N and row["global_batch"] == N and row["problems"] == []
    assert row["param_bytes_total"] == total
    assert row["params"] == total  # replicated: every device holds all of them
    grads = row["traffic"]["gradient all-reduce"]
    assert grads["payload"] == total, (grads, total)
    assert grads["sent"] == pytest.approx(2 * total * (N - 1) / N)  # a ring all-reduce
    assert row["traffic"]["unmatched parameters"] == [] and row["traffic"]["reduced more than once"] == []
    assert row["traffic"]["parameter all-gather"]["payload"] == 0
    assert row["traffic"]["statistics all-reduce"]["payload"] > 0  # BatchNorm's batch statistics
    assert row["flops"] > 0 and row["peak"] > row["arguments"]


def test_cankd_projections_are_the_only_gradients_reduced_as_a_product():
    config = smoke()
    [row] = rehearse.analyse(config, per_device_batch=1, max_boxes=0, all_shapes=True)
    params = {path: n for path, n, _ in param_sizes(config)}
    unmatched = row["traffic"]["unmatched parameters"]
    assert unmatched and all(p.startswith("distill/layer4/loss/non_local_att/") for p in unmatched), unmatched
    # every parameter is either reduced at its own size or not at all
    assert row["traffic"]["gradient all-reduce"]["payload"] + 4 * sum(params[p] for p in unmatched) \
        == 4 * sum(params.values())


@pytest.mark.slow  # heavy: the slow tier keeps the quick one near 5 minutes
def test_fsdp_spreads_what_divides_and_names_what_does_not():
    config = smoke()
    config.mesh.fsdp, config.mesh.fsdp_min_size = True, 256
    [row] = rehearse.analyse(config, per_device_batch=1, max_boxes=0, all_shapes=True)
    params = param_sizes(config)
    spread = [(n, s) for _, n, s in params if n >= 256 and any(d % N == 0 for d in s)]
    whole = sum(n for _, n, s in params if not (n >= 256 and any(d % N == 0 for d in s)))
    assert row["layout"] == "fsdp"
    assert row["params"] == 4 * (whole + sum(n // N for n, _ in spread))
    t = row["traffic"]
    assert t["gradient reduce-scatter"]["payload"] > 0 and t["parameter all-gather"]["payload"] > 0
    assert t["gradient reduce-scatter"]["sent"] == pytest.approx(t["gradient reduce-scatter"]["payload"] * (N - 1) / N)
    # the whole-array warning lists exactly the large arrays no axis of which 4 divides (state and teacher)
    expect = sorted(tuple(s) for _, n, s in params if n >= 256 and not any(d % N == 0 for d in s))
    got = sorted(tuple(s) for p, s, _ in row["whole"] if p.startswith("state.params['student']")
                 or p.startswith("state.params['distill']"))
    assert got == expect


def test_a_batch_the_devices_do_not_divide_is_a_row_error_naming_the_fix():
    config = smoke(batch_size=6)
    [row] = rehearse.analyse(config, per_device_batch=None, max_boxes=0, all_shapes=True)
    assert "error" in row and "not divisible by the 4 devices" in row["error"] and "batch_size=4" in row["error"]


class _Step:
    def __init__(self, state):
        self.state = state


def test_a_state_that_changes_type_in_the_step_is_a_recompile_error():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    rep = NamedSharding(mesh, P())
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
             "w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=rep)}
    good = jax.jit(lambda s: (dict(step=s["step"] + 1, w=s["w"] * 2), s["w"].sum()), out_shardings=(rep, rep))
    bad = jax.jit(lambda s: (dict(step=s["step"] + 0.5, w=s["w"] * 2), s["w"].sum()), out_shardings=(rep, rep))
    moved = jax.jit(lambda s: (dict(step=s["step"] + 1, w=s["w"] * 2), s["w"].sum()),
                    out_shardings=({"step": rep, "w": NamedSharding(mesh, P("data"))}, rep))
    for fn, expect in ((good, None), (bad, "['step'] enters the step as int32[] and leaves it as float32[]"),
                       (moved, "['w'] enters the step sharded")):
        lowered = fn.lower(state)
        problems = rehearse.recompile_problems(_Step(state), lowered, lowered.compile())
        if expect is None:
            assert problems == []
        else:
            assert len(problems) == 1 and expect in problems[0] and "compile again" in problems[0], problems


def test_a_host_callback_in_the_program_is_found():
    def f(x):
        jax.debug.print("x {}", x.sum())
        return x * 2

    assert rehearse.host_callbacks(jax.jit(f).lower(jnp.ones(3)).compile().as_text())
    assert rehearse.host_callbacks(jax.jit(lambda x: x * 2).lower(jnp.ones(3)).compile().as_text()) == []


def test_collectives_counts_every_kind_with_its_group_and_payload():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    spread, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

    def f(x, w):  # w spread: gathered for the matmul; the contraction over the spread batch: an all-reduce
        return jnp.einsum("bi,ij->j", x, w)

    fn = jax.jit(f, in_shardings=(spread, spread), out_shardings=rep)
    text = fn.lower(jax.ShapeDtypeStruct((8, 16), jnp.float32), jax.ShapeDtypeStruct((16, 32), jnp.bfloat16)) \
        .compile().as_text()
    colls = rehearse.collectives(text, N)
    kinds = {c["kind"] for c in colls}
    assert kinds <= {"all-reduce", "all-gather"} and "all-reduce" in kinds, colls
    assert all(c["group"] == N and c["count"] == 1 for c in colls)
    reduced = [a for c in colls if c["kind"] == "all-reduce" for a in c["arrays"]]
    assert any(n == 32 for _, n, _ in reduced)  # the (32,) partial sums


@pytest.mark.parametrize("text, size", [
    ("replica_groups=mesh['axis_0'=8,'axis_1'=2] {'axis_0'}, use_global_device_ids=true", 8),
    ("replica_groups=mesh['axis_0'=8,'axis_1'=2] {'axis_0','axis_1'}, use", 16),
    ("replica_groups=[2,4]<=[8], use_global_device_ids=true", 4),
    ("replica_groups={{0,1,2},{3,4,5}}, to_apply=%add", 3),
    ("replica_groups={}, to_apply=%add", 64),
])
def test_group_sizes_in_xlas_spellings(text, size):
    assert rehearse._group_size(text, 64) == size


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "cankd_jax.rehearse", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def test_cli_config_mistakes_are_one_line_errors():
    p = _cli("--config", SMOKE, "--config.no_such_key=1", "--devices", "2")
    assert p.returncode != 0 and p.stderr.strip().startswith("rehearse: error:") and "no_such_key" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    p = _cli("--config", "configs/nope.py", "--devices", "2")
    assert p.returncode != 0 and "config file 'configs/nope.py' not found" in p.stderr
    p = _cli("--config", SMOKE, "--devise", "2")
    assert p.returncode != 0 and "unknown option(s) --devise" in p.stderr


@pytest.mark.parametrize("options, message", [
    (["--tflops", "0"], "--tflops must be positive, got 0.0"),  # was a ZeroDivisionError after compiling
    (["--bandwidth", "-5"], "--bandwidth must be positive, got -5.0"),
    (["--per-device-batch", "0"], "--per-device-batch must be positive, got [0]"),
    (["--latency-us", "-1"], "--latency-us must be >= 0, got -1.0"),
])
def test_time_model_options_out_of_range_are_refused_before_compiling(capsys, options, message):
    with pytest.raises(SystemExit):
        rehearse._parse(["--config", SMOKE, *options])
    assert message in capsys.readouterr().err


def test_a_workers_error_is_its_exception_line_not_jaxs_note_after_it():
    stderr = """Traceback (most recent call last):
  File "cankd_jax/train/build.py", line 130, in init_variables
ValueError: distill student_feature 'bogus' is not among the student's outputs (layer4, logits)
--------------------
For simplicity, JAX has removed its internal frames from the traceback of the following exception. Set \
JAX_TRACEBACK_FILTERING=off to include these.
"""
    assert rehearse._worker_error(stderr).startswith("ValueError: distill student_feature 'bogus' is not among")
    assert rehearse._worker_error("out of memory\n") == "out of memory"
    assert rehearse._worker_error("") == "killed"


@pytest.mark.slow
def test_cli_64_devices_replicated_reduces_the_parameters_and_fsdp_memory_falls(tmp_path):
    """The smoke config at 8 and 64 fake devices through the command line. Widths are raised (student 64,
    teacher 128) so that FSDP can spread the arrays at 64 devices; at the smoke's own widths most axes are
    smaller than 64 and stay whole, which the rehearsal reports."""
    out = tmp_path / "rows.json"
    wide = ("--config.student.backbone_kwargs.base_width=64", "--config.student.backbone_kwargs.stem_width=64",
            "--config.student.head_channels=64", "--config.teacher.backbone_kwargs.base_width=128",
            "--config.teacher.backbone_kwargs.stem_width=128", "--config.teacher.head_channels=128",
            "--config.distill[0].connector=1024", "--config.distill[0].options.in_channels=1024")
    p = _cli("--config", SMOKE, *wide, "--devices", "8", "64", "--layouts", "replicated", "fsdp",
             "--per-device-batch", "1", "--json", str(out), "--markdown", str(tmp_path / "report.md"), timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = {(r["devices"], r["layout"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {(8, "replicated"), (64, "replicated"), (8, "fsdp"), (64, "fsdp")}
    for n in (8, 64):
        r = rows[n, "replicated"]
        assert r["global_batch"] == n and r["params"] == r["param_bytes_total"]
        # each gradient once at its own size, but for the CanKD projections XLA reduces as a product
        t = r["traffic"]
        assert all(u.startswith("distill/layer4/loss/non_local_att/") for u in t["unmatched parameters"])
        assert t["reduced more than once"] == []
        unmatched = r["param_bytes_total"] - t["gradient all-reduce"]["payload"]
        assert 0 <= unmatched < 0.25 * r["param_bytes_total"]
        assert t["gradient all-reduce"]["sent"] == pytest.approx(2 * t["gradient all-reduce"]["payload"] * (n - 1) / n)
    fsdp8, fsdp64 = rows[8, "fsdp"], rows[64, "fsdp"]
    assert fsdp64["params"] < fsdp8["params"] < rows[8, "replicated"]["params"] / 4
    assert fsdp64["optimizer"] < fsdp8["optimizer"] and fsdp64["teacher"] < fsdp8["teacher"]
    assert "| 64 | fsdp |" in (tmp_path / "report.md").read_text()
