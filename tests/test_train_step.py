"""The distillation step: one jit over a mesh, same numbers on 1 and 4 devices, frozen teacher."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from cankd_jax.train.sharding import global_batch, make_mesh
from tiny_setup import batches, run, setup


@pytest.mark.parametrize("loss_name", ["cankd", "mgd"])
def test_one_and_four_devices_give_the_same_numbers(loss_name):
    s1, h1 = run(1, loss_name)
    s4, h4 = run(4, loss_name)
    for m1, m4 in zip(h1, h4, strict=True):
        for k in m1:
            np.testing.assert_allclose(m4[k], m1[k], rtol=2e-5, atol=1e-7, err_msg=k)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s4), strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-6)
    assert h1[0]["distill/feat"] > 0 and h1[-1]["loss"] != h1[0]["loss"]


def test_teacher_stays_frozen_and_loss_parameters_train():
    mesh = make_mesh(jax.devices()[:1])
    state, teacher_vars, step = setup(mesh)
    before_teacher = jax.device_get(teacher_vars)
    before = jax.device_get(state)
    with jax.set_mesh(mesh):
        for b in batches(2):
            state, _ = step(state, teacher_vars, global_batch(b, mesh))
    for a, b in zip(jax.tree.leaves(before_teacher), jax.tree.leaves(jax.device_get(teacher_vars)), strict=True):
        np.testing.assert_array_equal(a, b)
    bn_scale_before = before.params["distill"]["feat"]["loss"]["non_local_att"]["W_bn"]["scale"]
    bn_scale_after = jax.device_get(state.params["distill"]["feat"]["loss"]["non_local_att"]["W_bn"]["scale"])
    assert np.all(bn_scale_before == 0) and np.any(bn_scale_after != 0)
    assert int(jax.device_get(state.batch_stats["distill"]["feat"]["loss"]["non_local_att"]["W_bn"]["num_batches_tracked"])) == 2
