"""mmdetection's dense detection heads: RetinaNet's `RetinaHead` and FCOS's `FCOSHead`.

A head takes the neck's levels (a sequence of `(B, H_l, W_l, C)` maps, finest
first) and runs the same layers on every level: its parameters are shared
across levels, as in mmdet (only FCOS's per-level `Scale`s are not). It returns
a dict of per-level tuples of NHWC maps, the raw outputs of mmdet's
`forward()` with the channel axis last:

    PyTorch (B, A*K, H, W)  --permute(0, 2, 3, 1)-->  ours (B, H, W, A*K)

so channel `a*K + k` is anchor `a`, class `k`, exactly mmdet's order, and
`cankd_jax.detection.flatten_level_maps(cls_scores, K)` gives `(B, sum_l H_l*W_l*A, K)`
in mmdet's (location row-major, anchor, class) order, the order its losses and
`predict_by_feat` use after `permute(0, 2, 3, 1).reshape(B, -1, K)`.

Submodule names are mmdet's state-dict keys (`cls_convs.0.conv`,
`retina_cls`, `conv_centerness`, `scales.2`, with `.gn` for GroupNorm), and
initialisation is mmdet's: N(0, 0.01) conv weights, zero biases except the
classifier's, whose bias is `-log((1 - prior_prob) / prior_prob)` (focal
loss's prior, 0.01), GroupNorm weight 1 and bias 0, scales 1.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from cankd_jax.config_arg import is_count
from cankd_jax.layers import Dtype
from cankd_jax.models.conv import ConvModule
from cankd_jax.models.ops import check_nhwc

Array = jax.Array

head_normal_init = nn.initializers.normal(0.01)


def prior_bias(prior_prob: float) -> float:
    """mmcv's `bias_init_with_prob`: the logit bias whose sigmoid is `prior_prob`."""
    if not 0 < prior_prob < 1:
        raise ValueError(f"prior_prob must be in (0, 1) (the classifier's initial probability), got {prior_prob}")
    return float(-math.log((1.0 - prior_prob) / prior_prob))


class Scale(nn.Module):
    """mmcv's `Scale`: `x * scale`, one learnable scalar (`scale`, shape `()`, PyTorch's 0-d tensor)."""

    init_value: float = 1.0
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.constant(self.init_value), (), self.param_dtype)
        return x * scale.astype(x.dtype)


class _DenseHead(nn.Module):
    """The two towers of `stacked_convs` 3x3 ConvModules and the 3x3 predictors, shared by every level."""

    num_classes: int
    feat_channels: int = 256
    stacked_convs: int = 4
    prior_prob: float = 0.01
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        # A negative tower would build no convs at all and train without a word.
        if not is_count(self.stacked_convs, 0):
            raise ValueError(f"{type(self).__name__}: stacked_convs must be an integer >= 0, "
                             f"got {self.stacked_convs!r}")
        super().__post_init__()

    def _tower(self, branch: str, norm: Union[bool, str], num_groups: int, use_bias: Optional[bool]) -> list:
        return [ConvModule(self.feat_channels, 3, norm=norm, num_groups=num_groups, use_bias=use_bias,
                           kernel_init=head_normal_init, bias_init=nn.initializers.zeros,
                           dtype=self.dtype, param_dtype=self.param_dtype, name=f"{branch}_convs.{i}")
                for i in range(self.stacked_convs)]

    def _predictor(self, features: int, name: str, bias: float = 0.0) -> nn.Conv:
        return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), kernel_init=head_normal_init,
                       bias_init=nn.initializers.constant(bias), dtype=self.dtype, param_dtype=self.param_dtype,
                       name=name)

    @staticmethod
    def _run(layers: list, x: Array, train: bool) -> Array:
        for layer in layers:
            x = layer(x, train=train)
        return x

    def _check(self, feats: Sequence[Array], who: str) -> None:
        if not isinstance(feats, (list, tuple)) or not feats:
            raise ValueError(f"{who}: expected a non-empty list of NHWC levels, got {type(feats).__name__}")
        for i, x in enumerate(feats):
            check_nhwc(x, who=f"{who} level {i}")


