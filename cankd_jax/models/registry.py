"""Networks chosen by name, so a config names a model instead of a code path.

    make_model("resnet101_v1c_d8")                                   # a backbone
    make_model("resnet18", num_classes=1000)                         # a classifier
    make_model("pspnet", backbone="resnet18_v1c_d8", num_classes=19) # a segmenter
    make_model("deeplabv3", backbone="mobilenet_v2_d8", num_classes=19)
    make_model("swin_small")                                         # a Swin backbone
    make_model("fpn", backbone="resnet50")                           # a detection trunk
    make_model("fpn", backbone="swin_small")                         # Mask R-CNN Swin-S's backbone + neck
    make_model("retinanet", backbone="resnet50", num_classes=80)     # a detector
    make_model("fcos", backbone="resnet50_caffe", num_classes=80)
    make_model("faster_rcnn", backbone="resnet50", num_classes=80)  # a two-stage detector
    make_model("dino", backbone="resnet50", num_classes=80)          # DINO-4scale
    make_model("channel_mapper", backbone="resnet101")               # DINO R101's backbone + neck
    make_model("dino_5scale", backbone="swin_large_384", num_classes=80)  # DINO-5scale Swin-L

`make_network(cfg, num_classes=...)` does the same from a config block.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from cankd_jax.compute import float_dtype, remat_policy
from cankd_jax.config_arg import is_count
from cankd_jax.models.channel_mapper import ChannelMapper
from cankd_jax.models.dense_heads import FCOSHead, RetinaHead
from cankd_jax.models.dino import DINO
from cankd_jax.models.foreign import make_foreign
from cankd_jax.models.fpn import FPN
from cankd_jax.models.freeze import frozen_prefixes, param_labels
from cankd_jax.models.heads import ASPPHead, FCNHead, PSPHead
from cankd_jax.models.mobilenet_v2 import MobileNetV2
from cankd_jax.models.resnet import ARCHITECTURES, STAGES, ResNet
from cankd_jax.models.segmenter import Segmenter
from cankd_jax.models.swin import SWIN_PRESETS, SwinTransformer
from cankd_jax.models.trunk import FCOS, DetectionTrunk, RetinaNet, pyramid_level_names
from cankd_jax.models.reppoints import RepPoints, RepPointsHead
from cankd_jax.models.two_stage import FasterRCNN, RPNHead, Shared2FCBBoxHead, StandardRoIHead

PyTree = Any
_D8 = dict(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))
_DCN_C3_C5 = dict(dcn="DCN", stage_with_dcn=(False, True, True, True))


def _backbone_presets() -> dict[str, dict[str, Any]]:
    presets: dict[str, dict[str, Any]] = {}
    for depth, (kind, _) in ARCHITECTURES.items():
        presets[f"resnet{depth}"] = dict(depth=depth)
        presets[f"resnet{depth}_v1c"] = dict(depth=depth, deep_stem=True)
        presets[f"resnet{depth}_v1c_d8"] = dict(depth=depth, deep_stem=True, **_D8)
        if kind == "bottleneck":
            # mmdet's FCOS backbones: style='caffe', norm_cfg=dict(type='BN', requires_grad=False), norm_eval=True.
            presets[f"resnet{depth}_caffe"] = dict(depth=depth, style="caffe", norm_requires_grad=False, norm_eval=True)
            # mmdet's `-dconv-c3-c5`: dcn=dict(type='DCN', deform_groups=1, fallback_on_stride=False) in c3-c5.
            presets[f"resnet{depth}_dcn"] = dict(depth=depth, **_DCN_C3_C5)
    for groups in (32, 64):
        presets[f"resnext101_{groups}x4d"] = dict(depth=101, groups=groups, width_per_group=4)
        presets[f"resnext101_{groups}x4d_dcn"] = dict(depth=101, groups=groups, width_per_group=4, **_DCN_C3_C5)
    # mmseg's MobileNetV2: its defaults, and the output-stride-8 setting of `deeplabv3_m-v2-d8` & co.
    presets["mobilenet_v2"] = {}
    presets["mobilenet_v2_d8"] = dict(strides=(1, 2, 2, 1, 1, 1, 1), dilations=(1, 1, 1, 2, 2, 4, 4))
    presets.update(SWIN_PRESETS)
    return presets


BACKBONES: dict[str, dict[str, Any]] = _backbone_presets()
# The class each backbone name builds (ResNet unless listed).
BACKBONE_TYPES: dict[str, type[nn.Module]] = {"mobilenet_v2": MobileNetV2, "mobilenet_v2_d8": MobileNetV2,
                                              **{name: SwinTransformer for name in SWIN_PRESETS}}
SEGMENTATION_HEADS: dict[str, type[nn.Module]] = {"fcn": FCNHead, "deeplabv3": ASPPHead, "pspnet": PSPHead}
# Necks by detector: Faster R-CNN's, Mask R-CNN's and Cascade (Mask) R-CNN's (P2-P6, P6 by max-pool; `fpn` and its three names
# by detector), RetinaNet's (P3-P7 by convs on C5), FCOS's (P3-P7 by
# convs on P5, ReLU before P7's), GFL's / ATSS's (P3-P7 by convs on P5, no ReLU).
TRUNKS: dict[str, dict[str, Any]] = {
    "fpn": {},
    "faster_rcnn_fpn": {},
    "cascade_rcnn_fpn": {},
    "mask_rcnn_fpn": {},
    "retinanet_fpn": dict(start_level=1, add_extra_convs="on_input"),
    "fcos_fpn": dict(start_level=1, add_extra_convs="on_output", relu_before_extra_convs=True),
    "gfl_fpn": dict(start_level=1, add_extra_convs="on_output"),
    "reppoints_fpn": dict(start_level=1, add_extra_convs="on_input", norm="gn"),  # norm_cfg=dict(type='GN', 32)
    # DINO's (and Deformable DETR's): C3-C5 by 1x1 conv + GroupNorm, a fourth level by a 3x3 stride-2 conv on C5
    "channel_mapper": {},
    # DINO-5scale's: all four Swin stages and a fifth level by a 3x3 stride-2 conv on the last
    "channel_mapper_5scale": dict(num_outs=5),
}
# The neck class and the backbone stages it reads, for the trunks that are not an FPN on layer1..layer4.
TRUNK_NECKS: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {"channel_mapper": (ChannelMapper, STAGES[1:]),
                                                                   "channel_mapper_5scale": (ChannelMapper, STAGES)}


def trunk_neck(trunk: str) -> tuple[type[nn.Module], tuple[str, ...]]:
    """(the neck class, the backbone stages it reads) of a `TRUNKS` name: an FPN on layer1..layer4 unless listed
    in `TRUNK_NECKS`."""
    return TRUNK_NECKS.get(trunk, (FPN, STAGES))


@dataclasses.dataclass(frozen=True)
class DetectorSpec:
    """How a detector name is built: its class, neck preset, head class and the head fields its configs set;
    a two-stage detector's `head` is its RPN head and `roi_head` its box head (inside a `StandardRoIHead`)."""

    cls: type[nn.Module]
    trunk: str
    head: Optional[type[nn.Module]]  # None: the detector builds its own head from `head_kwargs` (DINO)
    backbone: str
    head_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    roi_head: Optional[type[nn.Module]] = None
    backbone_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)


