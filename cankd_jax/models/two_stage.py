"""mmdetection's two-stage detector Faster R-CNN: `RPNHead`, `StandardRoIHead` with `Shared2FCBBoxHead`, and the
`FasterRCNN` module that joins them to a backbone and FPN (mmdet 3.x `faster-rcnn_r50_fpn_1x_coco`).

Submodule names are mmdet's state-dict keys (`rpn_head.rpn_conv`, `roi_head.bbox_head.shared_fcs.0`, ...), so an
mmdet checkpoint imports strictly (`interop.torch.import_state_dict`), and initialisation is mmdet's: the RPN's
convolutions N(0, 0.01), the box head's shared fully connected layers Xavier-uniform, its classifier N(0, 0.01)
and its regressor N(0, 0.001), every bias zero.

The module computes the networks only. Which RoIs the box head classifies is the caller's: in training the
sampled proposals and ground truths, at test time the RPN's proposals (`cankd_jax.detection.rpn`), each given
as `rois (R, 5)` rows `(image index, x1, y1, x2, y2)` in input pixels. Proposals and sampling are not
differentiated through, as in mmdet (its proposals are detached).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from cankd_jax.detection.roi_align import FINEST_SCALE, extract_roi_features
from cankd_jax.layers import Conv1x1, Dtype
from cankd_jax.models.conv import xavier_uniform
from cankd_jax.models.ops import check_nhwc
from cankd_jax.models.resnet import STAGES
from cankd_jax.models.trunk import _Pyramid

Array = jax.Array

normal_001 = nn.initializers.normal(0.01)


class RPNHead(nn.Module):
    """mmdet's `RPNHead` (one conv): per level `rpn_conv` (3x3 conv + bias, ReLU), then the 1x1 `rpn_cls`
    (one sigmoid objectness logit per anchor) and `rpn_reg` (delta-xywh per anchor), shared by every level.

    `__call__(levels, *, train) -> {'rpn_cls_scores': per level (B, H_l, W_l, A), 'rpn_bbox_preds': per level
    (B, H_l, W_l, A * 4)}`, channel `a` / `4 a + i` is anchor `a` (mmdet's order). `num_anchors=3`: scale 8,
    ratios 0.5, 1, 2. `train` is unused (no norm layers); it is taken for a uniform call.
    """

    feat_channels: int = 256
    num_anchors: int = 3
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feats: Sequence[Array], *, train: bool) -> dict[str, tuple[Array, ...]]:
        del train
        if not isinstance(feats, (list, tuple)) or not feats:
            raise ValueError(f"RPNHead: expected a non-empty list of NHWC levels, got {type(feats).__name__}")
        for i, x in enumerate(feats):
            check_nhwc(x, who=f"RPNHead level {i}")
        kw = dict(kernel_init=normal_001, bias_init=nn.initializers.zeros, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        rpn_conv = nn.Conv(self.feat_channels, (3, 3), padding=((1, 1), (1, 1)), name="rpn_conv", **kw)
        rpn_cls = Conv1x1(self.num_anchors, name="rpn_cls", **kw)
        rpn_reg = Conv1x1(self.num_anchors * 4, name="rpn_reg", **kw)
        cls_scores, bbox_preds = [], []
        for x in feats:
            x = nn.relu(rpn_conv(x))
            cls_scores.append(rpn_cls(x))
            bbox_preds.append(rpn_reg(x))
        return {"rpn_cls_scores": tuple(cls_scores), "rpn_bbox_preds": tuple(bbox_preds)}


class Shared2FCBBoxHead(nn.Module):
    """mmdet's `Shared2FCBBoxHead`: the RoI features flattened in PyTorch's (C, 7, 7) order, two fully connected
    layers with ReLU (`shared_fcs.0`, `shared_fcs.1`, `fc_out_channels` wide), then `fc_cls` (K + 1 softmax
    logits, background last) and `fc_reg` (class-specific deltas, `4 K`, or 4 with `reg_class_agnostic`).

    `(R, P, P, C) -> {'roi_cls_scores': (R, K + 1), 'roi_bbox_preds': (R, 4 K)}` float32.
    """

    num_classes: int
    fc_out_channels: int = 1024
    reg_class_agnostic: bool = False
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, roi_feats: Array, *, train: bool) -> dict[str, Array]:
        del train
        chex.assert_rank(roi_feats, 4)
        r, p, q, c = roi_feats.shape
        x = jnp.transpose(roi_feats, (0, 3, 1, 2)).reshape(r, c * p * q)  # mmdet's x.flatten(1) of (R, C, P, P)
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, bias_init=nn.initializers.zeros)
        for i in range(2):
            x = nn.relu(nn.Dense(self.fc_out_channels, kernel_init=xavier_uniform, name=f"shared_fcs.{i}",
                                 **dense)(x))
        cls = nn.Dense(self.num_classes + 1, kernel_init=normal_001, name="fc_cls", **dense)(x)
        reg_out = 4 if self.reg_class_agnostic else 4 * self.num_classes
        reg = nn.Dense(reg_out, kernel_init=nn.initializers.normal(0.001), name="fc_reg", **dense)(x)
        return {"roi_cls_scores": cls.astype(jnp.float32), "roi_bbox_preds": reg.astype(jnp.float32)}


class StandardRoIHead(nn.Module):
    """mmdet's `StandardRoIHead` (box branch): `SingleRoIExtractor` (RoIAlign `output_size` x `output_size`,
    `sampling_ratio=0`, `aligned=True`, on the first `len(strides)` levels, by `finest_scale`), then `bbox_head`.

    `__call__(levels, rois, *, train) -> bbox_head's outputs` (`roi_cls_scores`, `roi_bbox_preds`) for `rois (R,
    5)` rows `(image index, x1, y1, x2, y2)`, or `(B, M, 5)` image b's in row b (R = B M outputs, image-major):
    each image's RoIs then read its own maps only, so a batch split over devices needs no communication here.
    """

    bbox_head: nn.Module
    strides: tuple[int, ...] = (4, 8, 16, 32)
    finest_scale: float = FINEST_SCALE
    output_size: int = 7
    chunk: int = 64  # RoIs gathered at once by RoIAlign (memory, not results)

    @nn.compact
    def __call__(self, feats: Sequence[Array], rois: Array, *, train: bool) -> dict[str, Array]:
        if rois.ndim == 3:
            chex.assert_shape(rois, (feats[0].shape[0], None, 5))
        else:
            chex.assert_shape(rois, (None, 5))
        if len(feats) < len(self.strides):
            raise ValueError(f"StandardRoIHead: {len(feats)} levels for RoIAlign strides {self.strides}")
        roi_feats = extract_roi_features(feats[:len(self.strides)], rois, self.strides,
                                         output_size=self.output_size, finest_scale=self.finest_scale,
                                         chunk=self.chunk)
        roi_feats = roi_feats.reshape(-1, *roi_feats.shape[-3:])  # per-image RoIs: image-major, as (R, 5) rows
        return self.bbox_head(roi_feats, train=train)


class FasterRCNN(_Pyramid, nn.Module):
    """Faster R-CNN (mmdet 3.x `faster-rcnn_r50_fpn_1x_coco`): ResNet (`frozen_stages=1`, `norm_eval`), FPN (P2-P6,
    P6 by max-pool), `RPNHead`, `StandardRoIHead`; parameters under `backbone`, `neck`, `rpn_head`, `roi_head`.

    `__call__(images (B, H, W, 3), *, train, rois=None, roi_sampler=None) -> dict`: the trunk's features
    (`fpn.p2`..`fpn.p6`), the RPN's per-level `rpn_cls_scores` / `rpn_bbox_preds`, and the box head's
    `roi_cls_scores (R, K + 1)` and `roi_bbox_preds (R, 4 K)` for the RoIs `(R, 5)` (image index, x1, y1, x2, y2
    in input pixels; or `(B, M, 5)`, image b's in row b, which a data-parallel step should use: see
    `StandardRoIHead`) given as `rois`, or chosen by `roi_sampler` from the RPN's outputs (taken without their
    gradient, as mmdet detaches its proposals): `roi_sampler(rpn_outputs) -> (rois, extra)`, whose `extra`
    arrays join the outputs (the task's proposals or sampled targets: `DetectionTask.apply_kwargs`). With
    neither, the box head runs on no RoI (R = 0): its parameters exist, the call costs nothing.
    """

    backbone: nn.Module
    neck: nn.Module
    rpn_head: nn.Module
    roi_head: nn.Module
    in_features: tuple[str, ...] = STAGES

    def rpn_strides(self) -> tuple[int, ...]:
        """The anchors' strides: the pyramid's (4, 8, 16, 32, 64)."""
        return self.level_strides()

    @nn.compact
    def __call__(self, images: Array, *, train: bool, rois: Optional[Array] = None,
                 roi_sampler: Optional[Callable[[dict[str, Any]], tuple[Array, dict[str, Any]]]] = None
                 ) -> dict[str, Any]:
        out, pyramid = self._features(images, train)
        strides = tuple(self.roi_head.strides)
        if tuple(self.level_strides()[:len(strides)]) != strides:
            raise ValueError(f"FasterRCNN: the RoI head's strides {strides} are not the first pyramid levels' "
                             f"{self.level_strides()}")
        rpn = self.rpn_head(pyramid, train=train)
        extra: dict[str, Any] = {}
        if rois is not None and roi_sampler is not None:
            raise ValueError("FasterRCNN: give rois or a roi_sampler, not both")
        if roi_sampler is not None:
            rois, extra = roi_sampler(jax.lax.stop_gradient(rpn))
        if rois is None:
            rois = jnp.zeros((0, 5), jnp.float32)
        roi = self.roi_head(pyramid, rois, train=train)
        return {**out, **rpn, **roi, **extra}
