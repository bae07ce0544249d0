"""Detection's twin of configs/demo.py: does CanKD on P3-P6 help a small detector? On 2 CPU cores in under 15 minutes.

    python train.py --config configs/detection_demo.py --workdir /tmp/det_demo
    python train.py --config configs/detection_demo.py:loss=pkd --workdir /tmp/det_demo         # a baseline instead
    python train.py --config configs/detection_demo.py:loss=cankd+fitnet --workdir /tmp/det_demo  # several, one table
    python train.py --config configs/detection_demo.py:detector=retinanet --workdir /tmp/det_demo_retina
    python train.py --config configs/detection_demo.py:detector=faster_rcnn --workdir /tmp/det_demo_frcnn
    python train.py --config configs/detection_demo.py:teacher=swin --workdir /tmp/det_demo_swin
    python train.py --config configs/detection_demo.py:detector=reppoints --workdir /tmp/det_demo_reppoints
    python train.py --config configs/detection_demo.py:detector=dino --workdir /tmp/det_demo_dino

Phases on the built-in synthetic scenes seen as detection (64x64 images resized to 128x128
as mmdet's keep-ratio resize would, 6 shape classes, no download), each in `workdir/<phase>`
and each resumable on its own:

  teacher   FCOS (or RetinaNet, Faster R-CNN, RepPoints) on a ResNet-18 layout at a quarter of the standard width,
            from scratch; re-used when `workdir/teacher` already holds a finished run
  student   the same detector with an eighth-width backbone (the teacher's FPN and head
            widths), detection losses only
  <loss>    the same student, same steps and data order, plus the distillation loss on each
            of P3-P6 against the trained teacher's backbone + FPN (its trunk; the head is not
            used): the paper's recipe scaled down (four loss modules, loss_weight 10, equal
            FPN widths so no connector); Faster R-CNN distils P2-P5, as the paper's
            two-stage rows, with mmdet's RPN and RoI assignment and sampling; the counts
            scaled to the small images (`RCNN_COUNTS`: 300 proposals and 128 sampled RoIs
            per image instead of 1000 and 512; fc widths 128 instead of 1024)

`teacher=swin` is the paper's transformer-to-CNN row scaled down (Mask R-CNN Swin-S -> RetinaNet R50,
configs/coco.py:teacher=mask_rcnn_swin_s): the teacher is a Faster R-CNN (the box part of Mask R-CNN: FPN
P2-P6, RPN, RoI head) on a narrow Swin (embed_dims 16, two blocks per stage, window 4, which tiles the
32/16/8/4-pixel stage maps of a 128x128 image exactly), trained from scratch; the student is the RetinaNet
(P3-P7) above, and each student level P3-P6 is distilled from the teacher level of the same index, P2-P5,
through CanKD's align form (`cankd_align`, the student map upsampled 2x), as the authors pair them.

`detector=dino` is the paper's DETR row scaled down (DINO R101 -> R50, configs/coco_detr.py): DINO-4scale
(ChannelMapper, deformable encoder, DINO decoder with denoising queries, Hungarian matching) on the same
ResNet-18 layouts, the transformer 32 wide (4 heads, 2 encoder and 2 decoder layers, 100 queries, denoising
groups from 20 queries), CanKD on the ChannelMapper's first three levels (P3-P5) as the authors' config; both
students start from scratch (the authors' student also takes the teacher's transformer and head, which would
mix that start into the comparison). It trains with mmdet's DETR recipe where it carries over (AdamW, clip
0.1, the 1.0 / 5.0 / 2.0 losses) and this demo's resize + flip, cosine schedule and BatchNorm in training mode.

`workdir/summary.json` gets `{"metric": "mAP", "teacher": x, "student": y, "cankd": z, ...}`:
COCO AP (IoU 0.50:0.95, pycocotools' COCOeval) on the 500 held-out scenes, with the teacher's
and every phase's AP50/AP75/AP_S/AP_M in its `phases` entry. Objects are small in the original 64x64
images (COCO's sizes: most under 32x32 pixels, a few medium, none over 96x96, so AP_L is -1, COCOeval's
"no such objects").

From scratch in minutes: AdamW with a cosine decay and the networks' BatchNorm in training
mode (no frozen stages, no norm_eval), where the paper fine-tunes ImageNet backbones with SGD
for 24 epochs (configs/coco.py). FCOS by default: from scratch it reached a higher mAP than
RetinaNet in the same steps here (8.7 vs 6.7 after 600 teacher steps).
"""

