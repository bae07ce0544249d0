"""Classification distillation with CanKD on the last stage: ImageNet ResNet-34 -> ResNet-18, or CIFAR-10.

    python train.py --config configs/classification.py --workdir runs/in_cankd --config.data.data_dir=/data/tfds \\
        --config.teacher.checkpoint=resnet34-b627a593.pth          # torchvision's ImageNet ResNet-34
    python train.py --config configs/classification.py:data=cifar10 --workdir runs/c10_cankd \\
        --config.teacher.checkpoint=runs/c10_teacher/export         # a teacher trained here (loss=none)
    python train.py --config configs/classification.py:loss=at ...  # a baseline; loss=none: no distillation

ImageNet: the usual KD benchmark pairing and recipe (torchvision layout, SGD lr
0.1 for batch 256, momentum 0.9, weight decay 1e-4, 100 epochs, lr x0.1 at
epochs 30/60/90, random-resized 224 crops, evaluation at 256 -> 224 centre).
Both layer4 maps have 512 channels (7x7), so no connector.

CIFAR-10: 32x32 images leave a 1x1 layer4 on a standard ResNet, nothing for a
non-local loss to relate, so both networks are output-stride-8 ResNets (4x4
layer4): ResNet-50-d8 teacher (2048 channels) -> ResNet-18-d8 student through
a 512 -> 2048 connector; SGD lr 0.1, batch 128, 200 epochs, cosine decay.
"""

import ml_collections

from cankd_jax import config_arg
from cankd_jax.data.options import data_section
from cankd_jax.losses.presets import PRESET_LOSSES, distill_term

# dataset -> (student, teacher, student / teacher layer4 widths, epochs, train images, global batch, schedule)
SETUPS = {
    "imagenet2012": ("resnet18", "resnet34", 512, 512, 100, 1_281_167, 256,
                     dict(schedule="step", boundaries_epochs=(30, 60, 90), lr=0.1, weight_decay=1e-4)),
    "cifar10": ("resnet18_v1c_d8", "resnet50_v1c_d8", 512, 2048, 200, 50_000, 128,
                dict(schedule="cosine", lr=0.1, weight_decay=5e-4)),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = config_arg.parse(arg, {"data": tuple(SETUPS), "loss": (*PRESET_LOSSES, "none")},
                         {"data": "imagenet2012", "loss": "cankd"}, config="configs/classification.py")
    student, teacher, s_ch, t_ch, epochs, n_train, batch, opt = SETUPS[a["data"]]
    steps_per_epoch = n_train // batch
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dtype = "float32"  # compute dtype: 'bfloat16' for mixed precision (parameters, optimizer, checkpoints stay float32)
    c.remat = "none"  # jax.checkpoint policy for the student's stem, blocks and heads, e.g. 'nothing_saveable' (cankd_jax/compute.py)
    c.total_steps = epochs * steps_per_epoch
    c.batch_size = batch
    c.log_every = 100
    c.eval_every = 5 * steps_per_epoch
    c.checkpoint_every = steps_per_epoch
    c.keep_checkpoints = 3
    c.metric = "top1"
    c.task = dict(name="classification", num_classes=1000 if a["data"] == "imagenet2012" else 10)
    c.data = data_section(a["data"], data_dir="", eval_batch_size=batch, workers=8)
    c.student = dict(name=student)
    c.teacher = dict(name=teacher, checkpoint="", random_init=False)
    if a["loss"] == "cwd":
        raise ValueError("configs/classification.py: cwd distills dense logits; choose a feature loss here")
    c.distill = [] if a["loss"] == "none" else [distill_term(a["loss"], student_channels=s_ch, teacher_channels=t_ch)]
    boundaries = [e * steps_per_epoch for e in opt.pop("boundaries_epochs", ())]
    c.optimizer = dict(name="sgd", momentum=0.9, nesterov=False, grad_clip_norm=0.0, warmup_steps=0,
                       **opt, **(dict(boundaries=boundaries, decay_factor=0.1) if boundaries else {}))
    c.mesh = dict(fsdp=False, fsdp_min_size=2**16)  # FSDP spreads arrays of at least this many elements
    c.export = dict(pytorch=True)
    return c