DETECTORS: dict[str, DetectorSpec] = {
    "retinanet": DetectorSpec(RetinaNet, "retinanet_fpn", RetinaHead, "resnet50"),
    # The authors' FCOS student (nlkdIN_fcos_r101_fcos_r50_2x_coco.py): norm_on_bbox=True, centerness on the
    # classification branch, a bias on every tower conv beside its GroupNorm. mmdet's own
    # fcos_r50-caffe_fpn_gn-head_1x_coco (and its R101 / X101 checkpoints) use norm_on_bbox=False and
    # conv_bias='auto' (no tower bias): pass head_kwargs=dict(norm_on_bbox=False, conv_bias=None) for those.
    "fcos": DetectorSpec(FCOS, "fcos_fpn", FCOSHead, "resnet50_caffe",
                         dict(norm_on_bbox=True, centerness_on_reg=False, conv_bias=True)),
    "faster_rcnn": DetectorSpec(FasterRCNN, "fpn", RPNHead, "resnet50", roi_head=Shared2FCBBoxHead),
    # reppoints-moment_r50_fpn-gn_head-gn_2x_coco (the student) and its x101-dconv-c3-c5 teacher
    "reppoints": DetectorSpec(RepPoints, "reppoints_fpn", RepPointsHead, "resnet50"),
    # dino-4scale_r50_8xb2-12e_coco: BatchNorm frozen (norm_cfg requires_grad=False, norm_eval); its head_kwargs
    # are the DINO module's fields (num_queries, encoder_layers, decoder_layers, feedforward_channels, ...)
    "dino": DetectorSpec(DINO, "channel_mapper", None, "resnet50", backbone_defaults=dict(norm_requires_grad=False)),
    # dino-5scale_swin-l_8xb2-12e_coco (the authors' Swin-L teacher; their Swin-B student is backbone='swin_base_384'):
    # mmdet's Swin there has drop_path_rate 0.2
    "dino_5scale": DetectorSpec(DINO, "channel_mapper_5scale", None, "swin_large_384",
                                backbone_defaults=dict(drop_path_rate=0.2)),
}