class RetinaHead(_DenseHead):
    """mmdet's `RetinaHead`: per branch `stacked_convs` x (3x3 conv + bias, ReLU), then `retina_cls` / `retina_reg`.

    `__call__(levels, *, train) -> {'cls_scores': (...), 'bbox_preds': (...)}`,
    one entry per level: `cls_scores[l]` `(B, H_l, W_l, num_anchors * num_classes)`
    (sigmoid logits, focal loss), `bbox_preds[l]` `(B, H_l, W_l, num_anchors * 4)`
    (delta-xywh encodings), channels in mmdet's (anchor, class) order (see the
    module docstring). `num_anchors=9`: mmdet's default generator (octave base
    scale 4, 3 scales per octave, ratios 0.5, 1, 2). No norm in the towers
    (mmdet's `norm_cfg=None`), so the convs have biases. Keys: `cls_convs.{i}.conv`,
    `reg_convs.{i}.conv`, `retina_cls`, `retina_reg`.
    """

    num_anchors: int = 9

    @nn.compact
    def __call__(self, feats: Sequence[Array], *, train: bool) -> dict[str, tuple[Array, ...]]:
        self._check(feats, "RetinaHead")
        cls_convs = self._tower("cls", False, 1, None)
        reg_convs = self._tower("reg", False, 1, None)
        retina_cls = self._predictor(self.num_anchors * self.num_classes, "retina_cls", prior_bias(self.prior_prob))
        retina_reg = self._predictor(self.num_anchors * 4, "retina_reg")
        cls_scores, bbox_preds = [], []
        for x in feats:
            cls_scores.append(retina_cls(self._run(cls_convs, x, train)))
            bbox_preds.append(retina_reg(self._run(reg_convs, x, train)))
        return {"cls_scores": tuple(cls_scores), "bbox_preds": tuple(bbox_preds)}


class FCOSHead(_DenseHead):
    """mmdet's `FCOSHead` (3.x): GroupNorm towers, `conv_cls`, `conv_reg`, `conv_centerness`, per-level `Scale`.

    `__call__(levels, *, train) -> {'cls_scores', 'bbox_preds', 'centernesses'}`,
    tuples with one entry per level (`len(strides)` levels): `(B, H_l, W_l,
    num_classes)` sigmoid logits, `(B, H_l, W_l, 4)` distances (left, top,
    right, bottom) in float32, `(B, H_l, W_l, 1)` centerness logits.

    Per level l, as mmdet's `forward_single`: each branch is `stacked_convs` x
    (3x3 conv, GroupNorm(`num_groups`), ReLU); `cls_score = conv_cls(cls_feat)`;
    `centerness = conv_centerness(reg_feat if centerness_on_reg else cls_feat)`;
    `bbox = float32(scales[l](conv_reg(reg_feat)))`, then

    - `norm_on_bbox=True`: `bbox = max(bbox, 0)` (mmdet's `clamp(min=0)`), and
      in inference (`train=False`, PyTorch's `not self.training`) also
      `bbox * strides[l]`: distances in pixels at test time, in units of the
      level's stride in training (the regression targets are divided by it);
    - `norm_on_bbox=False` (mmdet's class default, and what mmdet's own
      `fcos_r50-caffe_fpn_gn-head_1x_coco` / R101 / X101 checkpoints were
      trained with): `bbox = exp(bbox)`, in pixels in both modes.

    Fields: `norm` `'gn'` (mmdet's `norm_cfg=dict(type='GN', num_groups=32)`)
    or False; `conv_bias` None is mmdet's `'auto'` (no tower-conv bias with a
    norm), True gives the towers biases (the "tricks" configs' `conv_bias=True`);
    `strides` the levels' strides (mmdet's config: 8, 16, 32, 64, 128).
    Keys: `cls_convs.{i}.conv`, `cls_convs.{i}.gn`, `reg_convs.{i}...`,
    `conv_cls`, `conv_reg`, `conv_centerness`, `scales.{l}.scale`.
    """

    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    norm: Union[bool, str] = "gn"
    num_groups: int = 32
    conv_bias: Optional[bool] = None
    norm_on_bbox: bool = False
    centerness_on_reg: bool = False

    @nn.compact
    def __call__(self, feats: Sequence[Array], *, train: bool) -> dict[str, tuple[Array, ...]]:
        self._check(feats, "FCOSHead")
        if len(feats) != len(self.strides):
            raise ValueError(f"FCOSHead: got {len(feats)} levels but strides={self.strides} (one Scale per level)")
        cls_convs = self._tower("cls", self.norm, self.num_groups, self.conv_bias)
        reg_convs = self._tower("reg", self.norm, self.num_groups, self.conv_bias)
        conv_cls = self._predictor(self.num_classes, "conv_cls", prior_bias(self.prior_prob))
        conv_reg = self._predictor(4, "conv_reg")
        conv_centerness = self._predictor(1, "conv_centerness")
        scales = [Scale(1.0, param_dtype=self.param_dtype, name=f"scales.{i}") for i in range(len(self.strides))]
        cls_scores, bbox_preds, centernesses = [], [], []
        for x, scale, stride in zip(feats, scales, self.strides):
            cls_feat = self._run(cls_convs, x, train)
            reg_feat = self._run(reg_convs, x, train)
            cls_scores.append(conv_cls(cls_feat))
            centernesses.append(conv_centerness(reg_feat if self.centerness_on_reg else cls_feat))
            bbox = scale(conv_reg(reg_feat)).astype(jnp.float32)
            if self.norm_on_bbox:
                bbox = nn.relu(bbox)
                if not train:
                    bbox = bbox * stride
            else:
                bbox = jnp.exp(bbox)
            bbox_preds.append(bbox)
        return {"cls_scores": tuple(cls_scores), "bbox_preds": tuple(bbox_preds),
                "centernesses": tuple(centernesses)}