from typing import Optional

import ml_collections

from cankd_jax import config_arg
from cankd_jax.data.options import data_section
from cankd_jax.losses.presets import PRESET_LOSSES, SIZE_ALIGNED, align_sizes, detection_terms

STEPS = 700              # each student phase
TEACHER_STEPS = 1000
TEACHER_WIDTH = 16       # ResNet-18 layer4: 16 * 8 = 128 channels
STUDENT_WIDTH = 8        # ResNet-18 layer4: 8 * 8 = 64 channels
NECK = 32                # FPN and head channels of both networks (the paper's 256 -> 256)


FC = 128                 # Faster R-CNN's box head (the paper's 1024)
P3_P6 = ("fpn.p3", "fpn.p4", "fpn.p5", "fpn.p6")
LEVELS = {"faster_rcnn": ("fpn.p2", "fpn.p3", "fpn.p4", "fpn.p5")}  # the others: P3-P6
# teacher=swin: a narrow Swin-T layout (the ResNet teacher's 128 channels at stage 4), window 4 for 128x128 images
SWIN = dict(backbone="swin_tiny", backbone_kwargs=dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                                                       window_size=4))
# Faster R-CNN's proposal and RoI counts scaled to 128x128 images (4,092 anchors; mmdet's 2000 / 1000
# proposals and 512 RoIs are for 800x1344, 268,569 anchors): (nms_pre, max_per_img) and RoIs per image
RCNN_COUNTS = dict(train_proposals=(500, 300), test_proposals=(300, 300), roi_samples=128)
# DINO's transformer at the neck's width (mmdet's: 256 wide, 8 heads, 6 + 6 layers, FFN 2048, 900 queries, denoising
# from 100 queries); 100 queries fit the 340 positions of a 128x128 image's four levels
DINO_HEAD = dict(embed_dims=NECK, num_heads=4, encoder_layers=2, decoder_layers=2, feedforward_channels=4 * NECK,
                 num_queries=100)
DINO_LR = 5e-4
DINO_TEACHER_STEPS, DINO_STEPS = 6000, 3000  # a DETR from scratch learns slowly (1000 steps: 4.4 mAP)
DINO_LEVELS = ("fpn.p3", "fpn.p4", "fpn.p5")  # the ChannelMapper's outputs 0-2, as nlkd_dino-r101_dino-r50_12e_coco


def _network(detector: str, width: int, backbone: Optional[dict] = None) -> dict:
    head = dict(feat_channels=NECK, stacked_convs=2)
    extra = {}
    neck = dict(out_channels=NECK)
    if detector == "fcos":
        head["num_groups"] = 8
    if detector == "reppoints":  # GroupNorm neck and head, 8 groups of 4 channels; the points' features as wide
        head.update(point_feat_channels=NECK, num_groups=8)
        neck["num_groups"] = 8
    if detector == "faster_rcnn":
        head = dict(feat_channels=NECK)
        extra = dict(roi_head_kwargs=dict(fc_out_channels=FC))
    if detector == "dino":  # GroupNorm ChannelMapper (8 groups of 4); BatchNorm trains (from scratch)
        neck = dict(out_channels=NECK, num_groups=8)
        head = DINO_HEAD
        extra = dict(backbone_kwargs=dict(base_width=width, stem_width=width, norm_requires_grad=True))
    backbone = backbone or dict(backbone="resnet18", backbone_kwargs=dict(base_width=width, stem_width=width))
    return dict(name=detector, **{**backbone, **extra}, neck_kwargs=neck, head_kwargs=head, frozen_stages=-1,
                norm_eval=False)


