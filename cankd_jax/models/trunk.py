"""The detection trunk the paper's detectors share (a backbone followed by an FPN neck), and the
single-stage detectors built on it: RetinaNet and FCOS, mmdetection's layouts."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax

from cankd_jax.models.freeze import frozen_prefixes
from cankd_jax.models.resnet import STAGES

Array = jax.Array


def pyramid_level_names(backbone: nn.Module, neck: nn.Module, in_features: Sequence[str]) -> list[str]:
    """`fpn.p{k}` for each of the neck's outputs, finest first, where `2**k` is the level's stride."""
    strides = backbone.feature_strides()
    used = [strides[in_features[i]] for i in neck.used_levels(len(in_features))]
    if any(b != 2 * a for a, b in zip(used, used[1:])):
        raise ValueError(f"the FPN needs each input at twice the previous stride; "
                         f"{', '.join(in_features)} have strides {[strides[n] for n in in_features]}")
    first = int(math.log2(used[0]))
    return [f"fpn.p{first + i}" for i in range(neck.num_outs)]


class _Pyramid:
    """What a trunk and a detector share (a mixin of their modules, which hold `backbone`, `neck` and
    `in_features`): the frozen keys, the pyramid's level names and strides, and the forward pass up to it."""

    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the frozen backbone parameters."""
        return tuple("backbone." + p for p in frozen_prefixes(self.backbone))

    def level_names(self) -> list[str]:
        """Names of the neck's outputs, finest first."""
        return pyramid_level_names(self.backbone, self.neck, self.in_features)

    def level_strides(self) -> tuple[int, ...]:
        """Stride of each neck output (8, 16, 32, 64, 128 for P3-P7)."""
        return tuple(2 ** int(n[len("fpn.p"):]) for n in self.level_names())

    def _features(self, images: Array, train: bool) -> tuple[dict[str, Array], list[Array]]:
        """(the backbone's features and the pyramid by name, the pyramid's levels finest first)."""
        feats = dict(self.backbone(images, train=train))
        pyramid = list(self.neck([feats[n] for n in self.in_features], train=train))
        return {**feats, **dict(zip(self.level_names(), pyramid))}, pyramid


class DetectionTrunk(_Pyramid, nn.Module):
    """Backbone + `FPN`, the part of mmdet's detectors that CanKD distills.

    `__call__(images (B, H, W, 3), *, train) -> dict`: the backbone's features
    (`stem`, `layer1`..`layer4`, see `ResNet`) and the pyramid as
    `fpn.p{k}`, where `2**k` is the level's stride: with a ResNet and
    `start_level=0` the neck gives `fpn.p2` (stride 4) .. `fpn.p6`; RetinaNet's
    `start_level=1` gives `fpn.p3` .. `fpn.p7`. Each is `(B, ~H/2**k, ~W/2**k,
    out_channels)`. Parameters live under `backbone` and `neck` (mmdet's keys).

    A teacher that only provides features is a trunk: `checkpoint_prefixes()`
    makes `import_state_dict` read only a detector checkpoint's `backbone.*`
    and `neck.*` keys (strictly) and report the rest (`bbox_head.*`, ...) as
    `ignored`, so any mmdet detector's `.pth` (RetinaNet, FCOS, GFL, Faster
    R-CNN) loads into the trunk of the same backbone and neck.
    """

    backbone: nn.Module
    neck: nn.Module
    in_features: tuple[str, ...] = STAGES

    def checkpoint_prefixes(self) -> dict[str, str]:
        """The checkpoint keys `import_state_dict` reads by default: the backbone's and the neck's."""
        return {"backbone.": "backbone.", "neck.": "neck."}

    @nn.compact
    def __call__(self, images: Array, *, train: bool) -> dict[str, Array]:
        return self._features(images, train)[0]


class SingleStageDetector(_Pyramid, nn.Module):
    """mmdet's `SingleStageDetector`: backbone, FPN neck, dense head; parameters under `backbone`, `neck`,
    `bbox_head` (the whole mmdet checkpoint's keys).

    `__call__(images (B, H, W, 3), *, train) -> dict`: everything
    `DetectionTrunk` gives (backbone features, `fpn.p3`..`fpn.p7`) plus the
    head's raw per-level outputs as tuples, finest level first (`cls_scores`,
    `bbox_preds`, and FCOS's `centernesses`; see `RetinaHead` / `FCOSHead`).
    """

    backbone: nn.Module
    neck: nn.Module
    bbox_head: nn.Module
    in_features: tuple[str, ...] = STAGES

    def _check_head(self) -> None:
        """A head that is told its levels' strides (FCOS's, RepPoints') must be told the neck's."""
        strides: Optional[tuple[int, ...]] = getattr(self.bbox_head, "strides", None)
        if strides is not None and tuple(strides) != self.level_strides():
            raise ValueError(f"{type(self).__name__}: the head's strides {tuple(strides)} are not the neck levels' "
                             f"strides {self.level_strides()} ({', '.join(self.level_names())})")

    @nn.compact
    def __call__(self, images: Array, *, train: bool) -> dict[str, Array]:
        self._check_head()
        out, pyramid = self._features(images, train)
        head = self.bbox_head(pyramid, train=train)
        overlap = sorted(set(head) & set(out))
        if overlap:
            raise ValueError(f"{type(self).__name__}: head outputs {overlap} clash with backbone/neck feature names")
        return {**out, **head}


class RetinaNet(SingleStageDetector):
    """RetinaNet (mmdet 3.x `retinanet_r50_fpn_1x_coco`): ResNet (`frozen_stages=1`, `norm_eval`), FPN
    (`start_level=1`, `add_extra_convs='on_input'`, P3-P7), `RetinaHead` (9 anchors per location).

    Outputs: the trunk's features, `cls_scores` (per level `(B, H_l, W_l, 9 * K)`)
    and `bbox_preds` (per level `(B, H_l, W_l, 9 * 4)`), in mmdet's channel
    order (`cankd_jax.detection.flatten_level_maps` gives `(B, sum H_l W_l 9, K)`).
    """


class FCOS(SingleStageDetector):
    """FCOS (mmdet 3.x `fcos_r50-caffe_fpn_gn-head_1x_coco`): caffe-style ResNet with frozen BatchNorm, FPN
    (`start_level=1`, `add_extra_convs='on_output'`, `relu_before_extra_convs`, P3-P7), `FCOSHead` (GroupNorm
    towers, per-level `Scale`).

    Outputs: the trunk's features, `cls_scores` `(B, H_l, W_l, K)`, `bbox_preds`
    `(B, H_l, W_l, 4)` (float32; see `FCOSHead` for `norm_on_bbox`) and
    `centernesses` `(B, H_l, W_l, 1)` per level. The head's `strides` must be
    the neck levels' strides (checked).
    """
