"""Our losses against the PyTorch formulations in torch_reference.py: values and gradients.

Every parameter is randomised (BN scale/bias included, so the non-local branch
is live) and the PyTorch state dict is brought over with the interop loader,
which these tests therefore cover too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference as ref
from cankd_jax.interop.torch import export_cankd_loss, load_cankd_loss
from cankd_jax.losses import (
    ATLoss, CanKDAlignLoss, CanKDLoss, CWDLoss, INMSELoss, L2Loss, MGDLoss, PKDLoss, SelfNonLocalLoss, mgd_keep_mask,
)
from conftest import assert_close, nchw, nhwc

torch.manual_seed(0)


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter and BN buffer a non-trivial random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.5 if p.ndim > 1 else 0.3
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * scale)
            if name.endswith("W.1.weight"):  # BN scale away from 0 so the block contributes
                p.add_(torch.sign(p) * 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)


CANKD_CASES = {
    "default": dict(shape=(2, 6, 8, 8)),
    "odd_spatial": dict(shape=(2, 7, 9, 8)),
    "batch1": dict(shape=(1, 6, 6, 8)),
    "inter_channels": dict(shape=(2, 6, 6, 8), inter_channels=3),
    "odd_channels": dict(shape=(2, 5, 6, 5)),
    "no_sub_sample": dict(shape=(2, 5, 7, 8), sub_sample=False),
    "no_bn": dict(shape=(2, 6, 8, 8), bn_layer=False),
    "embedded_gaussian": dict(shape=(2, 7, 9, 8), attention="embedded_gaussian"),
    "gaussian": dict(shape=(2, 7, 9, 8), attention="gaussian"),
    "gaussian_no_sub_sample": dict(shape=(2, 5, 6, 8), attention="gaussian", sub_sample=False),
    "concatenation": dict(shape=(2, 7, 9, 8), attention="concatenation"),
    "concatenation_no_sub_sample": dict(shape=(2, 5, 6, 8), attention="concatenation", sub_sample=False),
    "no_instance_norm": dict(shape=(2, 6, 8, 8), instance_norm=False),
    "no_skip": dict(shape=(2, 6, 8, 8), skip=False),
    "weight10": dict(shape=(2, 6, 8, 8), loss_weight=10.0),
    # the authors' DCN_NLKD_Loss: mmcv's DeformConv2dPack (on the ports of its CPU kernels) for theta, phi, g, W,
    # with randomised offset convs (offsets of a few pixels: points inside, across and beyond the border)
    "deform": dict(shape=(2, 6, 8, 8), projection="deform"),
    "deform_odd": dict(shape=(2, 7, 9, 6), projection="deform", inter_channels=4),
}


def _opts(case):
    return {k: v for k, v in case.items() if k != "shape"}


def _torch_loss_and_grads(module, s, t):
    """Loss and gradients of the reference, in float64 so that only our rounding is measured."""
    module.double().train()
    # contiguous, as real feature maps are (mmcv's deformable kernels refuse others, as the compiled ones do)
    s_t = nchw(s).double().contiguous().requires_grad_(True)
    loss = module(s_t, nchw(t).double().contiguous())
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in module.named_parameters()}
    return loss.item(), nhwc(s_t.grad), grads


@pytest.mark.parametrize("case", list(CANKD_CASES), ids=list(CANKD_CASES))
def test_cankd_matches_pytorch(case):
    opts, shape = _opts(CANKD_CASES[case]), CANKD_CASES[case]["shape"]
    c = shape[-1]
    r = np.random.default_rng(1)
    s = r.standard_normal(shape).astype(np.float32)
    t = (r.standard_normal(shape) * 2 + 0.5).astype(np.float32)

    tm = ref.CanKDLoss(c, **opts)
    randomize_(tm, seed=len(case))
    sd = {k: v.clone() for k, v in tm.state_dict().items()}  # float32, before the reference goes float64
    t_loss, t_gs, t_gp = _torch_loss_and_grads(tm, s, t)

    keys = dict(sub_sample=opts.get("sub_sample", True), bn_layer=opts.get("bn_layer", True),
                attention=opts.get("attention", "dot"), projection=opts.get("projection", "conv"))
    variables = load_cankd_loss(sd, in_channels=c, inter_channels=opts.get("inter_channels"), **keys)
    # Small query blocks so the blocked softmax path (with padding) is what gets compared.
    loss_mod = CanKDLoss(c, query_block=16, **opts)

    def f(params, student):
        out, upd = loss_mod.apply({**variables, "params": params}, student, jnp.asarray(t), train=True,
                                  mutable=["batch_stats"])
        return out, upd

    (loss, upd), (g_params, g_s) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
        variables["params"], jnp.asarray(s))
    assert_close(loss, t_loss, what="loss")
    assert_close(g_s, t_gs, what="d loss / d student")
    ours = export_cankd_loss({"params": g_params}, **keys)
    assert set(ours) == set(t_gp), (sorted(ours), sorted(t_gp))
    grad_scale = max(float(np.abs(g).max()) for g in t_gp.values())
    for k in t_gp:
        own = float(np.abs(t_gp[k]).max())
        # A gradient that is zero in exact arithmetic (a bias that a train-mode BatchNorm cancels: ~1e-16 in the
        # float64 reference) is float32 rounding noise of sums over every position: judged on its neighbours'
        # scale. The others on their own scale, at least a tenth of their neighbours'.
        scale = grad_scale if own < 1e-9 * grad_scale else max(own, 0.1 * grad_scale)
        assert_close(ours[k], t_gp[k], scale=scale, what=f"d loss / d {k}")
    if keys["bn_layer"]:
        new = export_cankd_loss({**variables, **upd}, **keys)
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            full = f"non_local_att.W.1.{k}"
            assert_close(new[full], tm.state_dict()[full].numpy(), what=full)


@pytest.mark.parametrize("s_shape, t_shape", [((2, 5, 7, 8), (2, 10, 14, 8)), ((2, 6, 5, 8), (2, 9, 13, 8)),
                                               ((2, 6, 8, 8), (2, 6, 8, 8))], ids=["2x", "uneven", "same_size"])
def test_cankd_align_matches_pytorch(s_shape, t_shape):
    r = np.random.default_rng(2)
    s = r.standard_normal(s_shape).astype(np.float32)
    t = (r.standard_normal(t_shape) * 2 + 0.5).astype(np.float32)
    tm = ref.CanKDAlignLoss(8, loss_weight=10.0)
    randomize_(tm, seed=5)
    sd = {k: v.clone() for k, v in tm.state_dict().items()}
    t_loss, t_gs, t_gp = _torch_loss_and_grads(tm, s, t)
    variables = load_cankd_loss(sd, in_channels=8)
    loss_mod = CanKDAlignLoss(8, loss_weight=10.0)

    def f(params, student):
        return loss_mod.apply({**variables, "params": params}, student, jnp.asarray(t), train=True,
                              mutable=["batch_stats"])[0]

    loss, (g_params, g_s) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(variables["params"], jnp.asarray(s))
    assert_close(loss, t_loss, what="loss")
    assert_close(g_s, t_gs, what="d loss / d student (through the resize)")
    ours = export_cankd_loss({"params": g_params})
    grad_scale = max(float(np.abs(g).max()) for g in t_gp.values())
    for k in t_gp:  # BN-cancelled biases judged on their neighbours' scale, as in test_cankd_matches_pytorch
        own = float(np.abs(t_gp[k]).max())
        assert_close(ours[k], t_gp[k], scale=grad_scale if own < 1e-9 * grad_scale else max(own, 0.1 * grad_scale),
                     what=f"d loss / d {k}")


def test_cankd_align_names_a_width_mismatch():
    loss = CanKDAlignLoss(8)
    with pytest.raises(ValueError, match="CanKDAlignLoss: student shape .* only the channels differ"):
        loss.init(jax.random.key(0), jnp.zeros((1, 4, 4, 6)), jnp.zeros((1, 8, 8, 8)), train=True)


@pytest.mark.parametrize("attention", ["dot", "concatenation"])
def test_self_nonlocal_matches_pytorch(attention):
    shape = (2, 6, 6, 8)
    r = np.random.default_rng(2)
    s, t = r.standard_normal(shape).astype(np.float32), r.standard_normal(shape).astype(np.float32)
    tm = ref.SelfNonLocalLoss(8, attention=attention)
    randomize_(tm, seed=3)
    sd = {k: v.clone() for k, v in tm.state_dict().items()}
    t_loss, t_gs, t_gp = _torch_loss_and_grads(tm, s, t)

    # The reference's blocks sit at `student_non_local.*`; the loader reads a CanKD loss's `non_local_att.*`.
    blocks = [load_cankd_loss({"non_local_att" + k[len(p):]: v for k, v in sd.items() if k.startswith(p + ".")},
                              in_channels=8, attention=attention)
              for p in ("student_non_local", "teacher_non_local")]
    hop = lambda i, part: blocks[i][part]["non_local_att"]  # noqa: E731
    variables = {part: {"student_non_local": hop(0, part), "teacher_non_local": hop(1, part)}
                 for part in ("params", "batch_stats")}
    mod = SelfNonLocalLoss(8, attention=attention)

    def f(params, student):
        return mod.apply({**variables, "params": params}, student, jnp.asarray(t), train=True,
                         mutable=["batch_stats"])[0]

    loss, (g_params, g_s) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(variables["params"], jnp.asarray(s))
    assert_close(loss, t_loss, what="loss")
    assert_close(g_s, t_gs, what="d loss / d student")
    for p in ("student_non_local", "teacher_non_local"):
        ours = export_cankd_loss({"params": {"non_local_att": g_params[p]}}, attention=attention)
        assert {p + k[len("non_local_att"):] for k in ours} == {k for k in t_gp if k.startswith(p + ".")}
        for k, v in ours.items():
            theirs = t_gp[p + k[len("non_local_att"):]]
            assert_close(v, theirs, scale=max(float(np.abs(theirs).max()), 0.1 * abs(float(loss))), what=f"d loss / d {p}.{k}")


def _grad_parity(jax_loss_fn, torch_loss_fn, s, t):
    loss, g = jax.jit(jax.value_and_grad(jax_loss_fn))(jnp.asarray(s), jnp.asarray(t))
    s_t = nchw(s).requires_grad_(True)
    t_loss = torch_loss_fn(s_t, nchw(t))
    t_loss.backward()
    assert_close(loss, t_loss.item(), what="loss")
    assert_close(g, nhwc(s_t.grad), what="d loss / d student")


@pytest.mark.parametrize("opts", [{}, dict(normalize=False, loss_weight=3.0), dict(div_element=True, mult=2.0),
                                  dict(dist=True, mult=2.0), dict(dist=True, normalize=False, loss_weight=0.5)])
def test_l2_matches_pytorch(opts, rng):
    s, t = rng.standard_normal((4, 5, 6, 4)).astype(np.float32), rng.standard_normal((4, 5, 6, 4)).astype(np.float32)
    mod = L2Loss(**opts)
    _grad_parity(lambda a, b: mod.apply({}, a, b), lambda a, b: ref.l2_loss(a, b, **opts), s, t)


def test_l2_dist_is_the_two_norm_of_the_difference(rng):
    """mmrazor's `dist=True` is torch.dist(s, t, p=2) of the (normalised) maps: no division by the batch."""
    torch = pytest.importorskip("torch")
    s, t = rng.standard_normal((4, 5, 6, 4)).astype(np.float32), rng.standard_normal((4, 5, 6, 4)).astype(np.float32)
    flat = [torch.nn.functional.normalize(torch.from_numpy(x).reshape(4, -1), dim=1) for x in (s, t)]
    expected = torch.dist(*flat, p=2).item()
    assert_close(L2Loss(dist=True).apply({}, s, t), expected, what="dist")


