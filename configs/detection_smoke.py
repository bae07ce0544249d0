"""A tiny detection distillation run for tests and a first look: 10 steps, about a minute on 2 CPU cores.

A narrow RetinaNet (ResNet-18 layout at width 8, FPN and head at 16 channels) on the built-in synthetic
scenes seen as detection (64x64 images resized to 128x128, 6 classes), distilled on P3-P6 with CanKD from a
random teacher trunk of twice the backbone width (asked for with `teacher.random_init`: the point is the
machinery, not the numbers), evaluated by COCOeval on 16 held-out images.

    python train.py --config configs/detection_smoke.py --workdir /tmp/det_smoke
    python train.py --config configs/detection_smoke.py:detector=fcos --workdir /tmp/det_smoke_fcos
    python train.py --config configs/detection_smoke.py:detector=faster_rcnn --workdir /tmp/det_smoke_frcnn
    python train.py --config configs/detection_smoke.py:detector=reppoints --workdir /tmp/det_smoke_reppoints
    python train.py --config configs/detection_smoke.py:detector=dino --workdir /tmp/det_smoke_dino

Faster R-CNN is distilled on P2-P5 (the paper's levels for it) from an `fpn` trunk (P2-P6), its box head 64 wide.
DINO (one encoder and one decoder layer of 16 channels, 30 queries, denoising groups sized from 10 queries) is
distilled on its ChannelMapper's four levels from a `channel_mapper` trunk, as the authors' DINO configs, and
trained with DINO's augmentation (`data.augment='detr'`: multi-scale resize or resize-crop-resize, at 128/800 of
mmdet's sizes).
"""

import ml_collections

from cankd_jax import config_arg
from cankd_jax.data.options import data_section
from cankd_jax.losses.presets import detection_terms

NECK = 16


def _backbone(width: int) -> dict:
    return dict(backbone="resnet18", backbone_kwargs=dict(base_width=width, stem_width=width), frozen_stages=-1,
                norm_eval=False)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = config_arg.parse(arg, {"detector": ("retinanet", "fcos", "faster_rcnn", "reppoints", "dino")},
                         {"detector": "retinanet"},
                         config="configs/detection_smoke.py")
    detector = a["detector"]
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dtype = "float32"  # compute dtype: 'bfloat16' for mixed precision (parameters, optimizer, checkpoints stay float32)
    c.remat = "none"  # jax.checkpoint policy for the student's stem, blocks and heads, e.g. 'nothing_saveable' (cankd_jax/compute.py)
    c.total_steps = 10
    c.batch_size = 4  # global
    c.log_every = 2
    c.eval_every = 10
    c.checkpoint_every = 5
    c.keep_checkpoints = 2

    c.task = ml_collections.ConfigDict(dict(name="detection", num_classes=6, detector=detector))
    c.data = ml_collections.ConfigDict(data_section(
        "synthetic_detection", data_dir="", image_size=64, num_train=32, num_test=16, scale=(128, 128),
        norm="pytorch", augment="detr" if detector == "dino" else "resize_flip", eval_batch_size=8, workers=0,
    ))
    head = dict(feat_channels=NECK, stacked_convs=1)
    extra = {}
    levels = ("fpn.p3", "fpn.p4", "fpn.p5", "fpn.p6")
    neck = dict(out_channels=NECK)
    if detector == "fcos":
        head["num_groups"] = 4
    if detector == "reppoints":  # GroupNorm neck and head (4 groups of 4 channels)
        head.update(num_groups=4, point_feat_channels=NECK)
        neck["num_groups"] = 4
    if detector == "faster_rcnn":
        head = dict(feat_channels=NECK)
        extra = dict(roi_head_kwargs=dict(fc_out_channels=64))
        levels = ("fpn.p2", "fpn.p3", "fpn.p4", "fpn.p5")
    if detector == "dino":  # the transformer as wide as the neck; BatchNorm trains (from scratch)
        neck = dict(out_channels=NECK, num_groups=4)
        head = dict(embed_dims=NECK, num_heads=4, num_queries=30, encoder_layers=1, decoder_layers=1,
                    feedforward_channels=32)
        c.task.update(dn_queries=10)
    trunk = {"faster_rcnn": "fpn", "dino": "channel_mapper"}.get(detector, f"{detector}_fpn")
    backbone = _backbone(8)
    if detector == "dino":
        backbone["backbone_kwargs"]["norm_requires_grad"] = True
    c.student = ml_collections.ConfigDict(dict(name=detector, **backbone, neck_kwargs=neck,
                                               head_kwargs=head, **extra))
    c.teacher = ml_collections.ConfigDict(dict(
        name=trunk, **_backbone(16),
        neck_kwargs=neck,
        checkpoint="",  # a trained teacher: an mmdet detector .pth, or the export/ dir of a detector run
        random_init=True,  # this config exercises the machinery: a random teacher, on purpose
    ))
    c.distill = [ml_collections.ConfigDict(t) for t in detection_terms("cankd", student_channels=NECK,
                                                                        teacher_channels=NECK, levels=levels)]
    c.optimizer = ml_collections.ConfigDict(dict(
        name="sgd", lr=0.005, momentum=0.9, weight_decay=1e-4, grad_clip_norm=35.0,
        schedule="step", boundaries=(8,), decay_factor=0.1, warmup_steps=3, warmup_factor=0.001,
    ))
    c.mesh = ml_collections.ConfigDict(dict(fsdp=False, fsdp_min_size=2**16))
    c.export = ml_collections.ConfigDict(dict(pytorch=True))
    return c
