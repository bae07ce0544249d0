"""ADE20K-style scene parsing (TFDS `scene_parse150`): DeepLabV3 / PSPNet R101-d8 -> R18-d8 with CanKD on layer4.

    python train.py --config configs/ade20k.py --workdir runs/ade_cankd --config.data.data_dir=/data/tfds \\
        --config.teacher.checkpoint=TEACHER.pth --config.student.pretrained=resnet18_v1c.pth
    python train.py --config configs/ade20k.py:head=pspnet,loss=cwd ...

mmsegmentation's `*_512x512_160k_ade20k` recipe (4 GPUs x 4 images): 512x512
crops from images rescaled around 2048x512 by 0.5-2.0, SGD lr 0.01, momentum 0.9,
weight decay 5e-4, poly decay, 160k steps; evaluation on 512x512 resizes.
Distillation as on Cityscapes (512 -> 2048 connector, CanKD loss_weight 10).

Caveat: TFDS's `scene_parse150` holds the 2017 *instance* release (100 classes
after dropping "unlabelled"), not mmseg's 150-class semantic maps, so a teacher
trained by mmseg on ADE20K-150 does not fit it: train the teacher here first
(`loss=none` and the teacher's network as the student, see the demo's phases).
"""

import ml_collections

from cankd_jax import config_arg
from cankd_jax.data.options import data_section
from cankd_jax.losses.presets import PRESET_LOSSES, distill_term


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = config_arg.parse(arg, {"head": ("deeplabv3", "pspnet"), "loss": (*PRESET_LOSSES, "none")},
                         {"head": "deeplabv3", "loss": "cankd"}, config="configs/ade20k.py")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dtype = "float32"  # compute dtype: 'bfloat16' for mixed precision (parameters, optimizer, checkpoints stay float32)
    c.remat = "none"  # jax.checkpoint policy for the student's stem, blocks and heads, e.g. 'nothing_saveable' (cankd_jax/compute.py)
    c.total_steps = 160_000
    c.batch_size = 16  # global: mmseg's 4 GPUs x 4 images
    c.log_every = 50
    c.eval_every = 16_000
    c.checkpoint_every = 4_000
    c.keep_checkpoints = 3
    c.metric = "mIoU"
    c.task = dict(name="segmentation", num_classes=100, aux_weight=0.4, avg_non_ignore=False)
    c.data = data_section("scene_parse150", data_dir="", crop_size=(512, 512), scale=(2048, 512),
                          ratio_range=(0.5, 2.0), cat_max_ratio=0.75, eval_scale=(512, 512), eval_keep_ratio=False,
                          eval_batch_size=16, workers=8)
    c.student = dict(name=a["head"], backbone="resnet18_v1c_d8", frozen_stages=-1, norm_eval=False,
                     pretrained="", pretrained_prefixes=[("backbone.", "")])
    c.teacher = dict(name=a["head"], backbone="resnet101_v1c_d8", checkpoint="", random_init=False)
    c.distill = [] if a["loss"] == "none" else [distill_term(a["loss"], student_channels=512, teacher_channels=2048)]
    c.optimizer = dict(name="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, grad_clip_norm=0.0,
                       schedule="poly", power=0.9, min_lr=1e-4, warmup_steps=0)
    c.mesh = dict(fsdp=False, fsdp_min_size=2**16)  # FSDP spreads arrays of at least this many elements
    c.export = dict(pytorch=True)
    return c