@pytest.mark.parametrize("sizes,resize_stu", [((6, 8), True), ((3, 5), True), ((12, 10), True), ((3, 5), False)])
def test_pkd_matches_pytorch(sizes, resize_stu, rng):
    s = rng.standard_normal((2, *sizes, 4)).astype(np.float32) * 3 + 1
    t = rng.standard_normal((2, 6, 8, 4)).astype(np.float32)
    mod = PKDLoss(loss_weight=6.0, resize_stu=resize_stu)
    _grad_parity(lambda a, b: mod.apply({}, a, b),
                 lambda a, b: ref.pkd_loss(a, b, loss_weight=6.0, resize_stu=resize_stu), s, t)


@pytest.mark.parametrize("shape", [(2, 5, 6, 4), (1, 3, 7, 2)])
def test_in_mse_matches_pytorch(shape, rng):
    s = rng.standard_normal(shape).astype(np.float32) * 2 + 0.5
    t = rng.standard_normal(shape).astype(np.float32) * 3 - 1
    mod = INMSELoss(loss_weight=10.0)
    _grad_parity(lambda a, b: mod.apply({}, a, b), lambda a, b: ref.in_mse_loss(a, b, loss_weight=10.0), s, t)


def test_in_mse_is_cankd_at_initialisation(rng):
    """CanKD's W BatchNorm starts at zero, so at step 0 CanKD computes exactly the "IN only" loss."""
    s, t = rng.standard_normal((2, 6, 6, 8)).astype(np.float32), rng.standard_normal((2, 6, 6, 8)).astype(np.float32)
    cankd = CanKDLoss(8, loss_weight=10.0)
    v = cankd.init(jax.random.key(0), s, t, train=False)
    value = cankd.apply(v, s, t, train=True, mutable=["batch_stats"])[0]
    assert_close(value, INMSELoss(loss_weight=10.0).apply({}, s, t), what="CanKD at init vs IN only")


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_matches_pytorch(tau, rng):
    s, t = rng.standard_normal((2, 5, 6, 3)).astype(np.float32), rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
    mod = CWDLoss(tau=tau, loss_weight=3.0)
    _grad_parity(lambda a, b: mod.apply({}, a, b), lambda a, b: ref.cwd_loss(a, b, tau=tau, loss_weight=3.0), s, t)


