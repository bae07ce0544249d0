"""Features by module path (`cankd_jax.models.recorder`) and foreign Flax models (`cankd_jax.models.foreign`).

The recorded features are held against Flax's own `capture_intermediates`, and the step with module-path terms
against the step with the same features named by the networks' output dicts.
"""

from __future__ import annotations

import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_cli as cli

from cankd_jax import models
from cankd_jax.config_arg import load_config
from cankd_jax.models.recorder import Recorded, module_paths, with_recorded
from cankd_jax.train import build
from cankd_jax.train.aot import compile_for_analysis
from cankd_jax.train.sharding import global_batch, make_mesh
from cankd_jax.train.state import plan_state
from cankd_jax.train.step import jit_step, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
RNGS = {"dropout": jax.random.key(1)}


def fcn(**kw):
    return models.make_model("fcn", backbone="resnet18_v1c_d8", backbone_kwargs=dict(base_width=8, stem_width=8),
                             channels=16, num_classes=7, **kw)


@pytest.fixture(scope="module")
def net():
    m = fcn()
    return m, m.init(jax.random.key(0), X, train=False)


def test_recorded_outputs_and_inputs_are_flaxs_own_intermediates(net):
    m, v = net
    r = Recorded(m, ["backbone/layer4.1", "decode_head:input", "decode_*/convs.0/conv", "backbone/layer2.0:input"])
    out = r.apply(v, X, train=False)
    _, inter = m.apply(v, X, train=False, capture_intermediates=True, mutable=["intermediates"])
    inter = inter["intermediates"]
    np.testing.assert_array_equal(out["backbone/layer4.1"], inter["backbone"]["layer4.1"]["__call__"][0])
    np.testing.assert_array_equal(out["decode_*/convs.0/conv"],
                                  inter["decode_head"]["convs.0"]["conv"]["__call__"][0])
    np.testing.assert_array_equal(out["decode_head:input"], out["layer4"])  # the head reads layer4
    np.testing.assert_array_equal(out["backbone/layer2.0:input"], inter["backbone"]["layer1.1"]["__call__"][0])
    assert set(out) >= {"logits", "layer4"}  # the model's own outputs stay


def _grad_of(recorded, v, name):
    """Gradient w.r.t. the parameters of mean(feature ** 2), the feature `name` of a training-mode forward pass."""
    def loss(p):
        o, _ = recorded.apply({"params": p, "batch_stats": v["batch_stats"]}, X, train=True, mutable=["batch_stats"],
                              rngs=RNGS)
        return jnp.mean(o[name] ** 2)

    return jax.jit(jax.grad(loss))(v["params"])


def test_gradients_flow_through_a_recorded_feature_as_through_the_output(net):
    m, v = net
    r = Recorded(m, ["backbone/layer4.1"])
    g_path, g_dict = _grad_of(r, v, "backbone/layer4.1"), _grad_of(r, v, "layer4")
    chex.assert_trees_all_equal(g_path, g_dict)
    assert float(jnp.abs(g_path["backbone"]["layer1.0"]["conv1"]["kernel"]).sum()) > 0


@pytest.mark.slow  # heavy: the slow tier keeps the quick one near 5 minutes
def test_recording_inside_rematerialised_blocks():
    m = fcn(remat="nothing_saveable")
    v = m.init(jax.random.key(0), X, train=False)
    g = _grad_of(Recorded(m, ["backbone/layer4.1/conv2"]), v, "backbone/layer4.1/conv2")
    assert float(jnp.abs(g["backbone"]["layer4.1"]["conv2"]["kernel"]).sum()) > 0
    assert float(jnp.abs(g["backbone"]["layer4.1"]["conv1"]["kernel"]).sum()) > 0