FOREIGN = "foreign"  # a Linen model from another codebase (`cankd_jax.models.foreign`)


def model_names() -> list[str]:
    """Every name `make_model` accepts."""
    return sorted([*BACKBONES, *SEGMENTATION_HEADS, *TRUNKS, *DETECTORS, FOREIGN])


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def _build(cls: type, what: str, kwargs: Mapping[str, Any]) -> nn.Module:
    unknown = sorted(set(kwargs) - _fields(cls))
    if unknown:
        raise ValueError(f"{what} has no option(s) {', '.join(unknown)}; its options are {', '.join(sorted(_fields(cls)))}")
    return cls(**kwargs)


def _backbone(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(sorted(BACKBONES))}")
    return _build(BACKBONE_TYPES.get(name, ResNet), f"backbone {name!r}", {**BACKBONES[name], **kwargs})


def _segmentation_inputs(bb: nn.Module) -> tuple[tuple[str, int], tuple[str, int]]:
    """(feature, default channels) of the decode head and of the auxiliary head, as mmseg's configs set them."""
    if isinstance(bb, MobileNetV2):
        # deeplabv3_m-v2-d8 & co. keep the ResNet-101 config's head widths (channels 512, auxiliary 256) and read
        # out_indices[3] / out_indices[2] of (1, 2, 4, 6): layer7 (320 channels) and layer5 (96 channels).
        return ("layer7", 512), ("layer5", 256)
    ch = bb.feature_channels()
    return ("layer4", ch["layer4"] // 4), ("layer3", ch["layer3"] // 4)


def make_segmenter(
    head: str,
    *,
    num_classes: int,
    backbone: str = "resnet50_v1c_d8",
    backbone_kwargs: Optional[Mapping[str, Any]] = None,
    channels: Optional[int] = None,
    aux_channels: Optional[int] = None,
    dropout_ratio: float = 0.1,
    head_kwargs: Optional[Mapping[str, Any]] = None,
    frozen_stages: int = -1,
    norm_eval: bool = False,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    remat: str = "none",
) -> Segmenter:
    """mmseg's `{fcn,deeplabv3,pspnet}_r{depth}-d8` and `_m-v2-d8` segmenters, the auxiliary FCN head included.

    With a ResNet the heads read `layer4` / `layer3`, and `channels` /
    `aux_channels` default to a quarter of their channels, which is mmseg's
    choice for every depth (512 / 256 for ResNet-50/101, 128 / 64 for
    ResNet-18). With a MobileNetV2 (`mobilenet_v2_d8`) they read `layer7` (320
    channels) / `layer5` (96) and default to 512 / 256, as mmseg's `m-v2-d8`
    configs. `aux_channels=0` drops the auxiliary head. `head_kwargs` go to the decode head (e.g. `dilations`,
    `pool_scales`); `frozen_stages`, `norm_eval` and the dtypes reach the
    backbone, the dtypes also the heads. `remat` (a `cankd_jax.compute.REMAT_POLICIES`
    name) rematerialises each residual block of a ResNet backbone and each head
    as a whole under that `jax.checkpoint` policy.
    """
    if head not in SEGMENTATION_HEADS:
        raise ValueError(f"unknown segmentation head {head!r}; choose one of {', '.join(sorted(SEGMENTATION_HEADS))}")
    dtypes = dict(dtype=dtype, param_dtype=param_dtype)
    bb_fields = {"frozen_stages": frozen_stages, "norm_eval": norm_eval, **dtypes, **(backbone_kwargs or {})}
    if remat != "none":
        if BACKBONE_TYPES.get(backbone, ResNet) is not ResNet:
            raise ValueError(f"remat={remat!r} rematerialises ResNet blocks; backbone {backbone!r} is not a ResNet "
                             "(use remat='none')")
        bb_fields["remat"] = remat
    if channels is not None and not is_count(channels, 1):
        raise ValueError(f"head_channels must be a positive integer (or unset for the head's default width), "
                         f"got {channels!r}")
    check_num_classes(num_classes, f"segmenter {head!r}")
    if isinstance(dropout_ratio, bool) or not isinstance(dropout_ratio, (int, float)) or not 0 <= dropout_ratio < 1:
        raise ValueError(f"dropout_ratio must be a number in [0, 1) (the share of the head's features dropped in "
                         f"training; 1 would zero every logit), got {dropout_ratio!r}")
    if backbone == FOREIGN:
        # Another codebase's model: its own options only; the heads read its features named layer4 / layer3.
        bb = make_foreign(**dict(backbone_kwargs or {}))
        if not channels or aux_channels is None:
            raise ValueError("a segmenter on a foreign backbone needs head_channels and aux_channels (0: no "
                             "auxiliary head): its feature widths are not known before a forward pass")
        if remat != "none":
            raise ValueError(f"remat={remat!r} rematerialises our ResNet blocks; a foreign backbone takes 'none'")
        (decode_in, default_channels), (aux_in, default_aux) = ("layer4", channels), ("layer3", aux_channels)
    else:
        bb = _backbone(backbone, bb_fields)
        (decode_in, default_channels), (aux_in, default_aux) = _segmentation_inputs(bb)

    def head_class(cls: type[nn.Module]) -> type[nn.Module]:
        # The head's argument 2 (counting the module) is `train`, a Python bool: static.
        return cls if remat == "none" else nn.remat(cls, policy=remat_policy(remat), static_argnums=(2,))

    decode = _build(head_class(SEGMENTATION_HEADS[head]), f"head {head!r}", dict(
        num_classes=num_classes, channels=channels or default_channels, dropout_ratio=dropout_ratio,
        **dtypes, **(head_kwargs or {})))
    aux_channels = default_aux if aux_channels is None else aux_channels
    aux = None
    if aux_channels:
        aux = head_class(FCNHead)(num_classes=num_classes, channels=aux_channels, num_convs=1, concat_input=False,
                                  dropout_ratio=dropout_ratio, **dtypes)
    return Segmenter(backbone=bb, decode_head=decode, auxiliary_head=aux, decode_in=decode_in, aux_in=aux_in)


def make_trunk(
    name: str = "fpn",
    *,
    backbone: str = "resnet50",
    backbone_kwargs: Optional[Mapping[str, Any]] = None,
    frozen_stages: Optional[int] = None,
    norm_eval: Optional[bool] = None,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    **fpn_kwargs: Any,
) -> DetectionTrunk:
    """Backbone + FPN as mmdet's detectors build them (by default `frozen_stages=1`, `norm_eval=True` for a
    ResNet, `frozen_stages=-1` for a Swin).

    `fpn_kwargs` override the preset's `FPN` fields (`out_channels`,
    `num_outs`, `start_level`, `add_extra_convs`, `relu_before_extra_convs`).
    A detection teacher that only gives features is a trunk: `retinanet_fpn`
    for RetinaNet, `fcos_fpn` for FCOS, `gfl_fpn` for GFL / ATSS, `fpn` (or
    its names `faster_rcnn_fpn`, `cascade_rcnn_fpn`) for Faster R-CNN and
    Cascade (Mask) R-CNN; it reads the `backbone.*` and `neck.*` keys of the detector's
    mmdet checkpoint and reports the others as ignored (`DetectionTrunk`).
    """
    if name not in TRUNKS:
        raise ValueError(f"unknown detection trunk {name!r}; choose one of {', '.join(sorted(TRUNKS))}")
    bb, neck = _backbone_and_neck(name, f"trunk {name!r}", backbone, backbone_kwargs, frozen_stages, norm_eval,
                                  dtype, param_dtype, fpn_kwargs)
    return DetectionTrunk(backbone=bb, neck=neck, in_features=trunk_neck(name)[1])


def _backbone_and_neck(trunk: str, what: str, backbone: str, backbone_kwargs: Optional[Mapping[str, Any]],
                       frozen_stages: Optional[int], norm_eval: Optional[bool], dtype: Any, param_dtype: Any,
                       fpn_kwargs: Mapping[str, Any]) -> tuple[nn.Module, nn.Module]:
    dtypes = dict(dtype=dtype, param_dtype=param_dtype)
    if BACKBONE_TYPES.get(backbone, ResNet) is SwinTransformer:
        # mmdet's Swin detectors freeze nothing (frozen_stages=-1); LayerNorm has no running statistics to keep.
        if norm_eval:
            raise ValueError(f"{what}: norm_eval=True keeps BatchNorm statistics; {backbone!r} has none (LayerNorm)")
        fields = {"frozen_stages": -1 if frozen_stages is None else frozen_stages}
    else:
        # mmdet's ResNet detectors: frozen_stages=1, norm_eval=True.
        fields = {"frozen_stages": 1 if frozen_stages is None else frozen_stages,
                  "norm_eval": True if norm_eval is None else norm_eval}
    bb = _backbone(backbone, {**fields, **dtypes, **(backbone_kwargs or {})})
    if not isinstance(bb, (ResNet, SwinTransformer)):
        raise ValueError(f"{what}: the neck reads the stages of a ResNet or a Swin; backbone {backbone!r} is "
                         f"a {type(bb).__name__}")
    return bb, _build(trunk_neck(trunk)[0], what, {**TRUNKS[trunk], **dtypes, **fpn_kwargs})


def make_detector(
    name: str,
    *,
    num_classes: int,
    backbone: Optional[str] = None,
    backbone_kwargs: Optional[Mapping[str, Any]] = None,
    neck_kwargs: Optional[Mapping[str, Any]] = None,
    head_kwargs: Optional[Mapping[str, Any]] = None,
    roi_head_kwargs: Optional[Mapping[str, Any]] = None,
    frozen_stages: Optional[int] = None,
    norm_eval: Optional[bool] = None,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> nn.Module:
    """mmdet's detectors: the single-stage `retinanet` (`RetinaNet`) and `fcos` (`FCOS`), the two-stage
    `faster_rcnn` (`FasterRCNN`).

    - `retinanet`: default backbone `resnet50` (pytorch style); neck
      `retinanet_fpn`; `RetinaHead` (9 anchors). Teachers: `resnet101`,
      `resnext101_64x4d`. Inputs RGB, normalised with ImageNet's mean/std.
    - `fcos`: default backbone `resnet50_caffe` (caffe style, frozen BatchNorm);
      neck `fcos_fpn`; `FCOSHead` with `norm_on_bbox=True`,
      `centerness_on_reg=False`, `conv_bias=True` (the authors' student). Teachers: `resnet101_caffe`, and
      `resnext101_64x4d` (mmdet's FCOS X101 is pytorch style with trainable
      BatchNorm, norm_eval, the same GroupNorm head). The caffe backbones take
      BGR images minus the mean (102.9801, 115.9465, 122.7717), std 1 (mmdet's
      `DetDataPreprocessor(bgr_to_rgb=False)`); the pytorch-style ones RGB with
      ImageNet's mean/std. Normalising is the data layer's job.
    - `faster_rcnn`: default backbone `resnet50` (pytorch style); neck `fpn` (P2-P6); `RPNHead` (3 anchors);
      `StandardRoIHead` with `Shared2FCBBoxHead` (`roi_head_kwargs`: `fc_out_channels`, `reg_class_agnostic`).
    - `dino`: DINO-4scale (`cankd_jax.models.dino.DINO`): default backbone `resnet50` with frozen BatchNorm; neck
      `channel_mapper` (layer2-layer4 and one extra level, 256 channels, GroupNorm); `head_kwargs` are the DINO
      module's own fields (`num_queries`, `encoder_layers`, `decoder_layers`, `feedforward_channels`, ...).
      `dino_5scale`: DINO-5scale, default backbone `swin_large_384` (drop path 0.2), neck `channel_mapper_5scale`
      (all four stages and one extra level).

    `backbone_kwargs` override backbone fields (e.g. `base_width`,
    `stage_blocks`), `neck_kwargs` the FPN's (`out_channels`, ...),
    `head_kwargs` the head's (`feat_channels`, `stacked_convs`, `num_groups`,
    `num_anchors`, `norm_on_bbox`, ...). FCOS's head `strides` default to the
    neck levels' strides. `frozen_stages=1`, `norm_eval=True` (a Swin: `frozen_stages=-1`): mmdet's.
    """
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose one of {', '.join(sorted(DETECTORS))}")
    check_num_classes(num_classes, f"detector {name!r}")
    spec = DETECTORS[name]
    bb, neck = _backbone_and_neck(spec.trunk, f"detector {name!r}", backbone or spec.backbone,
                                  {**spec.backbone_defaults, **(backbone_kwargs or {})},
                                  frozen_stages, norm_eval, dtype, param_dtype, neck_kwargs or {})
    head_fields = {**spec.head_defaults, **(head_kwargs or {})}
    dtypes = dict(dtype=dtype, param_dtype=param_dtype)
    if spec.head is None:
        if roi_head_kwargs:
            raise ValueError(f"detector {name!r} has no RoI head for roi_head_kwargs")
        return _build(spec.cls, f"detector {name!r}", dict(backbone=bb, neck=neck, num_classes=num_classes,
                                                            in_features=trunk_neck(spec.trunk)[1], **dtypes,
                                                            **head_fields))
    if "strides" in _fields(spec.head) and "strides" not in head_fields:
        levels = pyramid_level_names(bb, neck, spec.cls.in_features)
        head_fields["strides"] = tuple(2 ** int(n[len("fpn.p"):]) for n in levels)
    if spec.roi_head is not None:
        rpn = _build(spec.head, f"detector {name!r} RPN head", {**dtypes, **head_fields})
        box = _build(spec.roi_head, f"detector {name!r} box head",
                     {"num_classes": num_classes, **dtypes, **(roi_head_kwargs or {})})
        return spec.cls(backbone=bb, neck=neck, rpn_head=rpn, roi_head=StandardRoIHead(bbox_head=box))
    if roi_head_kwargs:
        raise ValueError(f"detector {name!r} is single-stage: it has no RoI head for roi_head_kwargs")
    head = _build(spec.head, f"detector {name!r} head", dict(num_classes=num_classes, **dtypes, **head_fields))
    return spec.cls(backbone=bb, neck=neck, bbox_head=head)


def make_model(name: str, **kwargs: Any) -> nn.Module:
    """A network by registry name (see `model_names()`).

    Backbone names (`resnet50`, `resnet101_v1c_d8`, `resnet50_caffe`,
    `resnext101_32x4d`, ...) give a `ResNet`, `mobilenet_v2` / `mobilenet_v2_d8`
    a `MobileNetV2`; `kwargs` override its fields (`num_classes` makes a ResNet
    a classifier), `swin_tiny` / `swin_small` / `swin_base` / `swin_large` (and `swin_base_384` /
    `swin_large_384`, window 12) a `SwinTransformer`. Segmenter names (`fcn`, `deeplabv3`, `pspnet`) go to
    `make_segmenter`, trunk names (`fpn`, `retinanet_fpn`, `fcos_fpn`,
    `gfl_fpn`, `faster_rcnn_fpn`, `cascade_rcnn_fpn`) to `make_trunk`, detector
    names (`retinanet`, `fcos`, `faster_rcnn`) to `make_detector`. Unknown names and options raise a `ValueError` listing
    the valid ones.
    """
    key = name.lower() if isinstance(name, str) else name
    if key in BACKBONES:
        return _backbone(key, kwargs)
    if key in SEGMENTATION_HEADS:
        return make_segmenter(key, **kwargs)
    if key in TRUNKS:
        return make_trunk(key, **kwargs)
    if key in DETECTORS:
        return make_detector(key, **kwargs)
    if key == FOREIGN:
        return make_foreign(**kwargs)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(model_names())}")


# Config fields read by the checkpoint loader, not by the network builder.
_LOADER_FIELDS = {"checkpoint", "checkpoint_prefixes", "random_init", "pretrained", "pretrained_prefixes", "inherit",
                  "inherit_prefixes", "inherit_skip_mismatched"}


def check_num_classes(num_classes: Any, what: str) -> None:
    """Raise `ValueError` unless `num_classes` is an integer >= 1 (0 gave logits of no class, a negative count an
    error deep inside XLA)."""
    if not is_count(num_classes, 1):
        raise ValueError(f"{what}: num_classes must be an integer >= 1, got {num_classes!r}")


def _dtype(value: Any) -> Any:
    """A network config's `dtype` / `param_dtype`: a float dtype's name, or unset."""
    if not value:
        return None
    dtype = float_dtype(value)
    if dtype is None:
        raise ValueError(f"network config dtype {value!r} is not a float dtype (e.g. 'float32', 'bfloat16')")
    return dtype


def make_network(cfg: Any, *, num_classes: int) -> nn.Module:
    """The network of a config block (`config.student` / `config.teacher`).

    Fields: `name` (a backbone name for a classifier; a segmenter `fcn` /
    `deeplabv3` / `pspnet`; a detector `retinanet` / `fcos` / `faster_rcnn`; a trunk `fpn` /
    `retinanet_fpn` / `fcos_fpn` / `gfl_fpn` / `faster_rcnn_fpn` / `cascade_rcnn_fpn`), `backbone` and
    `backbone_kwargs` (backbone fields, e.g. `base_width`), `frozen_stages`, `norm_eval`,
    `dtype` / `param_dtype` (names such as 'bfloat16'), `remat` (a
    `cankd_jax.compute.REMAT_POLICIES` name; segmenters and ResNets), `frozen_prefixes`
    (extra frozen keys, see `frozen_labels`); segmenters also `head_channels`,
    `aux_channels`, `dropout_ratio`, `head_kwargs`; detectors `neck_kwargs` and
    `head_kwargs` (and Faster R-CNN `roi_head_kwargs`); trunks `neck_kwargs`. `frozen_stages` / `norm_eval` left out
    take each builder's default (mmdet's 1 / True for detectors and trunks,
    -1 / False otherwise). The checkpoint fields are left to the loader;
    `num_classes` (the task's) is not used by a trunk.
    """
    fields = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    name = fields.pop("name", None)
    if name is None:
        raise ValueError("network config needs a `name` (a backbone, segmenter, detector or trunk name)")
    for key in _LOADER_FIELDS | {"frozen_prefixes"}:
        fields.pop(key, None)
    if name == FOREIGN:
        # The run's compute dtype is the foreign model's own business (its factory's arguments).
        fields.pop("dtype", None)
        fields.pop("param_dtype", None)
        for key in ("frozen_stages", "norm_eval", "remat"):
            if fields.get(key) not in (None, -1, False, "none"):
                raise ValueError(f"network config 'foreign' does not take {key}={fields[key]!r}; freeze its "
                                 "parameters with frozen_prefixes")
            fields.pop(key, None)
        return make_foreign(**fields)
    common = {k: fields.pop(k) for k in ("frozen_stages", "norm_eval") if k in fields}
    remat = fields.pop("remat", None) or "none"
    remat_policy(remat)  # unknown names fail here
    common.update(dtype=_dtype(fields.pop("dtype", None)),
                  param_dtype=_dtype(fields.pop("param_dtype", None)) or jnp.float32)
    if "kwargs" in fields:
        raise ValueError(f"network config {name!r}: the backbone's options are `backbone_kwargs` (as make_model "
                         f"names them), not `kwargs`")
    kwargs = dict(fields.pop("backbone_kwargs", None) or {})

    def take(renamed: Mapping[str, str]) -> dict[str, Any]:
        return {renamed[k]: fields.pop(k) for k in list(fields) if k in renamed}

    if name in SEGMENTATION_HEADS:
        options = take({"backbone": "backbone", "head_channels": "channels", "aux_channels": "aux_channels",
                        "dropout_ratio": "dropout_ratio", "head_kwargs": "head_kwargs"})
        model = make_segmenter(name, num_classes=num_classes, backbone_kwargs=kwargs, remat=remat, **options, **common)
    elif remat != "none" and name not in BACKBONES:
        # Detection hook: the detectors and trunks (ResNet + FPN + dense heads) do not rematerialise yet.
        raise ValueError(f"remat={remat!r} is implemented for segmenters and ResNet classifiers, not for {name!r}; "
                         "use remat='none'")
    elif name in DETECTORS:
        options = take({"backbone": "backbone", "neck_kwargs": "neck_kwargs", "head_kwargs": "head_kwargs",
                        "roi_head_kwargs": "roi_head_kwargs"})
        model = make_detector(name, num_classes=num_classes, backbone_kwargs=kwargs, **options, **common)
    elif name in TRUNKS:
        options = take({"backbone": "backbone"})
        neck = dict(fields.pop("neck_kwargs", None) or {})
        model = make_trunk(name, backbone_kwargs=kwargs, **options, **common, **neck)
    elif name in BACKBONES:
        if remat != "none":
            if BACKBONE_TYPES.get(name, ResNet) is not ResNet:
                raise ValueError(f"remat={remat!r} rematerialises ResNet blocks; {name!r} is not a ResNet")
            kwargs["remat"] = remat
        model = make_model(name, num_classes=num_classes, **common, **kwargs)
    else:
        raise ValueError(f"network config name {name!r} is none of the segmenters "
                         f"({', '.join(sorted(SEGMENTATION_HEADS))}), "
                         f"detectors ({', '.join(sorted(DETECTORS))}), trunks ({', '.join(sorted(TRUNKS))}) "
                         f"or backbones ({', '.join(sorted(BACKBONES))})")
    if fields:
        raise ValueError(f"network config {name!r} has unknown field(s) {', '.join(sorted(fields))}")
    return model


def frozen_labels(model: nn.Module, cfg: Any = None) -> Optional[Callable[[PyTree], PyTree]]:
    """`params -> 'frozen'/'trainable' labels` for the optimizer, or None when nothing is frozen.

    Frozen: the model's own `frozen_prefixes()` (e.g. `frozen_stages`) plus the
    config's `frozen_prefixes` list of dotted keys (e.g. `['backbone.']`).
    """
    extra = tuple((cfg.get("frozen_prefixes") if cfg is not None else None) or ())
    prefixes = frozen_prefixes(model) + extra
    if not prefixes:
        return None
    return lambda params: param_labels(params, prefixes)
