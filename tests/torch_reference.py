"""PyTorch formulations of the losses, written from the spec, to hold our numbers against.

NCHW, literal order of operations (the P x N attention matrix is built), and the
official module/key layout of the authors' `NLKD_IN_Loss`, so state dicts move
between this and `cankd_jax` with `cankd_jax.interop.torch`. Used by the parity
tests and by `benchmarks/loss_speed.py` as "the PyTorch formulation".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _maybe_pool(module: nn.Module, sub_sample: bool) -> nn.Module:
    return nn.Sequential(module, nn.MaxPool2d(2)) if sub_sample else module


def _projection(c_in: int, c_out: int, projection: str, k: int = 3) -> nn.Module:
    """A 1x1 conv with bias, or (the authors' DCN_NLKD_Loss) mmcv's own `DeformConv2dPack` k x k without bias,
    running on the ports of mmcv's CPU kernels (`mmcv_ext.py`)."""
    if projection == "conv":
        return nn.Conv2d(c_in, c_out, 1)
    import mmcv_ext
    mmcv_ext.install()
    from mmcv.ops import DeformConv2dPack
    return DeformConv2dPack(c_in, c_out, k, stride=1, padding=k // 2)


class AttentionMatrix(nn.Module):
    """f(q_i, k_j) for the four forms: (B, P, N)."""

    def __init__(self, in_channels, inter_channels, sub_sample, attention, projection="conv"):
        super().__init__()
        self.attention = attention
        self.inter_channels = inter_channels
        if attention == "gaussian":
            self.phi = nn.MaxPool2d(2) if sub_sample else nn.Identity()
        else:
            self.theta = _projection(in_channels, inter_channels, projection)
            self.phi = _maybe_pool(_projection(in_channels, inter_channels, projection), sub_sample)
        if attention == "concatenation":
            self.concatination = nn.Sequential(nn.Conv2d(2 * inter_channels, 1, 1, bias=False), nn.ReLU())

    def forward(self, s, t):
        b = s.shape[0]
        if self.attention == "gaussian":
            q = s.reshape(b, s.shape[1], -1).permute(0, 2, 1)
        else:
            q = self.theta(s).reshape(b, self.inter_channels, -1).permute(0, 2, 1)  # (B, P, C)
        k = self.phi(t)
        k = k.reshape(b, k.shape[1], -1)  # (B, C, N)
        n = k.shape[-1]
        if self.attention == "dot":
            return torch.matmul(q, k) / n
        if self.attention in ("embedded_gaussian", "gaussian"):
            return F.softmax(torch.matmul(q, k), dim=-1)
        p = q.shape[1]
        pairs = torch.cat(
            [q.permute(0, 2, 1)[:, :, :, None].expand(-1, -1, p, n), k[:, :, None, :].expand(-1, -1, p, n)], dim=1
        )  # (B, 2Ci, P, N)
        return self.concatination(pairs)[:, 0] / n


class NonLocalAttention(nn.Module):
    def __init__(self, in_channels, inter_channels, sub_sample=True, bn_layer=True, attention="dot", skip=True,
                 projection="conv"):
        super().__init__()
        self.inter_channels, self.skip = inter_channels, skip
        self.att = AttentionMatrix(in_channels, inter_channels, sub_sample, attention, projection)
        self.g = _maybe_pool(_projection(in_channels, inter_channels, projection), sub_sample)
        if bn_layer:
            self.W = nn.Sequential(_projection(inter_channels, in_channels, projection, k=1),
                                   nn.BatchNorm2d(in_channels))
            nn.init.zeros_(self.W[1].weight)
            nn.init.zeros_(self.W[1].bias)
        else:
            self.W = nn.Conv2d(inter_channels, in_channels, 1)
            nn.init.zeros_(self.W.weight)
            nn.init.zeros_(self.W.bias)

    def forward(self, x, context):
        b, _, h, w = x.shape
        f = self.att(x, context)  # (B, P, N)
        v = self.g(context).reshape(b, self.inter_channels, -1).permute(0, 2, 1)  # (B, N, Ci)
        y = torch.matmul(f, v).permute(0, 2, 1).contiguous().reshape(b, self.inter_channels, h, w)
        wy = self.W(y)
        return wy + x if self.skip else wy


def _match(z_s, z_t, loss_weight, instance_norm):
    if instance_norm:
        z_s, z_t = F.instance_norm(z_s), F.instance_norm(z_t)
    return loss_weight * F.mse_loss(z_s, z_t) / 2


class CanKDLoss(nn.Module):
    """The CanKD loss as the spec describes it (= the official `NLKD_IN_Loss` and its ablations)."""

    def __init__(self, in_channels, inter_channels=None, sub_sample=True, bn_layer=True, loss_weight=1.0,
                 attention="dot", instance_norm=True, skip=True, projection="conv"):
        super().__init__()
        ci = inter_channels or max(in_channels // 2, 1)
        self.loss_weight, self.instance_norm = loss_weight, instance_norm
        self.non_local_att = NonLocalAttention(in_channels, ci, sub_sample, bn_layer, attention, skip, projection)

    def forward(self, s, t):
        t = t.detach()
        return _match(self.non_local_att(s, t), t, self.loss_weight, self.instance_norm)


class CanKDAlignLoss(CanKDLoss):
    """The authors' `NLKD_IN_align_Loss`: the student map resized to the teacher's size where they differ
    (`F.interpolate(mode='bilinear')`, align_corners=False), then CanKD."""

    def forward(self, s, t):
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear")
        return super().forward(s, t)


class SelfNonLocalLoss(nn.Module):
    """The self-attention baseline: each map through its own non-local block, then matched."""

    def __init__(self, in_channels, inter_channels=None, sub_sample=True, bn_layer=True, loss_weight=1.0,
                 attention="dot", instance_norm=True, skip=True):
        super().__init__()
        ci = inter_channels or max(in_channels // 2, 1)
        self.loss_weight, self.instance_norm = loss_weight, instance_norm
        self.student_non_local = NonLocalAttention(in_channels, ci, sub_sample, bn_layer, attention, skip)
        self.teacher_non_local = NonLocalAttention(in_channels, ci, sub_sample, bn_layer, attention, skip)

    def forward(self, s, t):
        t = t.detach()
        return _match(self.student_non_local(s, s), self.teacher_non_local(t, t), self.loss_weight, self.instance_norm)


# --- baselines (mmrazor's definitions, as the spec states them) -------------------------------------------


def l2_loss(s, t, loss_weight=1.0, normalize=True, mult=1.0, div_element=False, dist=False):
    t = t.detach()
    if normalize:
        s = s.reshape(s.shape[0], -1)
        s = s / s.norm(2, dim=1, keepdim=True) * mult
        t = t.reshape(t.shape[0], -1)
        t = t / t.norm(2, dim=1, keepdim=True) * mult
    loss = torch.sum((s - t) ** 2)
    if dist:  # mmrazor: the 2-norm of the whole difference (torch.dist), not divided by anything
        loss = torch.sqrt(loss)
    else:
        loss = loss / (s.numel() if div_element else s.shape[0])
    return loss_weight * loss


def in_mse_loss(s, t, loss_weight=1.0):
    """"IN only": CanKD's matching term without the non-local block (instance norm, MSE, halved)."""
    return _match(s, t.detach(), loss_weight, True)


def pkd_loss(s, t, loss_weight=1.0, resize_stu=True):
    t = t.detach()
    if s.shape[2:] != t.shape[2:]:
        if resize_stu:
            s = F.interpolate(s, t.shape[2:], mode="bilinear")
        else:
            t = F.interpolate(t, s.shape[2:], mode="bilinear")

    def norm(x):
        n, c, h, w = x.shape
        x = x.permute(1, 0, 2, 3).reshape(c, -1)
        x = (x - x.mean(dim=-1, keepdim=True)) / (x.std(dim=-1, keepdim=True) + 1e-6)
        return x.reshape(c, n, h, w).permute(1, 0, 2, 3)

    return loss_weight * F.mse_loss(norm(s), norm(t)) / 2


def cwd_loss(s, t, tau=1.0, loss_weight=1.0):
    t = t.detach()
    n, c, h, w = s.shape
    p_t = F.softmax(t.reshape(-1, h * w) / tau, dim=1)
    loss = torch.sum(p_t * F.log_softmax(t.reshape(-1, h * w) / tau, dim=1)
                     - p_t * F.log_softmax(s.reshape(-1, h * w) / tau, dim=1)) * tau**2
    return loss_weight * loss / (c * n)


def at_loss(s, t, loss_weight=1.0):
    def att(x):
        return F.normalize(x.pow(2).mean(1).reshape(x.shape[0], -1))

    return loss_weight * (att(s) - att(t.detach())).pow(2).mean()


class MGD(nn.Module):
    """mmrazor's MGD connector + loss, with the keep-mask given from outside (B, 1, H, W)."""

    def __init__(self, student_channels, teacher_channels, alpha_mgd=2e-5):
        super().__init__()
        self.alpha_mgd = alpha_mgd
        self.align = nn.Conv2d(student_channels, teacher_channels, 1) if student_channels != teacher_channels else None
        self.generation = nn.Sequential(
            nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1),
        )

    def forward(self, s, t, keep_mask):
        if self.align is not None:
            s = self.align(s)
        gen = self.generation(s * keep_mask)
        return self.alpha_mgd * F.mse_loss(gen, t.detach(), reduction="sum") / s.shape[0]