def test_at_matches_pytorch_with_different_widths(rng):
    s, t = rng.standard_normal((2, 5, 6, 3)).astype(np.float32), rng.standard_normal((2, 5, 6, 7)).astype(np.float32)
    mod = ATLoss(loss_weight=2.0)
    _grad_parity(lambda a, b: mod.apply({}, a, b), lambda a, b: ref.at_loss(a, b, loss_weight=2.0), s, t)


def test_mgd_masks_the_asked_for_share_of_pixels():
    """mmrazor zeroes a pixel where its uniform draw exceeds 1 - lambda: lambda of the pixels, not 1 - lambda, and
    one draw per pixel thresholded, so from the same key a larger lambda zeroes a superset of the pixels."""
    key = jax.random.key(3)
    masks = {lam: np.asarray(mgd_keep_mask(key, (8, 64, 64), lam)) for lam in (0.35, 0.65, 0.75)}
    for lam, mask in masks.items():
        assert mask.shape == (8, 64, 64, 1) and set(np.unique(mask)) == {0.0, 1.0}
        assert abs((1 - mask).mean() - lam) < 0.02, lam
    assert (masks[0.75] <= masks[0.65]).all() and (masks[0.65] <= masks[0.35]).all()


@pytest.mark.parametrize("c_s", [4, 6])
def test_mgd_matches_pytorch(c_s, rng):
    b, h, w, c_t = 2, 5, 6, 4
    s = rng.standard_normal((b, h, w, c_s)).astype(np.float32)
    t = rng.standard_normal((b, h, w, c_t)).astype(np.float32)
    key = jax.random.key(7)
    mod = MGDLoss(teacher_channels=c_t, lambda_mgd=0.65)
    variables = mod.init(jax.random.key(0), jnp.asarray(s), jnp.asarray(t), rng=key)
    tm = ref.MGD(c_s, c_t)
    p = variables["params"]
    with torch.no_grad():
        for i in (0, 2):
            tm.generation[i].weight.copy_(torch.from_numpy(np.transpose(np.asarray(p[f"generation_{i}"]["kernel"]), (3, 2, 0, 1)).copy()))
            tm.generation[i].bias.copy_(torch.from_numpy(np.array(p[f"generation_{i}"]["bias"])))
        if c_s != c_t:
            tm.align.weight.copy_(torch.from_numpy(np.asarray(p["align"]["kernel"]).T[:, :, None, None].copy()))
            tm.align.bias.copy_(torch.from_numpy(np.array(p["align"]["bias"])))
    mask = np.asarray(mgd_keep_mask(key, (b, h, w), 0.65))
    _grad_parity(lambda a, bb: mod.apply(variables, a, bb, rng=key),
                 lambda a, bb: tm(a, bb, nchw(mask)), s, t)