class _Shared(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        dense = nn.Dense(3, name="shared")
        return {"out": dense(dense(x))}


def test_a_module_called_twice_is_named_by_call():
    m = _Shared()
    x = jnp.ones((2, 3))
    v = m.init(jax.random.key(0), x)
    out = Recorded(m, ["shared#0", "shared#1:input", "shared#1"]).apply(v, x)
    first = nn.Dense(3).apply({"params": v["params"]["shared"]}, x)
    np.testing.assert_allclose(out["shared#0"], first, rtol=1e-6)
    np.testing.assert_array_equal(out["shared#1:input"], out["shared#0"])
    np.testing.assert_array_equal(out["shared#1"], out["out"])
    with pytest.raises(ValueError, match=r"called 2 times in one forward pass; name a call, e.g. 'shared#0'"):
        Recorded(m, ["shared"]).apply(v, x)


@pytest.mark.parametrize("name, message", [
    ("backbone/layer5", r"no module 'backbone/layer5'; nearest: backbone/layer4.1, backbone/layer4.0"),
    ("*/conv1", r"matches 8 modules \(backbone/layer1.0/conv1, "),
    ("backbone/layer4.1#3", r"called 1 time\(s\); '#3' is out of range"),
    ("backbone", r"module 'backbone' returns a dict, not an array"),
])
def test_bad_paths_are_one_line_errors(net, name, message):
    m, v = net
    with pytest.raises(ValueError, match=message) as e:
        Recorded(m, [name]).apply(v, X, train=False)
    assert "\n" not in str(e.value)


def test_one_path_given_as_a_string_is_refused_not_read_letter_by_letter():
    r18 = models.make_model("resnet18")
    with pytest.raises(TypeError, match=r"features must be a list of paths, .* \(one feature: \['layer4.1:output'\]\)"):
        Recorded(r18, "layer4.1:output")
    with pytest.raises(TypeError, match=r"names must be a list of feature names, got the string 'backbone/layer4.1'"):
        with_recorded(r18, "backbone/layer4.1")


def test_module_paths_lists_what_runs(net):
    m, v = net
    paths = module_paths(m, v, X, train=False)
    assert paths[0] == "" and "backbone/layer4.1" in paths and "auxiliary_head/conv_seg" in paths


# ---------------------------------------------------------------------------------------------- in the train step


def _smoke(student_feature="layer4", teacher_feature="layer4", dtype="float32"):
    c = load_config(os.path.join(ROOT, "configs", "smoke.py"))
    c.dtype = dtype
    c.distill[0].student_feature, c.distill[0].teacher_feature = student_feature, teacher_feature
    return c


def _steps(config, devices: int, steps: int = 2):
    mesh = make_mesh(jax.devices()[:devices])
    run = build.build_run(config, mesh, input_size=(32, 32))
    plan = plan_state(run.init_variables, run.tx, config.seed, mesh)
    step = jit_step(make_train_step(student=run.student, teacher=run.teacher, terms=run.terms, task=run.task,
                                    tx=run.tx, schedule=run.schedule),
                    mesh=mesh, state_shardings=plan.shardings, teacher_shardings=run.teacher_shardings)
    state, rng, history = plan.init(), np.random.default_rng(0), []
    for _ in range(steps):
        batch = {"image": rng.standard_normal((4, 32, 32, 3)).astype(np.float32),
                 "label": rng.integers(0, 7, (4, 32, 32)).astype(np.int32)}
        with jax.set_mesh(mesh):
            state, metrics = step(state, run.teacher_vars, global_batch(batch, mesh))
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


PATHS = dict(student_feature="backbone/layer4.1", teacher_feature="backbone/layer4.1")


@pytest.mark.slow  # heavy: the slow tier keeps the quick one near 5 minutes
def test_module_path_terms_give_the_dict_named_step_exactly():
    """On 4 devices (the batch split along `data`), in bfloat16, the recorded features give the dict-named step bit
    for bit (one case for both: each is two compiled steps); that 4 devices match 1 to float rounding is
    `test_train_step`'s business, and in float32 the gradients through a recorded feature are the output's
    (`test_gradients_flow_through_a_recorded_feature_as_through_the_output`)."""
    s_dict, h_dict = _steps(_smoke(dtype="bfloat16"), 4)
    s_path, h_path = _steps(_smoke(dtype="bfloat16", **PATHS), 4)
    assert h_dict[0]["distill/layer4"] > 0
    chex.assert_trees_all_equal(h_path, h_dict)
    chex.assert_trees_all_equal(s_path, s_dict)


def _compiled_memory(config):
    from cankd_jax.data import train_example_layouts
    from cankd_jax.train.aot import abstract_step

    example = train_example_layouts(config.data)[0]
    m = compile_for_analysis(abstract_step(config, make_mesh(jax.devices()[:1]), example, global_batch=4).lower()) \
        .memory_analysis()
    return m.temp_size_in_bytes, m.argument_size_in_bytes


@pytest.mark.slow  # heavy: the slow tier keeps the quick one near 5 minutes
def test_recording_keeps_no_more_memory_than_the_output_dict():
    """Same shapes, the same features: the compiled step's temporaries with recorders are those without (a
    recorder that kept every intermediate alive would show here)."""
    temp_dict, args_dict = _compiled_memory(_smoke())
    temp_path, args_path = _compiled_memory(_smoke(**PATHS))
    assert args_path == args_dict
    assert abs(temp_path - temp_dict) <= 0.01 * temp_dict, (temp_path, temp_dict)


def test_a_wrong_path_in_a_config_fails_when_the_run_is_built():
    with pytest.raises(ValueError, match=r"feature 'backbone/layer4\.9': the model has no module 'backbone/layer4\.9'; "
                                         r"nearest: backbone/layer4\.1"):
        build.build_run(_smoke(student_feature="backbone/layer4.9"), make_mesh(jax.devices()[:1]),
                        input_size=(32, 32))


# ---------------------------------------------------------------------------------------------- foreign models

transformers = pytest.importorskip("transformers", reason="pip install transformers==4.57.6 (the test extra)")
HF = dict(factory="cankd_jax.models.foreign:transformers_module",
          factory_kwargs=dict(model="FlaxResNetModel", config=dict(
              embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic")),
          train_arg="deterministic", train_inverted=True)


def test_a_call_argument_the_foreign_module_does_not_take_is_named():
    """Was a TypeError from inside the first trace."""
    with pytest.raises(ValueError, match=r"foreign module FlaxResNetModule's __call__ takes no argument\(s\) bogus "
                                         r"\(its arguments: pixel_values, deterministic"):
        models.make_network(dict(name="foreign", **{**HF, "train_arg": "bogus"}), num_classes=7)
    with pytest.raises(ValueError, match="takes no argument\\(s\\) scale "):
        models.make_network(dict(name="foreign", **HF, call_kwargs=dict(scale=2)), num_classes=7)


def test_a_transformers_model_gives_its_features_by_path():
    from transformers import FlaxResNetModel, ResNetConfig

    fb = models.make_network(dict(name="foreign", **HF, features={"c3": "encoder/stages/1", "c5": "encoder/stages/3"}),
                             num_classes=7)
    v = fb.init(jax.random.key(0), X, train=False)
    out = fb.apply(v, X, train=False)
    # held against the transformers model itself (its own NCHW entry point) and Flax's intermediates
    hf = FlaxResNetModel(ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                      layer_type="basic"), input_shape=(1, 32, 32, 3), _do_init=False)
    ref = hf(jnp.transpose(X, (0, 3, 1, 2)), params={"params": v["params"]["module"],
                                                     "batch_stats": v["batch_stats"]["module"]},
             output_hidden_states=True)
    np.testing.assert_allclose(out["c5"], jnp.transpose(ref.last_hidden_state, (0, 2, 3, 1)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["c3"], jnp.transpose(ref.hidden_states[2], (0, 2, 3, 1)), rtol=1e-6, atol=1e-6)
    assert out["c3"].shape == (2, 4, 4, 32)
    # `deterministic` is the inverse of train: training updates its BatchNorm statistics
    _, upd = fb.apply(v, X, train=True, mutable=["batch_stats"])
    assert not np.allclose(jax.tree.leaves(upd["batch_stats"])[0], jax.tree.leaves(v["batch_stats"])[0])


class _NCHWNet(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        assert x.shape[1] == 3, "wants NCHW"
        y = nn.Conv(4, (1, 1), name="proj")(jnp.transpose(x, (0, 2, 3, 1)))
        return y


def test_input_layout_and_train_flag_conventions():
    fb = models.foreign.ForeignBackbone(_NCHWNet(), {"proj": "proj"}, input_layout="NCHW")
    v = fb.init(jax.random.key(0), X, train=False)
    out = fb.apply(v, X, train=True)
    np.testing.assert_array_equal(out["proj"], out["output"])
    with pytest.raises(ValueError, match="input_layout 'NWHC'"):
        models.foreign.ForeignBackbone(_NCHWNet(), {}, input_layout="NWHC").init(jax.random.key(0), X, train=False)


def test_a_student_segmenter_on_a_foreign_backbone():
    cfg = dict(name="fcn", backbone="foreign", head_channels=16, aux_channels=8,
               backbone_kwargs=dict(**HF, features={"layer4": "encoder/stages/1", "layer3": "encoder/stages/0"}))
    seg = models.make_network(cfg, num_classes=7)
    v = seg.init(jax.random.key(0), X, train=False)
    out = seg.apply(v, X, train=False)
    assert out["logits"].shape == (2, 32, 32, 7) and out["aux_logits"].shape == (2, 32, 32, 7)
    assert set(v["params"]) == {"backbone", "decode_head", "auxiliary_head"}
    with pytest.raises(ValueError, match="needs head_channels and aux_channels"):
        models.make_network({**cfg, "head_channels": None}, num_classes=7)
    with pytest.raises(ValueError, match="cannot import 'no_such_pkg'"):
        models.make_network(dict(name="foreign", factory="no_such_pkg:f"), num_classes=7)


def test_a_foreign_teachers_checkpoint_round_trips(tmp_path):
    config = load_config(os.path.join(ROOT, "configs", "foreign_teacher.py"))
    fb = models.make_network(config.teacher, num_classes=7)
    v = fb.init(jax.random.key(3), X, train=False)
    own = {c: tree["module"] for c, tree in v.items()}  # the foreign model's own variables
    models.save_foreign_variables(str(tmp_path / "teacher"), own)
    config.teacher.checkpoint, config.teacher.random_init = str(tmp_path / "teacher"), False
    run = build.build_run(config, make_mesh(jax.devices()[:1]), input_size=(32, 32))
    chex.assert_trees_all_equal(jax.device_get(run.teacher_vars), jax.device_get(v))


@pytest.mark.slow
def test_train_py_distils_a_transformers_teacher(tmp_path):
    cli.run(cli.command(tmp_path, config=os.path.join(ROOT, "configs", "foreign_teacher.py")), devices=1)
    train = [r for r in cli.all_rows(tmp_path) if "distill/stage" in r]
    assert len(train) == 5 and all(r["distill/stage"] > 0 for r in train)
    summary = cli.summary(tmp_path)
    assert "teacher" not in summary and summary["finished"]
    assert (tmp_path / "export" / "student.pth").exists()
