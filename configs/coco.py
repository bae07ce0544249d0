"""The paper's COCO detection runs: RetinaNet / FCOS R50 students distilled on FPN P3-P6, Faster R-CNN R50 on P2-P5,
from an mmdet teacher.

    python train.py --config configs/coco.py --workdir runs/retina_r101_cankd \\
        --config.data.data_dir=/data/tfds \\
        --config.teacher.checkpoint=retinanet_r101_fpn_2x_coco.pth \\      # mmdet's trained teacher
        --config.student.pretrained=resnet50-0676ba61.pth                  # torchvision's ImageNet R50
    python train.py --config configs/coco.py:teacher=retinanet_x101 ...           # RetinaNet X101 -> R50
    python train.py --config configs/coco.py:detector=fcos,teacher=fcos_r101 ...  # FCOS R101 -> R50 (caffe)
    python train.py --config configs/coco.py:teacher=fcos_x101 ...                # FCOS X101 -> RetinaNet R50, 1x
    python train.py --config configs/coco.py:detector=faster_rcnn ...   # Faster R-CNN R101 -> R50
    python train.py --config configs/coco.py:detector=faster_rcnn,teacher=cmrcnn_x101 ...  # Cascade Mask R-CNN X101
    python train.py --config configs/coco.py:teacher=faster_rcnn_x101 ...         # Faster R-CNN X101 -> RetinaNet, 1x
    python train.py --config configs/coco.py:teacher=mask_rcnn_swin_s,dagger=true ...  # Mask R-CNN Swin-S -> RetinaNet
    python train.py --config configs/coco.py:detector=reppoints ...    # RepPoints X101-DCN -> R50 (moment, GN)
    python train.py --config configs/coco.py:dagger=true ...     # the "dagger" runs: neck + head from the teacher
    python train.py --config configs/coco.py:loss=pkd ...        # a baseline; loss=none: the student alone

The argument after `:`:
- `detector` (retinanet | fcos | faster_rcnn | reppoints): the student. RetinaNet R50: pytorch-style ResNet-50
  (`frozen_stages=1`, `norm_eval`), FPN P3-P7 (`start_level=1`, extra convs on the
  input), 4-conv head with 9 anchors; RGB input with ImageNet's mean/std. FCOS R50:
  caffe-style ResNet-50 with frozen BatchNorm, FPN with extra convs on P5's output
  (ReLU before them), GroupNorm head with learnable scales, centre sampling 1.5,
  centerness on the classification branch, GIoU weighted by the centerness targets;
  BGR input minus the caffe mean, std 1. The FCOS head is the authors' student's
  (`nlkdIN_fcos_r101_fcos_r50_2x_coco.py`): `norm_on_bbox=True, centerness_on_reg=False,
  conv_bias=True` (a bias on every tower conv beside its GroupNorm; mmdet's own `FCOSHead`
  class default, and its `fcos_r50/r101-caffe` checkpoints, have `norm_on_bbox=False` and no
  tower biases, so a dagger run keeps those biases at their initialisation, as mmengine's
  loader does). The task's training targets follow the head's `norm_on_bbox`. The student's backbone starts from an ImageNet `.pth`
  (`student.pretrained`: torchvision's `resnet50` for RetinaNet and Faster R-CNN, the
  detectron `resnet50_caffe` for FCOS), its neck and head from scratch. Faster R-CNN R50
  (`faster-rcnn_r50_fpn_2x_coco`): the RetinaNet student's backbone and input, FPN P2-P6
  (P6 by max-pool), RPN (3 anchors) and a RoI head (RoIAlign 7x7 over P2-P5, two fc 1024);
  its RoI sampler draws from keys of (seed, step, image), see `cankd_jax/detection/rcnn.py`. RepPoints R50
  (`reppoints-moment_r50_fpn-gn_head-gn_2x_coco`): the RetinaNet student's backbone and input, FPN P3-P7 with
  GroupNorm (extra convs on C5), `RepPointsHead` (3 GroupNorm convs per branch, 9 points, deformable convs over
  them, moment boxes), the point-assigner / max-IoU targets of `cankd_jax/detection/reppoints.py`.
- `teacher` (retinanet_r101 | retinanet_x101 | fcos_r101 | fcos_x101 | gfl_r101 | faster_rcnn_r101 |
  faster_rcnn_x101 (X101-32x4d) | cmrcnn_x101 (Cascade Mask R-CNN X101-64x4d, 20e) | mask_rcnn_swin_s
  (mmdet's `mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco`: Swin-S, FPN P2-P6) | reppoints_x101_dcn
  (`reppoints-moment_x101-dconv-c3-c5_fpn-gn_head-gn_2x_coco`: ResNeXt-101 32x4d with deformable convs in
  c3-c5, GroupNorm FPN P3-P7; the default teacher of detector=reppoints, as the authors'
  `nlkdIN_reppoints_x101_reppoints_r50_2x_coco.py`)): the
  teacher's backbone + FPN (a trunk: no head, frozen, BatchNorm in inference mode, no
  gradient). Only the `backbone.*` and `neck.*` keys of its mmdet `.pth` are read (the
  rest are listed as ignored); `--config.teacher.checkpoint` is required (the run refuses
  a teacher without weights unless `teacher.random_init=True`). The teacher sees the
  student's normalised input, as mmrazor feeds it (RetinaNet/FCOS-X101/GFL teachers and a
  RetinaNet student share the RGB ImageNet normalisation, FCOS R101 and the FCOS student
  the caffe one; the R-CNN teachers and students the RGB one). Levels pair by stride: a
  Faster R-CNN / Cascade teacher gives P2-P6, so `teacher=faster_rcnn_x101` distils a
  RetinaNet student's P3-P6 from the teacher's P3-P6. (The authors'
  `nlkdIN_fpn_faster-rcnn_x101_retina_r50_1x_coco.py` pairs the two necks' outputs 0-3 by
  index, P2-P5 with P3-P6, which their plain loss cannot take: the maps' sizes differ.) A
  Faster R-CNN student needs a teacher with P2 (a Faster R-CNN or Cascade teacher).
- `pairing` (auto | stride | index): which teacher level each student level is distilled from.
  `stride`: the level of the same stride (P3 from P3). `index`: the teacher's first four levels with the
  student's, as the authors' configs pair the two necks' outputs 0-3; where their strides differ (a P2-P6
  teacher and a P3-P7 student: P2-P5 against P3-P6) each student map is upsampled to its teacher level's
  size first, with `cankd` as the authors' `NLKD_IN_align_Loss` (`cankd_align`, also its ablations) and with
  PKD's own resize; the other losses need `stride`. `auto`: `index` for `mask_rcnn_swin_s` (the authors'
  `nlkdIN_dagger_fpn_mask-rcnn_swin_retina_r50_2x_coco.py`), `stride` otherwise.
- `dagger` (false | true): the student's `neck.*` and `bbox_head.*` start from the
  teacher's checkpoint (same detector family only); the backbone stays ImageNet R50. For a
  Faster R-CNN student, as the authors' dagger configs: `neck.*` and
  `roi_head.bbox_head.*` (the RPN head from scratch), from a Cascade teacher its first
  stage's `roi_head.bbox_head.0.*`, whose class-agnostic `fc_reg` (4 outputs, not 320)
  is skipped and logged, as mmengine's loader skips it. From `mask_rcnn_swin_s` (RetinaNet student), as the
  authors' Swin config: `neck.*` only, each tensor whose shape agrees, as mmengine's non-strict loader
  takes it (the 3x3 output convs of the first three levels, and the biases of the laterals and of the C5
  extra conv); the weights of the laterals (96-768 input channels against 512-2048) and of the C5 extra conv
  are skipped and logged, P7's conv starts afresh.
- `loss` (a preset of `cankd_jax/losses/presets.py`, or none): one loss module per level
  P3-P6 (P7 not distilled; P2-P5 for Faster R-CNN, P6 not distilled), each with its own
  parameters; CanKD `in_channels=256`, `loss_weight=10` (the reference's /2 makes that an
  effective 5).
- `schedule` (auto | 1x | 2x): 2x (24 epochs, lr x0.1 at 16 and 22) for the paper's
  pairs, 1x (12 epochs, 8 and 11) for FCOS X101, GFL R101 and Faster R-CNN X101 ->
  RetinaNet R50, as the authors' configs (`nlkdIN_fpn_fcos_x101_retina_r50_1x_coco.py`,
  `nlkdIN_fpn_gfl-r101_retina-r50_1x_coco.py`, `nlkdIN_fpn_faster-rcnn_x101_retina_r50_1x_coco.py`);
  auto picks these.

Recipe (mmrazor's, as the paper trains): SGD lr 0.005 for the global batch of 4 (0.02 x
4/16), momentum 0.9, weight decay 1e-4 (on every parameter, BatchNorm and loss modules
included), global gradient-norm clip 35, linear warm-up over 500 steps from 0.001x. An
epoch is the 117,266 training images that have annotations / 4 = 29,316 steps (the
grouped batches drop each epoch's few leftovers of an orientation). COCO evaluation
(mAP = COCOeval's AP at IoU 0.50:0.95) of val2017 every epoch and at the end.

Paper results (COCO val mAP, teacher / student / student+CanKD / dagger):
RetinaNet R101 -> R50 38.9 / 37.4 / 39.7 / 39.8; RetinaNet X101 -> R50 41.0 / 37.4 / 41.0 / 41.1;
FCOS R101 -> R50 40.8 / 38.5 / 42.4 / 42.4; FCOS X101 -> RetinaNet R50 (1x) 42.7 / 37.4 / 40.5;
Faster R-CNN R101 -> R50 39.8 / 38.4 / 40.1 / 40.7; Cascade Mask R-CNN X101 -> Faster R-CNN R50
45.6 / 38.4 / 42.0 / 42.5; RepPoints X101-DCN -> R50 44.2 / 38.6 / 42.4 / 42.6.
"""

