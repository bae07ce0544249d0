"""Properties of the loss family: orders agree, transforms compose, state behaves, errors are clear."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cankd_jax.interop.torch import export_cankd_loss, load_cankd_loss
from cankd_jax.losses import ATTENTIONS, LOSSES, CanKDLoss, Connector, make_loss
from conftest import assert_close

B, H, W, C = 2, 6, 10, 8


def _pair(seed=0, shape=(B, H, W, C)):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, shape), 2.0 * jax.random.normal(k2, shape) + 1.0


def _live_variables(loss, s, t, seed=1):
    """Initialised variables with every zero-initialised tensor made non-zero."""
    v = loss.init(jax.random.key(seed), s, t, train=False)
    leaves, tree = jax.tree.flatten(v["params"])
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return {**v, "params": jax.tree.unflatten(tree, leaves)}


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_efficient_order_equals_quadratic(attention):
    s, t = _pair()
    eff = CanKDLoss(C, attention=attention, query_block=16)
    quad = CanKDLoss(C, attention=attention, impl="quadratic")
    v = _live_variables(eff, s, t)

    def run(mod):
        f = lambda p, x: mod.apply({**v, "params": p}, x, t, train=True, mutable=["batch_stats"])[0]  # noqa: E731
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(v["params"], s)

    (l_e, g_e), (l_q, g_q) = run(eff), run(quad)
    assert_close(l_e, l_q, what="loss")
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_q))
    for a, b in zip(jax.tree.leaves(g_e), jax.tree.leaves(g_q), strict=True):
        assert_close(a, b, scale=max(float(jnp.abs(b).max()), 0.1 * scale), what="gradient")


def _largest_intermediate(jaxpr) -> int:
    """Element count of the largest value any equation produces, sub-jaxprs (scan, remat, jit) included."""
    biggest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            shape = getattr(var.aval, "shape", ())
            biggest = max(biggest, math.prod(shape))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    biggest = max(biggest, _largest_intermediate(inner))
    return biggest


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_efficient_path_never_builds_the_attention_matrix(attention):
    b, h, w, c = 2, 32, 32, 8
    p, n = h * w, (h // 2) * (w // 2)
    s, t = _pair(shape=(b, h, w, c))
    loss = CanKDLoss(c, attention=attention, query_block=64)
    v = loss.init(jax.random.key(0), s, t, train=False)

    def f(params, x):
        return loss.apply({**v, "params": params}, x, t, train=True, mutable=["batch_stats"])[0]

    grad_jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(v["params"], s).jaxpr
    biggest = _largest_intermediate(grad_jaxpr)
    assert biggest < b * p * n // 4, f"an intermediate of {biggest} elements; the P x N map has {b * p * n}"
    quad = CanKDLoss(c, attention=attention, impl="quadratic")
    quad_jaxpr = jax.make_jaxpr(lambda x: quad.apply(v, x, t, train=False))(s).jaxpr
    assert _largest_intermediate(quad_jaxpr) >= b * p * n  # the check does see a P x N matrix when there is one


def test_at_initialisation_the_loss_is_the_instance_normalised_mse():
    s, t = _pair()
    loss = CanKDLoss(C, loss_weight=10.0)
    v = loss.init(jax.random.key(3), s, t, train=False)
    got = loss.apply(v, s, t, train=True, mutable=["batch_stats"])[0]

    def inorm(x):  # per sample and channel over (H, W), biased variance, eps 1e-5 (written here, not imported)
        x = np.asarray(x, np.float64)
        mean, var = x.mean(axis=(1, 2), keepdims=True), x.var(axis=(1, 2), keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5)

    expected = 10.0 * np.mean((inorm(s) - inorm(t)) ** 2) / 2
    assert_close(got, expected)
    assert loss.effective_weight == 5.0
    # Only the BN scale gets gradient while it is zero: the convs sit behind it, and the
    # BN bias is a per-channel shift that the instance norm removes (zero up to rounding).
    g = jax.grad(lambda p: loss.apply({**v, "params": p}, s, t, train=True, mutable=["batch_stats"])[0])(v["params"])
    g = g["non_local_att"]
    scale_grad = float(jnp.abs(g["W_bn"]["scale"]).max())
    assert scale_grad > 1e-3
    assert float(jnp.abs(g["W_bn"]["bias"]).max()) < 1e-5 * scale_grad
    for name in ("theta", "phi", "g", "W"):
        for x in jax.tree.leaves(g[name]):
            np.testing.assert_array_equal(x, 0.0)


def test_batch_stats_update_in_train_mode_and_stay_fixed_in_eval():
    s, t = _pair()
    loss = CanKDLoss(C)
    v = _live_variables(loss, s, t)
    _, upd = loss.apply(v, s, t, train=True, mutable=["batch_stats"])
    before, after = v["batch_stats"]["non_local_att"]["W_bn"], upd["batch_stats"]["non_local_att"]["W_bn"]
    assert not np.allclose(before["mean"], after["mean"]) and not np.allclose(before["var"], after["var"])
    assert int(after["num_batches_tracked"]) == 1
    out, upd_eval = loss.apply(v, s, t, train=False, mutable=["batch_stats"])
    chex.assert_trees_all_equal(upd_eval["batch_stats"], v["batch_stats"])
    # Eval mode uses the running statistics, so it differs from the batch-statistics loss.
    assert not np.isclose(float(out), float(loss.apply(v, s, t, train=True, mutable=["batch_stats"])[0]))


def test_jit_grad_and_vmap_over_pairs():
    k = 3
    s = jax.random.normal(jax.random.key(0), (k, B, H, W, C))
    t = jax.random.normal(jax.random.key(1), (k, B, H, W, C))
    loss = CanKDLoss(C)
    v = _live_variables(loss, s[0], t[0])
    one = lambda a, b: loss.apply(v, a, b, train=False)  # noqa: E731
    batched = jax.jit(jax.vmap(one))(s, t)
    for i in range(k):
        assert_close(batched[i], one(s[i], t[i]))
    g = jax.jit(jax.vmap(jax.grad(one)))(s, t)
    assert g.shape == s.shape and bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_registered_loss_runs_and_gives_the_teacher_no_gradient(name):
    s, t = _pair(shape=(2, 6, 6, 4))
    kwargs = {"cankd": dict(in_channels=4), "cankd_align": dict(in_channels=4), "nonlocal_self": dict(in_channels=4),
              "mgd": dict(teacher_channels=4)}
    loss = make_loss(name, **kwargs.get(name, {}))
    rngs = {"params": jax.random.key(0), "mask": jax.random.key(1)}
    v = loss.init(rngs, s, t, train=False)
    f = lambda a, b: loss.apply(v, a, b, train=True, mutable=["batch_stats"], rngs={"mask": jax.random.key(2)})[0]  # noqa: E731
    value, (g_s, g_t) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(s, t)
    assert value.shape == () and value.dtype == jnp.float32 and float(value) > 0
    assert bool(jnp.any(g_s != 0))
    np.testing.assert_array_equal(g_t, 0.0)


def test_connector_lifts_channels_for_cankd():
    s = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    t = jax.random.normal(jax.random.key(1), (2, 6, 6, 16))
    conn = Connector(16)
    cv = conn.init(jax.random.key(2), s)
    kernel = cv["params"]["conv"]["kernel"]
    assert kernel.shape == (4, 16)
    np.testing.assert_array_equal(cv["params"]["conv"]["bias"], 0.0)
    cv = {"params": {"conv": {"kernel": kernel, "bias": jnp.arange(16.0)}}}
    lifted = conn.apply(cv, s)
    assert_close(lifted, np.einsum("bhwc,cd->bhwd", np.asarray(s), np.asarray(kernel)) + np.arange(16.0),
                 what="1x1 conv with bias")
    loss = CanKDLoss(16)
    lv = loss.init(jax.random.key(3), lifted, t, train=False)
    # Train the W BatchNorm's scale off zero, so the gradient reaches the connector through the attention too.
    lv = {**lv, "params": jax.tree.map(lambda x: x + 0.5, lv["params"])}

    def value(params):
        return loss.apply(lv, conn.apply(params, s), t, train=True, mutable=["batch_stats"])[0]

    g = jax.jit(jax.grad(value))(cv)["params"]["conv"]
    assert np.all(np.isfinite(g["kernel"])) and np.abs(g["kernel"]).min() > 0


def test_connector_init_is_he_normal_fan_out():
    kernel = Connector(512).init(jax.random.key(0), jnp.zeros((1, 1, 1, 2048)))["params"]["conv"]["kernel"]
    assert abs(float(jnp.std(kernel)) - math.sqrt(2 / 512)) < 0.02 * math.sqrt(2 / 512)


# --- errors --------------------------------------------------------------------------------------------


def _call(loss, s, t):
    return loss.init(jax.random.key(0), s, t, train=False)


def test_error_when_only_channels_differ_names_the_connector():
    with pytest.raises(ValueError, match=r"only the channels differ \(4 vs 8\).*Connector\(out_channels=8\)"):
        _call(CanKDLoss(8), jnp.zeros((2, 6, 6, 4)), jnp.zeros((2, 6, 6, 8)))


def test_error_on_spatial_mismatch_states_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 6, 6, 8\) and \(2, 8, 8, 8\)"):
        _call(CanKDLoss(8), jnp.zeros((2, 6, 6, 8)), jnp.zeros((2, 8, 8, 8)))


def test_error_on_rank():
    with pytest.raises(ValueError, match=r"must be NHWC \(B, H, W, C\), got shape \(6, 6, 8\) \(rank 3\)"):
        _call(CanKDLoss(8), jnp.zeros((6, 6, 8)), jnp.zeros((6, 6, 8)))


def test_error_on_channels_not_in_channels():
    with pytest.raises(ValueError, match="have 16 channels but the loss was built with in_channels=8"):
        _call(CanKDLoss(8), jnp.zeros((2, 6, 6, 16)), jnp.zeros((2, 6, 6, 16)))


def test_error_on_unknown_attention_and_impl():
    with pytest.raises(ValueError, match="unknown attention 'softmax'; choose one of concatenation, dot"):
        CanKDLoss(8, attention="softmax")
    with pytest.raises(ValueError, match="unknown impl 'fast'"):
        CanKDLoss(8, impl="fast")


def test_error_on_too_small_for_pooling():
    with pytest.raises(ValueError, match=r"spatial size \(1, 6\) is too small .* sub_sample=False"):
        _call(CanKDLoss(8), jnp.zeros((2, 1, 6, 8)), jnp.zeros((2, 1, 6, 8)))
    _call(CanKDLoss(8, sub_sample=False), jnp.zeros((2, 1, 6, 8)), jnp.zeros((2, 1, 6, 8)))  # fine without pooling


def test_error_on_unknown_loss_and_option():
    with pytest.raises(ValueError, match="unknown loss 'cankdd'; choose one of at, cankd"):
        make_loss("cankdd")
    with pytest.raises(ValueError, match="loss 'cankd' has no option\\(s\\) loss_wieght; its options are in_channels"):
        make_loss("cankd", in_channels=8, loss_wieght=10)
    with pytest.raises(ValueError, match="loss 'cankd' needs option\\(s\\) in_channels"):
        make_loss("cankd", loss_weight=10)


def test_error_when_mgd_has_no_rng():
    loss = make_loss("mgd", teacher_channels=4)
    s = jnp.zeros((1, 4, 4, 4))
    v = loss.init({"params": jax.random.key(0), "mask": jax.random.key(1)}, s, s)
    with pytest.raises(ValueError, match="rngs=\\{'mask': key\\}"):
        loss.apply(v, s, s)


# --- interop -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opts", [{}, dict(sub_sample=False), dict(bn_layer=False), dict(attention="concatenation"),
                                  dict(attention="gaussian", sub_sample=False)])
def test_state_dict_round_trip_is_the_identity(opts):
    s, t = _pair()
    loss = CanKDLoss(C, **opts)
    v = _live_variables(loss, s, t)
    v = {**v, **loss.apply(v, s, t, train=True, mutable=["batch_stats"])[1]}
    sd = export_cankd_loss(v, **opts)
    back = load_cankd_loss(sd, in_channels=C, **opts)
    chex.assert_trees_all_equal(back, jax.device_get(v))
    again = export_cankd_loss(back, **opts)
    assert sorted(again) == sorted(sd)
    for key in sd:
        np.testing.assert_array_equal(again[key], sd[key])
        assert again[key].dtype == sd[key].dtype


def test_loader_names_missing_misshaped_and_unexpected_keys():
    s, t = _pair()
    loss = CanKDLoss(C)
    sd = export_cankd_loss(loss.init(jax.random.key(0), s, t, train=False), prefix="distill_losses.loss_s0.")
    assert "distill_losses.loss_s0.non_local_att.att.theta.weight" in sd
    load_cankd_loss(sd, in_channels=C, prefix="distill_losses.loss_s0.")
    with pytest.raises(ValueError, match=r"missing keys: non_local_att\.g\.0\.weight"):
        load_cankd_loss(sd, in_channels=C)  # forgot the prefix
    broken = dict(sd)
    broken["distill_losses.loss_s0.non_local_att.att.phi.0.weight"] = np.zeros((3, C, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"'distill_losses.loss_s0.non_local_att.att.phi.0.weight' has shape \(3, 8, 1, 1\), expected \(4, 8, 1, 1\)"):
        load_cankd_loss(broken, in_channels=C, prefix="distill_losses.loss_s0.")
    with pytest.raises(ValueError, match=r"missing keys: .*phi\.weight"):
        load_cankd_loss(sd, in_channels=C, prefix="distill_losses.loss_s0.", sub_sample=False)
    extra = {**sd, "distill_losses.loss_s0.non_local_att.att.concatination.0.weight": np.zeros((1, 8, 1, 1))}
    with pytest.raises(ValueError, match=r"unexpected keys: .*concatination"):
        load_cankd_loss(extra, in_channels=C, prefix="distill_losses.loss_s0.")
    load_cankd_loss(extra, in_channels=C, prefix="distill_losses.loss_s0.", strict=False)


def test_mistyped_inputs_and_options_are_named():
    """Each was a chex AssertionError, a Flax/JAX TypeError from deep inside, or (a text loss weight) an error
    only at the first call."""
    s, t = jnp.zeros((2, 6, 6, 8)), jnp.ones((2, 6, 6, 8))
    with pytest.raises(ValueError, match="L2Loss: the student feature must be floating point, got int32"):
        make_loss("fitnet").apply({}, s.astype(jnp.int32), t)
    with pytest.raises(ValueError, match="L2Loss: the teacher feature must be floating point, got bool"):
        jax.jit(lambda a, b: make_loss("fitnet").apply({}, a, b))(s, t.astype(bool))  # also under jit
    with pytest.raises(TypeError, match="L2Loss: the student feature must be an array .* got a list"):
        make_loss("fitnet").apply({}, [[1.0]], t)
    for bad in (16.0, "16", True, 0):
        with pytest.raises(ValueError, match=f"CanKDLoss: in_channels must be a positive integer, got {bad!r}"):
            CanKDLoss(bad)
    with pytest.raises(ValueError, match=r"CanKDLoss: dtype must be a float dtype \(e.g. 'bfloat16'\) or None, got 'bf16'"):
        CanKDLoss(8, dtype="bf16")
    assert CanKDLoss(8, dtype="bfloat16").dtype == "bfloat16" and CanKDLoss(np.int64(8)).in_channels == 8
    with pytest.raises(ValueError, match="loss 'fitnet': option loss_weight must be a finite number, got '10'"):
        make_loss("fitnet", loss_weight="10")
    with pytest.raises(ValueError, match="loss 'cwd': option tau must be a finite number, got nan"):
        make_loss("cwd", tau=float("nan"))
    assert make_loss("fitnet", loss_weight=np.float32(2.0)).loss_weight == 2.0
    with pytest.raises(ValueError, match="Connector: out_channels must be a positive integer, got 0"):
        Connector(0)
    mgd = make_loss("mgd", teacher_channels=16)  # its own field's name, not 'in_channels'
    with pytest.raises(ValueError, match="have 8 channels but the loss was built with teacher_channels=16"):
        mgd.init({"params": jax.random.key(0), "mask": jax.random.key(1)}, s, t)


def test_the_exporter_refuses_options_that_would_leave_trained_parameters_out():
    """bn_layer=False or another attention on a loss built with BatchNorm and the dot form wrote a file without the
    BatchNorm or without theta/phi, silently."""
    s, t = _pair()
    variables = CanKDLoss(C).init(jax.random.key(0), s, t, train=False)
    for options in (dict(bn_layer=False), dict(attention="gaussian"), dict(attention="concatenation")):
        with pytest.raises(ValueError, match=r"the variables' modules \['W', 'W_bn', 'g', 'phi', 'theta'\] are not "
                                             r"those of attention=.*pass the options the loss was built with"):
            export_cankd_loss(variables, **options)
    with pytest.raises(ValueError, match=r"hold no params/non_local_att .* but \['student_non_local'\]"):
        export_cankd_loss({"params": {"student_non_local": {}}})
    # an integer (or float64) copy of the official weights loads as float32, trainable
    sd = export_cankd_loss(variables)
    loaded = load_cankd_loss({k: v.astype(np.int32) for k, v in sd.items()}, in_channels=C)
    assert {x.dtype for x in jax.tree.leaves(loaded["params"])} == {np.dtype(np.float32)}
    assert loaded["batch_stats"]["non_local_att"]["W_bn"]["mean"].dtype == np.float32
