"""`config.remat`: the student's stem, blocks and heads under `jax.checkpoint` give the numbers of the step
without it (the smoke step's loss, metrics and gradients), and keep less for the backward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smoke_step
import contextlib
import io
import re

from jax.ad_checkpoint import print_saved_residuals

from cankd_jax import models
from cankd_jax.config_arg import load_config
from cankd_jax.compute import REMAT_POLICIES, checkpointed, remat_policy
from cankd_jax.train.build import network_config


@pytest.mark.slow  # heavy in-process check: the slow tier keeps the quick one under 5 minutes
@pytest.mark.parametrize("policy", ["dots_saveable", "nothing_saveable"])
def test_remat_gives_the_numbers_of_no_remat(policy):
    g0, m0, s0 = smoke_step.grads("float32", "none")
    g1, m1, s1 = smoke_step.grads("float32", policy)
    for k in m0:
        np.testing.assert_allclose(m1[k], m0[k], rtol=1e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves((g1, s1)), jax.tree.leaves((g0, s0)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _residual_bytes(remat: str) -> int:
    """Bytes the smoke student's forward keeps for its backward pass (jax.ad_checkpoint.saved_residuals)."""
    config = load_config(smoke_step.SMOKE)
    net = models.make_network(network_config(config.student, remat=remat), num_classes=7)
    x = jnp.zeros((4, *smoke_step.SIZE, 3))
    v = jax.eval_shape(lambda: net.init(jax.random.key(0), x, train=False))
    v = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), v)

    def f(params):
        out, _ = net.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.key(0)})
        return jnp.sum(out["logits"]) + jnp.sum(out["aux_logits"])

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(f, v["params"])  # one line per residual: "f32[4,32,32,8] output of ..."
    total = 0
    for dtype, shape in re.findall(r"^(\w+)\[([\d,]*)\] (?!from the argument)", out.getvalue(), re.M):
        total += int(np.prod([int(d) for d in shape.split(",") if d] or [1])) * jnp.dtype(
            {"f32": "float32", "bf16": "bfloat16", "s32": "int32", "u32": "uint32", "bool": "bool"}.get(dtype, dtype)
        ).itemsize
    return total


def test_remat_keeps_less_for_the_backward_pass():
    kept = {p: _residual_bytes(p) for p in ("none", "dots_saveable", "nothing_saveable")}
    assert kept["nothing_saveable"] < kept["dots_saveable"] < kept["none"], kept


def test_remat_keeps_the_parameter_tree_and_names_its_policies():
    cfg = dict(name="deeplabv3", backbone="resnet18_v1c_d8", backbone_kwargs=dict(base_width=4, stem_width=4), head_channels=8)
    plain = models.make_network(cfg, num_classes=3)
    remat = models.make_network(network_config(cfg, remat="dots_saveable"), num_classes=3)
    x = jnp.zeros((1, 32, 32, 3))
    shapes = [jax.tree.map(lambda a: (a.shape, a.dtype), jax.eval_shape(lambda m=m: m.init(jax.random.key(0), x,
                                                                                           train=False)))
              for m in (plain, remat)]
    assert shapes[0] == shapes[1]
    assert remat.backbone.remat == "dots_saveable"
    with pytest.raises(ValueError, match="unknown remat policy 'dots'; choose one of none, dots_saveable"):
        models.make_network(dict(cfg, remat="dots"), num_classes=3)
    with pytest.raises(ValueError, match="not a ResNet"):
        models.make_network(dict(cfg, backbone="mobilenet_v2_d8", remat="nothing_saveable"), num_classes=3)
    with pytest.raises(ValueError, match="unknown dtype 'float16'"):
        network_config(cfg, dtype="float16")
    assert remat_policy("none") is None and checkpointed(abs, "none") is abs
    assert set(REMAT_POLICIES) >= {"none", "dots_saveable", "nothing_saveable"}