import ml_collections

from cankd_jax import config_arg
from cankd_jax.data.options import data_section
from cankd_jax.losses.presets import PRESET_LOSSES, SIZE_ALIGNED, align_sizes, detection_terms

TRAIN_IMAGES = 117_266  # COCO train2017 images with annotations (mmdet's filter_empty_gt)
BATCH = 4  # global: the paper's 2 GPUs x 2 images
STEPS_PER_EPOCH = TRAIN_IMAGES // BATCH

# detector -> (the student's network block, its input normalisation, the pyramid levels it distils)
P3_P6 = ("fpn.p3", "fpn.p4", "fpn.p5", "fpn.p6")
P2_P5 = ("fpn.p2", "fpn.p3", "fpn.p4", "fpn.p5")
STUDENTS = {
    "retinanet": (dict(name="retinanet", backbone="resnet50"), "pytorch", P3_P6),
    "fcos": (dict(name="fcos", backbone="resnet50_caffe",
                  head_kwargs=dict(norm_on_bbox=True, centerness_on_reg=False, conv_bias=True)), "caffe", P3_P6),
    "faster_rcnn": (dict(name="faster_rcnn", backbone="resnet50"), "pytorch", P2_P5),
    "reppoints": (dict(name="reppoints", backbone="resnet50"), "pytorch", P3_P6),
}
# teacher -> (its detector family, the trunk that reads its backbone and neck, the pyramid levels it gives)
P3_P7 = tuple(f"fpn.p{k}" for k in range(3, 8))
P2_P6 = tuple(f"fpn.p{k}" for k in range(2, 7))
TEACHERS = {
    "retinanet_r101": ("retinanet", dict(name="retinanet_fpn", backbone="resnet101"), P3_P7),
    "retinanet_x101": ("retinanet", dict(name="retinanet_fpn", backbone="resnext101_64x4d"), P3_P7),
    "fcos_r101": ("fcos", dict(name="fcos_fpn", backbone="resnet101_caffe"), P3_P7),
    "fcos_x101": ("fcos", dict(name="fcos_fpn", backbone="resnext101_64x4d"), P3_P7),
    "gfl_r101": ("gfl", dict(name="gfl_fpn", backbone="resnet101"), P3_P7),
    "faster_rcnn_r101": ("faster_rcnn", dict(name="faster_rcnn_fpn", backbone="resnet101"), P2_P6),
    "faster_rcnn_x101": ("faster_rcnn", dict(name="faster_rcnn_fpn", backbone="resnext101_32x4d"), P2_P6),
    "cmrcnn_x101": ("cascade_mask_rcnn", dict(name="cascade_rcnn_fpn", backbone="resnext101_64x4d"), P2_P6),
    # mmdet's Swin detectors: drop_path_rate 0.2 in training; the teacher runs in inference mode, where it is off
    "mask_rcnn_swin_s": ("mask_rcnn", dict(name="mask_rcnn_fpn", backbone="swin_small"), P2_P6),
    "reppoints_x101_dcn": ("reppoints", dict(name="reppoints_fpn", backbone="resnext101_32x4d_dcn"), P3_P7),
}
DEFAULT_TEACHER = {"reppoints": "reppoints_x101_dcn"}  # the rest: <detector>_r101
INDEX_PAIRED = {"mask_rcnn_swin_s"}  # teachers whose authors' config pairs levels by index (pairing=auto)
# (teacher family, student) -> the dagger run's (model-key prefix, checkpoint-key prefix) pairs and whether tensors of
# another shape are skipped (the authors' configs; a pair not listed has no dagger run)
HEAD = [("neck.", "neck."), ("bbox_head.", "bbox_head.")]
DAGGER = {
    ("retinanet", "retinanet"): (HEAD, False),
    ("fcos", "fcos"): (HEAD, False),
    ("faster_rcnn", "faster_rcnn"): ([("neck.", "neck."), ("roi_head.bbox_head.", "roi_head.bbox_head.")], False),
    # Cascade's first stage; its fc_reg is class-agnostic (4 outputs), the student's class-specific (320)
    ("cascade_mask_rcnn", "faster_rcnn"): ([("neck.", "neck."), ("roi_head.bbox_head.", "roi_head.bbox_head.0.")],
                                           True),
    # the neck alone, by shape: mmengine's non-strict loader (init_cfg=dict(type='Pretrained', prefix='neck.'))
    ("mask_rcnn", "retinanet"): ([("neck.", "neck.")], True),
    ("reppoints", "reppoints"): (HEAD, False),
}
SCHEDULES = {"1x": (12, (8, 11)), "2x": (24, (16, 22))}
ONE_X = {("fcos_x101", "retinanet"), ("gfl_r101", "retinanet"), ("faster_rcnn_x101", "retinanet")}  # the rest: 2x


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = config_arg.parse(arg, {"detector": tuple(STUDENTS), "teacher": tuple(TEACHERS), "dagger": ("false", "true"),
                               "loss": (*PRESET_LOSSES, "none"), "schedule": ("auto", "1x", "2x"),
                               "pairing": ("auto", "stride", "index")},
                         {"detector": "retinanet", "teacher": "", "dagger": "false", "loss": "cankd",
                          "schedule": "auto", "pairing": "auto"}, config="configs/coco.py")
    detector = a["detector"]
    teacher = a["teacher"] or DEFAULT_TEACHER.get(detector, f"{detector}_r101")
    family, trunk, teacher_levels = TEACHERS[teacher]
    student, norm, levels = STUDENTS[detector]
    pairing = a["pairing"]
    if pairing == "auto":
        pairing = "index" if teacher in INDEX_PAIRED else "stride"
    if pairing == "index":
        teacher_levels = teacher_levels[:len(levels)]
    elif not set(levels) <= set(teacher_levels):
        raise ValueError(f"configs/coco.py: a {detector} student distils {', '.join(levels)}, and teacher={teacher} "
                         f"gives only {', '.join(teacher_levels)}; choose a teacher with those levels "
                         f"({', '.join(t for t, v in TEACHERS.items() if set(levels) <= set(v[2]))})")
    schedule = a["schedule"]
    if schedule == "auto":
        schedule = "1x" if (teacher, detector) in ONE_X else "2x"
    epochs, decay_epochs = SCHEDULES[schedule]
    dagger = a["dagger"] == "true"
    if dagger and (family, detector) not in DAGGER:
        raise ValueError(f"configs/coco.py: dagger starts the student's neck and head from the teacher's, so the "
                         f"teacher must be a {' or '.join(f for f, d in DAGGER if d == detector)} "
                         f"(teacher={teacher} is a {family})")
    inherit_prefixes, skip_mismatched = DAGGER.get((family, detector), (HEAD, False))

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dtype = "float32"  # compute dtype: 'bfloat16' for mixed precision (parameters, optimizer, checkpoints stay float32)
    c.remat = "none"  # jax.checkpoint policy for the student's stem, blocks and heads, e.g. 'nothing_saveable' (cankd_jax/compute.py)
    c.total_steps = epochs * STEPS_PER_EPOCH
    c.batch_size = BATCH
    c.log_every = 50
    c.eval_every = STEPS_PER_EPOCH
    c.checkpoint_every = 2_000
    c.keep_checkpoints = 3
    c.metric = "mAP"

    c.task = dict(name="detection", num_classes=80, detector=detector)
    c.data = data_section("coco", data_dir="", scale=(1333, 800), norm=norm, augment="resize_flip", flip_prob=0.5,
                          max_boxes=0, min_size=32, filter_empty=True, eval_batch_size=8, workers=8, index_cache="")
    c.student = dict(student, frozen_stages=1, norm_eval=True,
                     pretrained="",  # the ImageNet backbone .pth (torchvision resnet50 / detectron resnet50_caffe)
                     pretrained_prefixes=[("backbone.", "")],
                     inherit="teacher" if dagger else "",  # dagger: neck.* and the head from teacher.checkpoint
                     inherit_prefixes=inherit_prefixes, inherit_skip_mismatched=skip_mismatched)
    c.teacher = dict(trunk, checkpoint="", random_init=False)  # mmdet's trained detector .pth: backbone.*, neck.*
    c.distill = [] if a["loss"] == "none" else _terms(a["loss"], levels, teacher_levels if pairing == "index" else levels)
    c.optimizer = dict(name="sgd", lr=0.005, momentum=0.9, weight_decay=1e-4, grad_clip_norm=35.0,
                       schedule="step", boundaries=[e * STEPS_PER_EPOCH for e in decay_epochs], decay_factor=0.1,
                       warmup_steps=500, warmup_factor=0.001)
    c.mesh = dict(fsdp=False, fsdp_min_size=2**16)  # FSDP spreads arrays of at least this many elements
    c.export = dict(pytorch=True)
    return c


def _terms(loss: str, levels: tuple[str, ...], teacher_levels: tuple[str, ...]) -> list:
    """The distill entries of `loss` on `levels`, each against its teacher level; where a pair's strides differ
    the loss must take maps of different sizes (`align_sizes`)."""
    terms = detection_terms(loss, levels=levels, teacher_levels=teacher_levels)
    refused = align_sizes(terms)
    if refused:
        term = refused[0]
        raise ValueError(f"configs/coco.py: pairing=index distils {term['student_feature']} from the teacher's "
                         f"{term['teacher_feature']}, a map of another size, which loss={loss} cannot take; use "
                         f"pairing=stride, or a loss that resizes ({', '.join(sorted(SIZE_ALIGNED))} and cankd's "
                         f"ablations)")
    return terms
