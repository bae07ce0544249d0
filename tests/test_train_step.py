"""The distillation step: one jit over a mesh, the same numbers on 1 and 4 devices (replicated or FSDP), the
teacher in inference mode, one compilation."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cankd_jax.train.sharding import ParamLayout, global_batch, make_mesh
from cankd_jax.train.compiled import RecompileError
from tiny_setup import batches, run, setup

FSDP = ParamLayout(fsdp=True, min_size=16)


def _same_history(h1, h2):
    for m1, m2 in zip(h1, h2, strict=True):
        assert m1.keys() == m2.keys()
        chex.assert_trees_all_close(m2, m1, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("loss_name", ["cankd", "mgd"])
def test_one_and_four_devices_give_the_same_numbers(loss_name):
    s1, h1 = run(1, loss_name)
    s4, h4 = run(4, loss_name)
    _same_history(h1, h4)
    chex.assert_trees_all_close(s4, s1, rtol=2e-5, atol=1e-6)
    assert h1[0]["distill/feat"] > 0 and h1[-1]["loss"] != h1[0]["loss"]


def test_fsdp_on_four_devices_gives_the_replicated_numbers():
    mesh = make_mesh(jax.devices()[:4])
    state, _, _ = setup(mesh, layout=FSDP)
    spread = [x for x in jax.tree.leaves(state.params) if not x.sharding.is_fully_replicated]
    assert len(spread) >= 4  # the layout really spreads parameters (else this test could not fail)
    s1, h1 = run(1)
    s4, h4 = run(4, layout=FSDP)
    _same_history(h1, h4)
    chex.assert_trees_all_close(s4, s1, rtol=2e-5, atol=1e-6)


def test_the_teacher_runs_in_inference_mode_and_loss_parameters_train():
    """The step's distillation value is the loss of the teacher's inference-mode features (running statistics),
    which differ from its training-mode ones; only the student side and the loss module train."""
    mesh = make_mesh(jax.devices()[:1])
    state, teacher_vars, step = setup(mesh)
    from tiny_setup import TinySegNet  # the networks setup() builds

    student, teacher = TinySegNet(4), TinySegNet(8)
    batch = next(batches(1))
    before = jax.device_get(state)
    with jax.set_mesh(mesh):
        state, metrics = step(state, teacher_vars, global_batch(batch, mesh))

    from cankd_jax.losses import Connector, make_loss

    s_vars = {"params": before.params["student"], "batch_stats": before.batch_stats["student"]}
    s_feat = student.apply(s_vars, batch["image"], train=True, mutable=["batch_stats"])[0]["feat"]
    lifted = Connector(8).apply({"params": before.params["distill"]["feat"]["connector"]}, s_feat)
    loss = make_loss("cankd", in_channels=8, loss_weight=10.0)
    l_vars = {"params": before.params["distill"]["feat"]["loss"],
              "batch_stats": before.batch_stats["distill"]["feat"]["loss"]}

    def distill(teacher_train: bool) -> float:
        out = teacher.apply(teacher_vars, batch["image"], train=teacher_train, mutable=["batch_stats"])[0]["feat"]
        return float(loss.apply(l_vars, lifted, out, train=True, mutable=["batch_stats"])[0])

    np.testing.assert_allclose(float(metrics["distill/feat"]), distill(False), rtol=1e-5)
    assert not np.isclose(distill(True), distill(False), rtol=1e-3)  # the check above can tell the two apart

    bn_scale_before = before.params["distill"]["feat"]["loss"]["non_local_att"]["W_bn"]["scale"]
    bn_scale_after = jax.device_get(state.params["distill"]["feat"]["loss"]["non_local_att"]["W_bn"]["scale"])
    assert np.all(bn_scale_before == 0) and np.any(bn_scale_after != 0)


def test_the_step_compiles_once_and_a_batch_of_another_shape_is_refused():
    mesh = make_mesh(jax.devices()[:1])
    state, teacher_vars, step = setup(mesh)
    with jax.set_mesh(mesh):
        for b in batches(2):
            state, _ = step(state, teacher_vars, global_batch(b, mesh))
        other = {"image": jnp.zeros((8, 16, 16, 3)), "label": jnp.zeros((8, 16, 16), jnp.int32)}
        with pytest.raises(RecompileError, match="train step would be compiled again"):
            step(state, teacher_vars, global_batch(other, mesh))
