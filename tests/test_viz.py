"""`python -m cankd_jax.viz`: the attention it draws is the loss's own matrix, and it writes the picture.

The workdir is smoke-sized and made without training (random teacher and student exports, an initial CanKD
state saved as the cankd phase's checkpoint, the smoke config standing in for the demo's): the picture's
machinery does not depend on training."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from PIL import Image

from cankd_jax import models, viz
from cankd_jax.config_arg import load_config
from cankd_jax.train import build
from cankd_jax.train.checkpoint import Checkpointer
from cankd_jax.train.export import export_student
from cankd_jax.train.sharding import make_mesh
from cankd_jax.train.state import plan_state

SMOKE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "smoke.py")


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("viz_workdir")
    cfg = load_config(SMOKE)
    cfg.data.data_dir = str(root / "data")
    sample = np.zeros((1, 32, 32, 3), np.float32)
    for i, (phase, block) in enumerate((("teacher", cfg.teacher), ("student", cfg.student))):
        net = models.make_network(block, num_classes=cfg.task.num_classes)
        init = jax.jit(lambda key, net=net: net.init(key, sample, train=False))  # one program, not op by op
        export_student(net, init(jax.random.key(i + 1)), str(root / phase / "export"), pytorch=False)
    cfg.teacher.checkpoint, cfg.teacher.random_init = str(root / "teacher" / "export"), False
    mesh = make_mesh()
    run = build.build_run(cfg, mesh)
    state = plan_state(run.init_variables, run.tx, 3, mesh).init()
    ckpt = Checkpointer(str(root / "cankd" / "checkpoints"))
    ckpt.save(1, state, {"train": {}})
    ckpt.close()
    return root


@pytest.mark.slow  # heavy in-process check: the slow tier keeps the quick one under 5 minutes
def test_the_drawn_attention_row_is_the_row_of_the_loss_s_literal_matrix(smoke_workdir):
    d = viz.collect(*(str(smoke_workdir / k) for k in ("teacher", "student", "cankd")), indices=(0, 1),
                    config_path=SMOKE, data_dir=str(smoke_workdir / "data"))
    quadratic = d["loss"].clone(impl="quadratic")
    _, inter = quadratic.apply(d["loss_variables"], d["student_map"], d["teacher_map"], train=False,
                               mutable=["intermediates"])
    matrix = np.asarray(inter["intermediates"]["non_local_att"]["attention"][0])  # (B, P, N)
    b, h, w, _ = d["student_map"].shape
    assert matrix.shape == (b, h * w, (h // 2) * (w // 2))
    size = d["raw"].shape[1:3]
    for img in range(b):
        assert len(d["pixels"][img]) == 3
        for i, (y, x) in enumerate(d["pixels"][img]):
            row = d["rows"][img, i]
            np.testing.assert_allclose(row.ravel(), matrix[img, y * w + x], rtol=1e-5,
                                       atol=1e-6 * np.abs(matrix[img]).max())
            up = viz.upsample_nearest(row, size)  # what is drawn: each pooled position as its block of pixels
            sy, sx = size[0] // row.shape[0], size[1] // row.shape[1]
            np.testing.assert_array_equal(up[::sy, ::sx], row)
    assert float(np.abs(d["rows"]).max()) > 0


@pytest.mark.slow  # shares the module fixture above (a trained-looking workdir, 18 s to build)
def test_the_command_writes_a_png_of_the_expected_size(smoke_workdir, tmp_path):
    out = tmp_path / "attention.png"
    # The layout train.py gives a config with phases: WORKDIR/{teacher,student,cankd}, the config named here.
    viz.main(["--workdir", str(smoke_workdir), "--config", SMOKE, "--data-dir", str(smoke_workdir / "data"),
              "--out", str(out), "--indices", "0,1", "--dpi", "40"])
    with Image.open(out) as im:
        # 11 panels of 1.6 in across; a 0.5 in title band and two rows of 1.8 in down; at 40 dpi.
        assert im.size == (704, 164)



@pytest.mark.parametrize("config_arg, losses", [("", ["cankd"]), (":loss=mgd+cankd", ["mgd", "cankd"])])
def test_the_cankd_phase_is_read_from_the_config_as_the_user_named_it(tmp_path, config_arg, losses):
    """No argument the config does not take is added (the smoke config refuses any); the demo's own default
    loss list already holds cankd, and a named list is kept."""
    demo = os.path.join(os.path.dirname(SMOKE), "demo.py")
    for path in (SMOKE, demo + config_arg):
        cfg = viz._config(str(tmp_path / "cankd"), str(tmp_path), path)
        assert [d["loss"] for d in cfg.distill] == ["cankd"]
    assert load_config(demo, config_arg[1:]).phases == ["teacher", "student", *losses]


def test_a_config_without_a_cankd_phase_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"demo.py:loss=mgd has no 'cankd' phase \(its phases: teacher, student, mgd\)"):
        viz._config(str(tmp_path / "cankd"), str(tmp_path), os.path.join(os.path.dirname(SMOKE), "demo.py:loss=mgd"))
    for k in ("teacher", "student", "cankd"):
        os.makedirs(tmp_path / k)
    with pytest.raises(SystemExit, match=r"^viz: error: .*demo.py:loss=mgd has no 'cankd' phase"):
        viz.main(["--workdir", str(tmp_path), "--config", os.path.join(os.path.dirname(SMOKE), "demo.py:loss=mgd")])


@pytest.mark.parametrize("options, message", [
    (["--dpi", "0"], "--dpi must be positive, got 0"),
    (["--indices", "a"], "--indices: expected one or more comma-separated integers, got 'a'"),
    (["--pixels", "1,2,3"], "--pixels: expected 2 comma-separated integers, got '1,2,3'"),
])
def test_a_malformed_option_is_named_before_any_work(tmp_path, capsys, options, message):
    for k in ("teacher", "student", "cankd"):
        os.makedirs(tmp_path / k, exist_ok=True)
    with pytest.raises(SystemExit):
        viz.main(["--workdir", str(tmp_path), *options])
    assert message in capsys.readouterr().err


@pytest.mark.slow  # builds the smoke run twice (shares the module fixture above)
def test_images_and_pixels_outside_the_data_or_the_grid_are_named(smoke_workdir):
    dirs = [str(smoke_workdir / k) for k in ("teacher", "student", "cankd")]
    with pytest.raises(ValueError, match=r"indices \[16\]: name held-out images among 0..15"):
        viz.collect(*dirs, indices=(0, 16), config_path=SMOKE, data_dir=str(smoke_workdir / "data"))
    # layer4 of the 32x32 smoke input is 4x4: (4, 0) is off it (a gather would have clamped it to row 3)
    with pytest.raises(ValueError, match=r"pixels \[\(0, 0\), \(4, 0\), \(1, 1\)\]: name three \(y, x\) "
                                         r"positions on the 4x4 grid of 'layer4'"):
        viz.collect(*dirs, indices=(0,), pixels=[(0, 0), (4, 0), (1, 1)], config_path=SMOKE,
                    data_dir=str(smoke_workdir / "data"))
