"""A tiny distillation run for tests and a first look: 10 steps, well under a minute on 2 CPU cores.

Narrow ResNet-18-d8 student (width 8) and a ResNet-18-d8 teacher of twice its width (a random teacher, asked for with
`teacher.random_init`: the point is the machinery, not the numbers) with FCN heads on the built-in synthetic scenes at 32x32,
CanKD on layer4 through a connector.

    python train.py --config configs/smoke.py --workdir /tmp/smoke
"""

import ml_collections

from cankd_jax import config_arg
from cankd_jax.data.options import data_section


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config_arg.parse(arg, {}, {}, config="configs/smoke.py")
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

    c.task = ml_collections.ConfigDict(dict(name="segmentation", num_classes=7, aux_weight=0.4, avg_non_ignore=False))
    c.data = ml_collections.ConfigDict(data_section(
        "synthetic", data_dir="", image_size=32, num_train=64, num_test=16,
        crop_size=(32, 32), scale=(32, 32), ratio_range=(0.75, 1.5), eval_batch_size=8, workers=0,
    ))
    c.student = ml_collections.ConfigDict(dict(
        name="fcn", backbone="resnet18_v1c_d8", backbone_kwargs=dict(base_width=8, stem_width=8), head_channels=16,
        frozen_stages=-1, norm_eval=False,
    ))
    c.teacher = ml_collections.ConfigDict(dict(
        name="fcn", backbone="resnet18_v1c_d8", backbone_kwargs=dict(base_width=16, stem_width=16), head_channels=32,
        checkpoint="",  # a trained teacher: an export/ dir of a teacher run, or a PyTorch .pth
        random_init=True,  # this config exercises the machinery: a random teacher, on purpose
    ))
    c.distill = [ml_collections.ConfigDict(dict(
        name="layer4", loss="cankd", student_feature="layer4", teacher_feature="layer4",
        connector=128, weight=1.0, options=dict(in_channels=128, loss_weight=10.0),  # teacher layer4: 16 * 8
    ))]
    c.optimizer = ml_collections.ConfigDict(dict(
        name="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, grad_clip_norm=0.0,
        schedule="poly", power=0.9, min_lr=1e-4, warmup_steps=0,
    ))
    c.mesh = ml_collections.ConfigDict(dict(fsdp=False, fsdp_min_size=2**16))
    c.export = ml_collections.ConfigDict(dict(pytorch=True))
    return c
