"""The CanKD loss: the student's feature map attends to the teacher's.

One `CanKDLoss` per distilled feature level. For student `S` and teacher `T`,
both `(B, H, W, C)`, with `Ci = inter_channels`, P = H*W and N the pooled
teacher positions:

    q = theta(S)            (B, P, Ci)   1x1 conv with bias
    k = pool(phi(T))        (B, N, Ci)   1x1 conv, then 2x2 max-pool
    v = pool(g(T))          (B, N, Ci)
    Y = (q k^T / N) v       (B, H, W, Ci)  -- no softmax in the main ('dot') form
    Z = BN(W(Y)) + S        (B, H, W, C)   BN scale and bias start at zero
    loss = loss_weight * mean((IN(Z) - IN(T))^2) / 2

The teacher side is not transformed and gets no gradient. The BN runs on batch
statistics whenever `train=True` (its running statistics are updated but only
used with `train=False`). Parameter names follow the official PyTorch module
(`NLKD_IN_Loss`) so `cankd_jax.interop.torch.load_cankd_loss` maps keys 1:1.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cankd_jax.compute import float_dtype
from cankd_jax.config_arg import is_count
from cankd_jax.layers import (
    BatchNorm, Conv1x1, dense_nhwc, instance_norm, max_pool_2x2, resize_bilinear, torch_bias_init, torch_kernel_init,
)
from cankd_jax.losses import attention as attn
from cankd_jax.losses.checks import check_choice, check_feature_pair
from cankd_jax.models.deform_conv import DeformConv2dPack

Array = jax.Array
ATTENTIONS = ("dot", "embedded_gaussian", "gaussian", "concatenation")
# theta, phi, g and W as 1x1 convs (the paper's CanKD), or as mmcv's DeformConv2dPack: 3x3 for theta, phi and g,
# 1x1 for W, none with a bias (the authors' DCN_NLKD_Loss, the paper's deformable ablation).
PROJECTIONS = ("conv", "deform")


def default_inter_channels(in_channels: int) -> int:
    """The reference's `inter_channels`: C // 2, and 1 where that is 0."""
    return max(in_channels // 2, 1)


class _ConcatScores(nn.Module):
    """The concatenation form's conv over `[q_i, k_j]` (1x1, 2*Ci -> 1, no bias), split in two.

    Because the conv is linear before its ReLU, w.[q_i, k_j] = w_q.q_i + w_k.k_j,
    so it is applied to queries and keys separately: `(B,P,Ci),(B,N,Ci) -> (B,P),(B,N)`.
    """

    @nn.compact
    def __call__(self, q: Array, k: Array) -> tuple[Array, Array]:
        ci = q.shape[-1]
        w = self.param("kernel", torch_kernel_init, (2 * ci, 1), jnp.float32).astype(q.dtype)
        return q @ w[:ci, 0], k @ w[ci:, 0]


class _Conv1x1Params(nn.Module):
    """The parameters of a `Conv1x1` (same names and init) without applying it, for fused projections."""

    features: int

    @nn.compact
    def __call__(self, c_in: int) -> tuple[Array, Array]:
        kernel = self.param("kernel", torch_kernel_init, (c_in, self.features), jnp.float32)
        return kernel, self.param("bias", torch_bias_init(c_in), (self.features,), jnp.float32)


class NonLocalBlock(nn.Module):
    """Non-local operation: queries from `x`, keys and values from `context`.

    `x`, `context`: `(B, H, W, C)` -> `(B, H, W, C)`, float32 with `skip` or `bn_layer`. CanKD calls it
    with (student, teacher); the self-attention baseline with (x, x).
    """

    in_channels: int
    inter_channels: int
    sub_sample: bool = True
    bn_layer: bool = True
    attention: str = "dot"
    skip: bool = True
    impl: str = "efficient"
    query_block: int = 1024
    projection: str = "conv"
    dtype: Optional[Any] = None

    @nn.compact
    def __call__(self, x: Array, context: Array, *, train: bool) -> Array:
        b, h, w, c = x.shape
        ci = self.inter_channels
        pool = max_pool_2x2 if self.sub_sample else (lambda y: y)
        conv = lambda name: Conv1x1(ci, dtype=self.dtype, name=name)  # noqa: E731
        deform = self.projection == "deform"

        if deform:
            # Each deformable conv predicts its own offsets from its input, so phi and g cannot share one matmul.
            dcn = lambda name: DeformConv2dPack(ci, 3, padding=1, dtype=self.dtype, name=name)  # noqa: E731
            q, k, v = dcn("theta")(x), pool(dcn("phi")(context)), pool(dcn("g")(context))
        elif self.attention == "gaussian":  # raw maps, no theta/phi
            v = pool(conv("g")(context))
            q, k = x.astype(v.dtype), pool(context).astype(v.dtype)
        else:
            q = conv("theta")(x)
            # phi and g read the same map: one matmul with 2*Ci outputs and one pool.
            (phi_k, phi_b), (g_k, g_b) = _Conv1x1Params(ci, name="phi")(c), _Conv1x1Params(ci, name="g")(c)
            kv = pool(dense_nhwc(context, jnp.concatenate([phi_k, g_k], 1), jnp.concatenate([phi_b, g_b]), dtype=self.dtype))
            k, v = kv[..., :ci], kv[..., ci:]
        q, k, v = q.reshape(b, h * w, -1), k.reshape(b, -1, k.shape[-1]), v.reshape(b, -1, ci)

        if self.attention == "dot":
            y = attn.dot_attention(q, k, v, impl=self.impl)
            if self.impl == "quadratic":
                # The literal (B, P, N) matrix, kept only when the caller makes 'intermediates' mutable (tests, viz).
                self.sow("intermediates", "attention", attn.dot_attention_matrix(q, k))
        elif self.attention == "concatenation":
            a, s = _ConcatScores(name="concat_project")(q, k)
            y = attn.concat_attention(a, s, v, impl=self.impl)
        else:  # embedded_gaussian, gaussian
            y = attn.softmax_attention(q, k, v, impl=self.impl, query_block=self.query_block)
        y = y.reshape(b, h, w, ci)

        if self.bn_layer:
            wy = (DeformConv2dPack(c, 1, dtype=self.dtype, name="W") if deform else Conv1x1(c, dtype=self.dtype, name="W"))(y)
            zeros = nn.initializers.zeros
            # Float32 out: Z = BN(W(Y)) + S is what the instance norm takes its statistics of, so the sum is
            # formed in float32 even when the convs and the attention compute in bfloat16.
            wy = BatchNorm(scale_init=zeros, bias_init=zeros, dtype=jnp.float32, name="W_bn")(
                wy, use_running_average=not train)
        else:
            zeros = nn.initializers.zeros
            wy = Conv1x1(c, kernel_init=zeros, bias_init=zeros, dtype=self.dtype, name="W")(y)
        if not self.skip:
            return wy
        return wy.astype(jnp.float32) + x.astype(jnp.float32)


def matching_loss(z_s: Array, z_t: Array, *, loss_weight: float, instance_norm_: bool) -> Array:
    """loss_weight * mean((IN(z_s) - IN(z_t))^2) / 2 over every element (float32 scalar)."""
    if instance_norm_:
        z_s, z_t = instance_norm(z_s), instance_norm(z_t)
    d = z_s.astype(jnp.float32) - z_t.astype(jnp.float32)
    return loss_weight * jnp.mean(jnp.square(d)) / 2.0


class _NonLocalLossBase(nn.Module):
    """Fields and checks shared by CanKD and the self-attention baseline."""

    in_channels: int
    inter_channels: Optional[int] = None
    sub_sample: bool = True
    bn_layer: bool = True
    loss_weight: float = 1.0
    attention: str = "dot"
    instance_norm: bool = True
    skip: bool = True
    impl: str = "efficient"
    query_block: int = 1024
    projection: str = "conv"
    dtype: Optional[Any] = None

    def __post_init__(self):
        name = type(self).__name__
        check_choice(self.attention, ATTENTIONS, field="attention", loss=name)
        check_choice(self.impl, attn.IMPLS, field="impl", loss=name)
        check_choice(self.projection, PROJECTIONS, field="projection", loss=name)
        if self.projection == "deform" and (self.attention != "dot" or not self.bn_layer):
            raise ValueError(f"{name}: projection='deform' is the authors' DCN_NLKD_Loss, which has the dot form "
                             f"and W followed by BatchNorm only; got attention={self.attention!r}, "
                             f"bn_layer={self.bn_layer}")
        if not is_count(self.in_channels, 1):
            raise ValueError(f"{name}: in_channels must be a positive integer, got {self.in_channels!r}")
        if self.inter_channels is not None and not is_count(self.inter_channels, 1):
            raise ValueError(f"{name}: inter_channels must be a positive integer or None, got {self.inter_channels!r}")
        if not is_count(self.query_block, 1):
            raise ValueError(f"{name}: query_block must be a positive integer, got {self.query_block!r}")
        if self.dtype is not None and float_dtype(self.dtype) is None:
            raise ValueError(f"{name}: dtype must be a float dtype (e.g. 'bfloat16') or None, got {self.dtype!r}")
        super().__post_init__()

    @property
    def effective_weight(self) -> float:
        """The factor on the plain MSE: the reference halves it, so 10 in a config means 5."""
        return self.loss_weight / 2.0

    @property
    def ci(self) -> int:
        return self.inter_channels or default_inter_channels(self.in_channels)

    def _block(self, name: str) -> NonLocalBlock:
        return NonLocalBlock(
            in_channels=self.in_channels,
            inter_channels=self.ci,
            sub_sample=self.sub_sample,
            bn_layer=self.bn_layer,
            attention=self.attention,
            skip=self.skip,
            impl=self.impl,
            query_block=self.query_block,
            projection=self.projection,
            dtype=self.dtype,
            name=name,
        )

    def _check(self, student: Array, teacher: Array) -> None:
        name = type(self).__name__
        check_feature_pair(student, teacher, loss=name, in_channels=self.in_channels)
        h, w = student.shape[1:3]
        if self.sub_sample and (h < 2 or w < 2):
            raise ValueError(
                f"{name}: spatial size {(h, w)} is too small for the 2x2 max-pool of sub_sample=True; "
                "use a larger feature map or sub_sample=False"
            )

    def _match(self, z_s: Array, z_t: Array) -> Array:
        return matching_loss(z_s, z_t, loss_weight=self.loss_weight, instance_norm_=self.instance_norm)


class CanKDLoss(_NonLocalLossBase):
    """CanKD: cross-attention non-local distillation for one feature level.

    Call: `loss.apply(variables, student, teacher, train=True, mutable=['batch_stats'])`
    with NHWC `student`, `teacher` of the same shape `(B, H, W, in_channels)`
    (lift a narrower student with `Connector` first). Returns a float32 scalar.

    Fields (reference defaults):
      in_channels: C.
      inter_channels: Ci; None means C // 2 (at least 1).
      sub_sample: 2x2 max-pool (stride 2, VALID) after phi and g.
      bn_layer: W is conv + BatchNorm with zero-initialised scale and bias, so
        at initialisation the block is the identity; False: a bare conv
        initialised to zero.
      loss_weight: multiplies the MSE, which the reference already halves: the
        paper's configs use 10, an effective weight of 5 (`effective_weight`).
      attention: 'dot' (the paper's), 'embedded_gaussian', 'gaussian',
        'concatenation' (the ablations).
      instance_norm: instance-normalise both maps before the MSE.
      skip: add the student map to the block output (Z = BN(W(Y)) + S).
      impl: 'efficient' never forms the P x N attention matrix; 'quadratic' is
        the literal order (for parity tests).
      query_block: queries per block for the softmax forms.
      projection: 'conv' (1x1 convs with bias, the paper's CanKD) or 'deform'
        (the authors' `DCN_NLKD_Loss`: theta, phi and g are 3x3
        `DeformConv2dPack`s, W a 1x1 one, all without bias; dot form with
        bn_layer only).
      dtype: computation dtype of the convs and attention (None: the inputs').
        With bfloat16 the 1x1 convs and the attention's matmuls run in
        bfloat16 (the small k^T v product accumulates and is kept in float32);
        the BatchNorm statistics, the residual sum, the instance norms and the
        MSE are float32. Parameters are float32 either way.
    """

    @nn.compact
    def __call__(self, student: Array, teacher: Array, *, train: bool) -> Array:
        student = self._align(student, teacher)
        self._check(student, teacher)
        teacher = jax.lax.stop_gradient(teacher)
        z_s = self._block("non_local_att")(student, teacher, train=train)
        return self._match(z_s, teacher)

    def _align(self, student: Array, teacher: Array) -> Array:
        return student


class CanKDAlignLoss(CanKDLoss):
    """The authors' `NLKD_IN_align_Loss`: CanKD for a teacher map of another spatial size than the student's.

    The student map `(B, h, w, C)` is first resized to the teacher's `(B, H, W, C)` by bilinear interpolation
    with half-pixel centres (`F.interpolate(mode='bilinear', align_corners=False)`, the reference's call),
    then everything is `CanKDLoss`'s: the same fields, block, parameters (`non_local_att`) and initialisation.
    Their Swin -> RetinaNet config pairs the teacher's P2-P5 with the student's P3-P6, so the student map is
    upsampled 2x; maps of the same size pass through unchanged, as in the reference. The gradient reaches
    the student through the resize.
    """

    def _align(self, student: Array, teacher: Array) -> Array:
        check_feature_pair(student, teacher, loss=type(self).__name__, in_channels=self.in_channels,
                           same_spatial=False)
        return resize_bilinear(student, teacher.shape[1:3])


class SelfNonLocalLoss(_NonLocalLossBase):
    """The self-attention non-local distillation baseline that CanKD argues against.

    Each network's map attends to itself through its own non-local block
    (`student_non_local`, `teacher_non_local`, both trained; the teacher map
    itself gets no gradient), then the two outputs are matched with the same
    (instance-normalised) MSE as CanKD. Same fields and call as `CanKDLoss`.
    """

    @nn.compact
    def __call__(self, student: Array, teacher: Array, *, train: bool) -> Array:
        self._check(student, teacher)
        teacher = jax.lax.stop_gradient(teacher)
        z_s = self._block("student_non_local")(student, student, train=train)
        z_t = self._block("teacher_non_local")(teacher, teacher, train=train)
        return self._match(z_s, z_t)
