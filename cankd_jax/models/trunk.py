"""The detection trunk the paper's detectors share: a backbone followed by an FPN neck."""

from __future__ import annotations

import math

import flax.linen as nn
import jax

from cankd_jax.models.freeze import frozen_prefixes
from cankd_jax.models.resnet import STAGES

Array = jax.Array


class DetectionTrunk(nn.Module):
    """Backbone + `FPN`, the part of mmdet's detectors that CanKD distills.

    `__call__(images (B, H, W, 3), *, train) -> dict`: the backbone's features
    (`stem`, `layer1`..`layer4`, see `ResNet`) and the pyramid as
    `fpn.p{k}`, where `2**k` is the level's stride: with a ResNet and
    `start_level=0` the neck gives `fpn.p2` (stride 4) .. `fpn.p6`; RetinaNet's
    `start_level=1` gives `fpn.p3` .. `fpn.p7`. Each is `(B, ~H/2**k, ~W/2**k,
    out_channels)`. Parameters live under `backbone` and `neck` (mmdet's keys).
    """

    backbone: nn.Module
    neck: nn.Module
    in_features: tuple[str, ...] = STAGES

    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the frozen backbone stages."""
        return tuple("backbone." + p for p in frozen_prefixes(self.backbone))

    def level_names(self) -> list[str]:
        """Names of the neck's outputs, finest first."""
        strides = self.backbone.feature_strides()
        used = [strides[self.in_features[i]] for i in self.neck.used_levels(len(self.in_features))]
        if any(b != 2 * a for a, b in zip(used, used[1:])):
            raise ValueError(f"DetectionTrunk: the FPN needs each input at twice the previous stride; "
                             f"{', '.join(self.in_features)} have strides {[strides[n] for n in self.in_features]}")
        first = int(math.log2(used[0]))
        return [f"fpn.p{first + i}" for i in range(self.neck.num_outs)]

    @nn.compact
    def __call__(self, images: Array, *, train: bool) -> dict[str, Array]:
        feats = dict(self.backbone(images, train=train))
        pyramid = self.neck([feats[n] for n in self.in_features], train=train)
        return {**feats, **dict(zip(self.level_names(), pyramid))}
