"""mmdetection 3.x's RepPoints detector: `RepPointsHead` (moment transform, centre init) on a backbone + FPN.

The head runs per level, with parameters shared across levels (mmdet's keys):

    cls_feat = cls_convs(x)        stacked_convs x (3x3 conv, GroupNorm, ReLU)        `cls_convs.{i}.conv/.gn`
    pts_feat = reg_convs(x)        the same                                            `reg_convs.{i}...`
    pts_init = reppoints_pts_init_out(relu(reppoints_pts_init_conv(pts_feat)))         (B, H, W, 2n), y first
    offset   = gradient_mul-scaled pts_init - the 3x3 kernel's own grid (y, x)          the points as DCN offsets
    cls      = reppoints_cls_out(relu(reppoints_cls_conv(cls_feat, offset)))           deformable 3x3 over the points
    pts_ref  = reppoints_pts_refine_out(relu(reppoints_pts_refine_conv(pts_feat, offset))) + stop_gradient(pts_init)

`gradient_mul` (0.1) scales the gradient that reaches `pts_init` through the deformable convs, not its value.
Training returns the raw point sets (`pts_preds_init`, `pts_preds_refine`, in units of the level's stride
around the location) and the head's `moment_transfer` (2,) mixed as mmdet mixes it (`moment_mul` of the gradient);
inference returns `bbox_preds`, the refined sets' moment boxes (x1, y1, x2, y2) in strides around the location
(`cankd_jax.detection.reppoints` decodes and scores them). Initialisation is mmdet's: N(0, 0.01) conv weights
(the deformable convs keep mmcv's kaiming-uniform), zero biases, the classifier's bias at the 0.01 prior,
`moment_transfer` 0.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cankd_jax.detection.reppoints import points_to_boxes
from cankd_jax.layers import Conv1x1, rounded
from cankd_jax.models.deform_conv import DeformConv2d
from cankd_jax.models.dense_heads import _DenseHead, head_normal_init, prior_bias
from cankd_jax.models.trunk import SingleStageDetector

Array = jax.Array


class RepPointsHead(_DenseHead):
    """mmdet's `RepPointsHead` (`transform_method='moment'`, `center_init=True`, `use_grid_points=False`).

    `__call__(levels, *, train) -> dict` with one entry per level in each tuple:
      train: `cls_scores` `(B, H_l, W_l, K)` logits, `pts_preds_init` / `pts_preds_refine` `(B, H_l, W_l, 2n)`
        float32 (y, x) offsets in strides, and `moment_transfer` `(2,)`;
      inference: `cls_scores` and `bbox_preds` `(B, H_l, W_l, 4)` float32 boxes in strides around the location.
    Fields: `num_points` (an odd square: the deformable kernel is sqrt(n) x sqrt(n)), `point_feat_channels`,
    `gradient_mul`, `moment_mul`, `strides` (the levels', for the detector's check), `norm` / `num_groups` of
    the towers (mmdet's GroupNorm configs: 'gn', 32), `stacked_convs` (3).
    """

    stacked_convs: int = 3
    point_feat_channels: int = 256
    num_points: int = 9
    gradient_mul: float = 0.1
    moment_mul: float = 0.01
    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    norm: Union[bool, str] = "gn"
    num_groups: int = 32

    def __post_init__(self):
        k = int(math.isqrt(self.num_points))
        if k * k != self.num_points or k % 2 == 0:
            raise ValueError(f"RepPointsHead: num_points must be an odd square (the deformable kernel is "
                             f"sqrt(n) x sqrt(n)), got {self.num_points}")
        super().__post_init__()

    @property
    def dcn_kernel(self) -> int:
        return int(math.isqrt(self.num_points))

    def base_offset(self) -> np.ndarray:
        """The deformable kernel's own sampling grid, (y, x) per tap, row-major: `(2n,)` (mmdet's `dcn_base_offset`)."""
        k = self.dcn_kernel
        base = np.arange(-(k // 2), k // 2 + 1, dtype=np.float64)
        return np.stack([np.repeat(base, k), np.tile(base, k)], 1).reshape(-1).astype(np.float32)

    def _conv1x1(self, features: int, name: str, bias: float = 0.0) -> Conv1x1:
        return Conv1x1(features, kernel_init=head_normal_init, bias_init=nn.initializers.constant(bias),
                       dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    @nn.compact
    def __call__(self, feats: Sequence[Array], *, train: bool) -> dict[str, tuple[Array, ...]]:
        self._check(feats, "RepPointsHead")
        if len(feats) != len(self.strides):
            raise ValueError(f"RepPointsHead: got {len(feats)} levels but strides={self.strides}")
        k, pad = self.dcn_kernel, self.dcn_kernel // 2
        cls_convs = self._tower("cls", self.norm, self.num_groups, None)
        reg_convs = self._tower("reg", self.norm, self.num_groups, None)
        dcn = lambda name: DeformConv2d(self.point_feat_channels, k, padding=pad, dtype=self.dtype,  # noqa: E731
                                        name=name)
        cls_conv, refine_conv = dcn("reppoints_cls_conv"), dcn("reppoints_pts_refine_conv")
        cls_out = self._conv1x1(self.num_classes, "reppoints_cls_out", prior_bias(self.prior_prob))
        init_conv = nn.Conv(self.point_feat_channels, (3, 3), padding=((1, 1), (1, 1)), kernel_init=head_normal_init,
                            bias_init=nn.initializers.zeros, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="reppoints_pts_init_conv")
        init_out = self._conv1x1(2 * self.num_points, "reppoints_pts_init_out")
        refine_out = self._conv1x1(2 * self.num_points, "reppoints_pts_refine_out")
        moment = self.param("moment_transfer", nn.initializers.zeros, (2,), self.param_dtype)
        # mmdet: moment * moment_mul + moment.detach() * (1 - moment_mul): the value, with moment_mul of the gradient
        moment = moment * self.moment_mul + jax.lax.stop_gradient(moment) * (1 - self.moment_mul)
        base = jnp.asarray(self.base_offset())

        cls_scores, pts_init, pts_refine = [], [], []
        for x in feats:
            cls_feat = self._run(cls_convs, x, train)
            pts_feat = self._run(reg_convs, x, train)
            p_init = init_out(nn.relu(init_conv(pts_feat))).astype(jnp.float32)
            # each product `rounded`: the sum is the deformable convs' offset, which they floor (layers.rounded)
            scaled = (rounded((1 - self.gradient_mul) * jax.lax.stop_gradient(p_init))
                      + rounded(self.gradient_mul * p_init))
            offset = scaled - base
            cls_scores.append(cls_out(nn.relu(cls_conv(cls_feat, offset))))
            p_refine = refine_out(nn.relu(refine_conv(pts_feat, offset))).astype(jnp.float32)
            pts_init.append(p_init)
            pts_refine.append(p_refine + jax.lax.stop_gradient(p_init))
        if train:
            return {"cls_scores": tuple(cls_scores), "pts_preds_init": tuple(pts_init),
                    "pts_preds_refine": tuple(pts_refine), "moment_transfer": moment}
        return {"cls_scores": tuple(cls_scores),
                "bbox_preds": tuple(points_to_boxes(p, moment) for p in pts_refine)}


class RepPoints(SingleStageDetector):
    """mmdet's `RepPointsDetector` (`reppoints-moment_r50_fpn-gn_head-gn_*_coco`): ResNet (`frozen_stages=1`,
    `norm_eval`), FPN with GroupNorm (`start_level=1`, `add_extra_convs='on_input'`, P3-P7), `RepPointsHead`.
    The X101-DCN teacher (`reppoints-moment_x101-dconv-c3-c5_fpn-gn_head-gn_2x_coco`) is the same with backbone
    `resnext101_32x4d_dcn`. Outputs: the trunk's features and the head's (see `RepPointsHead`); the head's
    `strides` must be the neck levels' (checked)."""
