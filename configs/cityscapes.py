"""The paper's Cityscapes runs: DeepLabV3 / PSPNet R101-d8 teachers -> R18-d8 / MobileNetV2-d8 students.

    python train.py --config configs/cityscapes.py --workdir runs/dlv3_cankd \\
        --config.data.data_dir=/data/tfds \\
        --config.teacher.checkpoint=deeplabv3_r101-d8_512x1024_80k_cityscapes_20200606_113503-9e428899.pth \\
        --config.student.pretrained=resnet18_v1c-b5776b93.pth
    python train.py --config configs/cityscapes.py:head=pspnet --workdir runs/psp_cankd ...   # PSPNet
    python train.py --config configs/cityscapes.py:head=pspnet,loss=cwd ...                   # a baseline
    python train.py --config configs/cityscapes.py:loss=none ...                              # student alone
    python train.py --config configs/cityscapes.py:student=mobilenet_v2 ...   # DeepLabV3 R101 -> DeepLabV3 MobileNetV2
    python train.py --config configs/cityscapes.py:teacher=pspnet ...         # PSPNet R101 -> DeepLabV3 R18 (cross-head)

`head` is the student's decode head (and the teacher's, unless `teacher` names
another); `student` its backbone.

As mmsegmentation trains them (`*_512x1024_80k_cityscapes`, 4 GPUs x 2 images):
512x1024 crops from images rescaled around 2048x1024 by 0.5-2.0 (category
ratio check 0.75), flip, photometric distortion; SGD lr 0.01, momentum 0.9,
weight decay 5e-4, poly decay (power 0.9, floor 1e-4), 80k steps; auxiliary FCN
head on layer3 at weight 0.4; whole-image evaluation at 2048x1024, mIoU over 19
classes. The student's backbone starts from ImageNet weights (mmseg's
`open-mmlab://resnet18_v1c`), the teacher from a trained mmseg checkpoint.

Distillation as in the paper: the student's last stage (R18's layer4, 512
channels; MobileNetV2's layer7, 320) goes through a 1x1 connector to the
teacher's 2048, CanKD with loss_weight 10 (the reference's /2 makes that an
effective 5), 20 for the PSPNet -> DeepLabV3 pairing (the authors' config for
it). Batch-norm statistics are over the global batch, as mmseg's SyncBN
computes them. The MobileNetV2 student is mmseg's `deeplabv3_m-v2-d8` (ASPP
on layer7 at 512 channels, auxiliary FCN on layer5 at 256), its backbone from
an ImageNet mmcls `.pth` (keys `backbone.*`). Paper results (mIoU, student ->
CanKD, teacher): DeepLabV3 R18 76.70 -> 77.12 (80.31); PSPNet R18 74.87 ->
76.24 (79.74); DeepLabV3 MobileNetV2 73.84 -> 75.62 (80.31); PSPNet R101 ->
DeepLabV3 R18 76.70 -> 77.34 (79.74).
"""

import ml_collections

from cankd_jax import config_arg
from cankd_jax.data.options import data_section
from cankd_jax.losses.presets import PRESET_LOSSES, distill_term

HEADS = ("deeplabv3", "pspnet")
# student -> (backbone, its distilled stage, that stage's channels, pretrained (model prefix, .pth prefix))
STUDENTS = {
    "r18": ("resnet18_v1c_d8", "layer4", 512, ("backbone.", "")),  # open-mmlab://resnet18_v1c: a bare ResNet
    "mobilenet_v2": ("mobilenet_v2_d8", "layer7", 320, ("backbone.", "backbone.")),  # mmcls://mobilenet_v2
}
CANKD_WEIGHT = {("pspnet", "deeplabv3"): 20.0}  # (teacher head, student head) -> the authors' loss_weight


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = config_arg.parse(arg, {"head": HEADS, "teacher": (*HEADS, "same"), "student": tuple(STUDENTS),
                               "loss": (*PRESET_LOSSES, "none")},
                         {"head": "deeplabv3", "teacher": "same", "student": "r18", "loss": "cankd"},
                         config="configs/cityscapes.py")
    teacher_head = a["head"] if a["teacher"] == "same" else a["teacher"]
    backbone, stage, channels, prefixes = STUDENTS[a["student"]]
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dtype = "float32"  # compute dtype: 'bfloat16' for mixed precision (parameters, optimizer, checkpoints stay float32)
    c.remat = "none"  # jax.checkpoint policy for the student's stem, blocks and heads, e.g. 'nothing_saveable' (cankd_jax/compute.py)
    c.total_steps = 80_000
    c.batch_size = 8  # global: mmseg's 4 GPUs x 2 images
    c.log_every = 50
    c.eval_every = 8_000
    c.checkpoint_every = 2_000
    c.keep_checkpoints = 3
    c.metric = "mIoU"

    c.task = dict(name="segmentation", num_classes=19, aux_weight=0.4, avg_non_ignore=False)
    c.data = data_section("cityscapes", data_dir="", crop_size=(512, 1024), scale=(2048, 1024), ratio_range=(0.5, 2.0),
                          cat_max_ratio=0.75, eval_scale=(2048, 1024), eval_batch_size=8, workers=8)
    # Heads at mmseg's widths (a quarter of layer4 / layer3 for ResNets; 512 / 256 for MobileNetV2).
    c.student = dict(name=a["head"], backbone=backbone, frozen_stages=-1, norm_eval=False,
                     pretrained="", pretrained_prefixes=[prefixes])  # an ImageNet .pth of the backbone
    c.teacher = dict(name=teacher_head, backbone="resnet101_v1c_d8",
                     checkpoint="", random_init=False)  # mmseg's trained R101-d8 .pth
    options = {"loss_weight": CANKD_WEIGHT[teacher_head, a["head"]]} if (
        a["loss"] == "cankd" and (teacher_head, a["head"]) in CANKD_WEIGHT) else {}
    c.distill = [] if a["loss"] == "none" else [
        distill_term(a["loss"], student_channels=channels, teacher_channels=2048, student_feature=stage, **options)]
    c.optimizer = dict(name="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, grad_clip_norm=0.0,
                       schedule="poly", power=0.9, min_lr=1e-4, warmup_steps=0)
    c.mesh = dict(fsdp=False, fsdp_min_size=2**16)  # FSDP spreads arrays of at least this many elements
    c.export = dict(pytorch=True)
    return c
