"""Networks chosen by name, so a config names a model instead of a code path.

    make_model("resnet101_v1c_d8")                                   # a backbone
    make_model("resnet18", num_classes=1000)                         # a classifier
    make_model("pspnet", backbone="resnet18_v1c_d8", num_classes=19) # a segmenter
    make_model("fpn", backbone="resnet50")                           # a detection trunk

`make_network(cfg, num_classes=...)` does the same from a config block.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from cankd_jax.models.fpn import FPN
from cankd_jax.models.freeze import frozen_prefixes, param_labels
from cankd_jax.models.heads import ASPPHead, FCNHead, PSPHead
from cankd_jax.models.resnet import ARCHITECTURES, ResNet
from cankd_jax.models.segmenter import Segmenter
from cankd_jax.models.trunk import DetectionTrunk

PyTree = Any
_D8 = dict(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))


def _backbone_presets() -> dict[str, dict[str, Any]]:
    presets: dict[str, dict[str, Any]] = {}
    for depth in ARCHITECTURES:
        presets[f"resnet{depth}"] = dict(depth=depth)
        presets[f"resnet{depth}_v1c"] = dict(depth=depth, deep_stem=True)
        presets[f"resnet{depth}_v1c_d8"] = dict(depth=depth, deep_stem=True, **_D8)
    for groups in (32, 64):
        presets[f"resnext101_{groups}x4d"] = dict(depth=101, groups=groups, width_per_group=4)
    return presets


BACKBONES: dict[str, dict[str, Any]] = _backbone_presets()
SEGMENTATION_HEADS: dict[str, type[nn.Module]] = {"fcn": FCNHead, "deeplabv3": ASPPHead, "pspnet": PSPHead}
# Faster R-CNN's neck (P2-P6, P6 by max-pool) and RetinaNet's (P3-P7 by convs on C5).
TRUNKS: dict[str, dict[str, Any]] = {"fpn": {}, "retinanet_fpn": dict(start_level=1, add_extra_convs="on_input")}


def model_names() -> list[str]:
    """Every name `make_model` accepts."""
    return sorted([*BACKBONES, *SEGMENTATION_HEADS, *TRUNKS])


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def _build(cls: type, what: str, kwargs: Mapping[str, Any]) -> nn.Module:
    unknown = sorted(set(kwargs) - _fields(cls))
    if unknown:
        raise ValueError(f"{what} has no option(s) {', '.join(unknown)}; its options are {', '.join(sorted(_fields(cls)))}")
    return cls(**kwargs)


def _backbone(name: str, kwargs: Mapping[str, Any]) -> ResNet:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(sorted(BACKBONES))}")
    return _build(ResNet, f"backbone {name!r}", {**BACKBONES[name], **kwargs})


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
) -> Segmenter:
    """mmseg's `{fcn,deeplabv3,pspnet}_r{depth}-d8` segmenters, the auxiliary FCN head included.

    `channels` / `aux_channels` default to a quarter of the layer4 / layer3
    channels, which is mmseg's choice for every depth (512 / 256 for
    ResNet-50/101, 128 / 64 for ResNet-18); `aux_channels=0` drops the
    auxiliary head. `head_kwargs` go to the decode head (e.g. `dilations`,
    `pool_scales`); `frozen_stages`, `norm_eval` and the dtypes reach the
    backbone, the dtypes also the heads.
    """
    if head not in SEGMENTATION_HEADS:
        raise ValueError(f"unknown segmentation head {head!r}; choose one of {', '.join(sorted(SEGMENTATION_HEADS))}")
    dtypes = dict(dtype=dtype, param_dtype=param_dtype)
    bb = _backbone(backbone, {"frozen_stages": frozen_stages, "norm_eval": norm_eval, **dtypes, **(backbone_kwargs or {})})
    ch = bb.feature_channels()
    decode = _build(SEGMENTATION_HEADS[head], f"head {head!r}", dict(
        num_classes=num_classes, channels=channels or ch["layer4"] // 4, dropout_ratio=dropout_ratio,
        **dtypes, **(head_kwargs or {})))
    aux_channels = ch["layer3"] // 4 if aux_channels is None else aux_channels
    aux = None
    if aux_channels:
        aux = FCNHead(num_classes=num_classes, channels=aux_channels, num_convs=1, concat_input=False,
                      dropout_ratio=dropout_ratio, **dtypes)
    return Segmenter(backbone=bb, decode_head=decode, auxiliary_head=aux)


def make_trunk(
    name: str = "fpn",
    *,
    backbone: str = "resnet50",
    backbone_kwargs: Optional[Mapping[str, Any]] = None,
    frozen_stages: int = 1,
    norm_eval: bool = True,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    **fpn_kwargs: Any,
) -> DetectionTrunk:
    """Backbone + FPN as mmdet's detectors build them (`frozen_stages=1`, `norm_eval=True` by default).

    `fpn_kwargs` override the preset's `FPN` fields (`out_channels`,
    `num_outs`, `start_level`, `add_extra_convs`, `relu_before_extra_convs`).
    """
    if name not in TRUNKS:
        raise ValueError(f"unknown detection trunk {name!r}; choose one of {', '.join(sorted(TRUNKS))}")
    dtypes = dict(dtype=dtype, param_dtype=param_dtype)
    bb = _backbone(backbone, {"frozen_stages": frozen_stages, "norm_eval": norm_eval, **dtypes, **(backbone_kwargs or {})})
    neck = _build(FPN, f"trunk {name!r}", {**TRUNKS[name], **dtypes, **fpn_kwargs})
    return DetectionTrunk(backbone=bb, neck=neck)


def make_model(name: str, **kwargs: Any) -> nn.Module:
    """A network by registry name (see `model_names()`).

    Backbone names (`resnet50`, `resnet101_v1c_d8`, `resnext101_32x4d`, ...)
    give a `ResNet`; `kwargs` override its fields (`num_classes` makes it a
    classifier). Segmenter names (`fcn`, `deeplabv3`, `pspnet`) go to
    `make_segmenter`, trunk names (`fpn`, `retinanet_fpn`) to `make_trunk`.
    Unknown names and options raise a `ValueError` listing the valid ones.
    """
    key = name.lower() if isinstance(name, str) else name
    if key in BACKBONES:
        return _backbone(key, kwargs)
    if key in SEGMENTATION_HEADS:
        return make_segmenter(key, **kwargs)
    if key in TRUNKS:
        return make_trunk(key, **kwargs)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(model_names())}")


# Config fields read by the checkpoint loader, not by the network builder.
_LOADER_FIELDS = {"checkpoint", "checkpoint_prefixes", "random_init", "pretrained", "pretrained_prefixes"}


def _dtype(value: Any) -> Any:
    return jnp.dtype(value) if value else None


def make_network(cfg: Any, *, num_classes: int) -> nn.Module:
    """The network of a config block (`config.student` / `config.teacher`).

    Fields: `name` (a backbone name for a classifier, or `fcn` / `deeplabv3` /
    `pspnet`), `backbone` and `kwargs` (backbone fields, e.g. `base_width`),
    `head_channels`, `aux_channels`, `dropout_ratio`, `head_kwargs`,
    `frozen_stages`, `norm_eval`, `dtype` / `param_dtype` (names such as
    'bfloat16'), `frozen_prefixes` (extra frozen keys, see `frozen_labels`);
    the checkpoint fields are left to the loader.
    """
    fields = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    name = fields.pop("name", None)
    if name is None:
        raise ValueError("network config needs a `name` (a backbone or a segmenter name)")
    for key in _LOADER_FIELDS | {"frozen_prefixes"}:
        fields.pop(key, None)
    common = dict(frozen_stages=fields.pop("frozen_stages", -1), norm_eval=fields.pop("norm_eval", False),
                  dtype=_dtype(fields.pop("dtype", None)), param_dtype=_dtype(fields.pop("param_dtype", None)) or jnp.float32)
    kwargs = dict(fields.pop("kwargs", None) or {})
    if name in SEGMENTATION_HEADS:
        renamed = {"backbone": "backbone", "head_channels": "channels", "aux_channels": "aux_channels",
                   "dropout_ratio": "dropout_ratio", "head_kwargs": "head_kwargs"}
        options = {renamed[k]: fields.pop(k) for k in list(fields) if k in renamed}
        model = make_segmenter(name, num_classes=num_classes, backbone_kwargs=kwargs, **options, **common)
    elif name in BACKBONES:
        model = make_model(name, num_classes=num_classes, **common, **kwargs)
    else:
        raise ValueError(f"network config name {name!r} is neither a segmenter ({', '.join(sorted(SEGMENTATION_HEADS))}) "
                         f"nor a backbone ({', '.join(sorted(BACKBONES))})")
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