def _terms(loss: str, levels: tuple[str, ...], teacher_levels: Optional[tuple[str, ...]]) -> list:
    terms = detection_terms(loss, student_channels=NECK, teacher_channels=NECK, levels=levels,
                            teacher_levels=teacher_levels)
    if align_sizes(terms):  # teacher=swin: maps of twice the size, through the align forms
        raise ValueError(f"configs/detection_demo.py: teacher=swin pairs maps of different sizes, which "
                         f"loss={loss} cannot take; choose one of {', '.join(sorted(SIZE_ALIGNED))} (or cankd's "
                         f"ablations)")
    return terms


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = config_arg.parse(arg, {"loss": PRESET_LOSSES,
                               "detector": ("auto", "retinanet", "fcos", "faster_rcnn", "reppoints", "dino"),
                               "teacher": ("resnet", "swin")},
                         {"loss": ["cankd"], "detector": "auto", "teacher": "resnet"},
                         config="configs/detection_demo.py", lists=("loss",))
    losses, swin = a["loss"], a["teacher"] == "swin"
    detector = a["detector"] if a["detector"] != "auto" else ("retinanet" if swin else "fcos")
    if swin and detector != "retinanet":
        raise ValueError(f"configs/detection_demo.py: teacher=swin distils a RetinaNet student (the paper's Swin "
                         f"row); detector={detector} is not one")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dtype = "float32"  # compute dtype: 'bfloat16' for mixed precision (parameters, optimizer, checkpoints stay float32)
    c.remat = "none"  # jax.checkpoint policy for the student's stem, blocks and heads, e.g. 'nothing_saveable' (cankd_jax/compute.py)
    c.total_steps = STEPS
    c.batch_size = 8  # global
    c.log_every = 50
    c.eval_every = 100_000  # once, at the end
    c.checkpoint_every = 400
    c.keep_checkpoints = 2
    c.metric = "mAP"

    c.task = dict(name="detection", num_classes=6, detector=detector)
    if detector == "faster_rcnn":
        c.task.update(RCNN_COUNTS)
    if detector == "dino":
        c.task.update(dn_queries=20)
    c.data = data_section("synthetic_detection", data_dir="", image_size=64, num_train=2000, num_test=500,
                          scale=(128, 128), norm="pytorch", augment="resize_flip", eval_batch_size=50, workers=0)
    c.student = _network(detector, STUDENT_WIDTH)
    # The teacher run's export holds the whole detector; the distilling runs read its backbone and neck.
    trunk = {k: v for k, v in _network(detector, TEACHER_WIDTH).items() if k not in ("head_kwargs", "roi_head_kwargs")}
    c.teacher = dict(trunk, name="channel_mapper" if detector == "dino" else f"{detector}_fpn",
                     checkpoint="{workdir}/teacher/export")
    teacher_phase = dict(student=_network(detector, TEACHER_WIDTH), total_steps=TEACHER_STEPS)
    levels, teacher_levels = LEVELS.get(detector, P3_P6), None
    if detector == "dino":
        levels = DINO_LEVELS
    if swin:
        teacher_net = _network("faster_rcnn", TEACHER_WIDTH, backbone=SWIN)
        c.teacher = dict({k: v for k, v in teacher_net.items() if k not in ("head_kwargs", "roi_head_kwargs")},
                         name="mask_rcnn_fpn", checkpoint="{workdir}/teacher/export")
        teacher_phase = dict(student=teacher_net, total_steps=TEACHER_STEPS,
                             task=dict(detector="faster_rcnn", **RCNN_COUNTS))
        teacher_levels = LEVELS["faster_rcnn"]
    c.distill = []
    c.optimizer = dict(name="adamw", lr=2e-3, weight_decay=1e-4, grad_clip_norm=35.0, schedule="cosine",
                       min_lr=2e-5, warmup_steps=100, warmup_factor=0.001)
    if detector == "dino":  # a transformer from scratch: a lower peak, DINO's clip, more steps
        c.optimizer.update(lr=DINO_LR, min_lr=DINO_LR / 100, grad_clip_norm=0.1)
        c.total_steps = DINO_STEPS
        teacher_phase["total_steps"] = DINO_TEACHER_STEPS
    c.mesh = dict(fsdp=False, fsdp_min_size=2**16)
    c.export = dict(pytorch=False)

    c.phases = ["teacher", "student", *losses]
    c.phase_overrides = {
        "teacher": teacher_phase,
        "student": {},
        **{name: dict(distill=_terms(name, levels, teacher_levels)) for name in losses},
    }
    return c
