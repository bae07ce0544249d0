"""The README's main command: does CanKD help a small student? Answered on 2 CPU cores in under 15 minutes.

    python train.py --config configs/demo.py --workdir /tmp/demo
    python train.py --config configs/demo.py:loss=mgd --workdir /tmp/demo          # a baseline instead
    python train.py --config configs/demo.py:loss=cankd+cwd+at --workdir /tmp/demo  # several, one table

Three phases on the built-in synthetic scene-parsing set (64x64, 7 classes, no
download), each in `workdir/<phase>` and each resumable on its own:

  teacher   FCN on a ResNet-18-d8 at a quarter of the standard width, from
            scratch; re-used when `workdir/teacher` already holds a finished run
  student   the same network at an eighth of the width (a quarter of the
            teacher's parameters), task loss only
  <loss>    the same student, same steps and data order, plus the distillation
            loss on layer4 against the trained teacher: the paper's recipe
            scaled down (64 -> 128 channel 1x1 connector, loss_weight 10)

`workdir/summary.json` gets `{"metric": "mIoU", "teacher": x, "student": y,
"cankd": z, ...}` with held-out numbers, and the table is printed at the end.
The argument after `:` picks the distillation loss(es) by preset name:
cankd (default), nonlocal_self, fitnet, pkd, mgd, cwd, at, in_mse ("IN only"), and CanKD's
ablations cankd_no_in, cankd_no_skip, cankd_gaussian, cankd_embedded_gaussian, cankd_concatenation.
`benchmarks/kd_study.py` runs every one of them over several seeds.
"""

import ml_collections

from cankd_jax import config_arg
from cankd_jax.data.options import data_section
from cankd_jax.losses.presets import PRESET_LOSSES, distill_term

STEPS = 1000             # each student phase
TEACHER_STEPS = 2000
TEACHER_WIDTH = 16       # ResNet-18 layer4: 16 * 8 = 128 channels
STUDENT_WIDTH = 8        # ResNet-18 layer4: 8 * 8 = 64 channels

def _network(width: int) -> dict:
    return dict(name="fcn", backbone="resnet18_v1c_d8", backbone_kwargs=dict(base_width=width, stem_width=width),
                head_channels=4 * width, frozen_stages=-1, norm_eval=False)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    losses = config_arg.parse(arg, {"loss": PRESET_LOSSES}, {"loss": ["cankd"]}, config="configs/demo.py",
                              lists=("loss",))["loss"]
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dtype = "float32"  # compute dtype: 'bfloat16' for mixed precision (parameters, optimizer, checkpoints stay float32)
    c.remat = "none"  # jax.checkpoint policy for the student's stem, blocks and heads, e.g. 'nothing_saveable' (cankd_jax/compute.py)
    c.total_steps = STEPS
    c.batch_size = 16  # global
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 250
    c.keep_checkpoints = 2
    c.metric = "mIoU"

    # Background is 84 % of the pixels: down-weighting it (mmseg's class_weight) gets from-scratch networks
    # past the predict-everything-background plateau within the demo's minutes.
    c.task = dict(name="segmentation", num_classes=7, aux_weight=0.4, avg_non_ignore=False,
                  class_weight=(0.2, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0))
    c.data = data_section("synthetic", data_dir="", image_size=64, num_train=2000, num_test=500,
                          ratio_range=(0.75, 1.5), photometric=False, eval_batch_size=50, workers=0)
    c.student = _network(STUDENT_WIDTH)
    c.teacher = dict(_network(TEACHER_WIDTH), checkpoint="{workdir}/teacher/export")
    c.distill = []
    # From scratch in minutes: AdamW gets there far sooner than the paper's SGD (which assumes an
    # ImageNet-initialised backbone and 80k steps; see configs/cityscapes.py).
    c.optimizer = dict(name="adamw", lr=3e-3, weight_decay=1e-4, grad_clip_norm=0.0,
                       schedule="poly", power=0.9, min_lr=1e-5, warmup_steps=50)
    c.mesh = dict(fsdp=False, fsdp_min_size=2**16)  # FSDP spreads arrays of at least this many elements
    c.export = dict(pytorch=True)

    c.phases = ["teacher", "student", *losses]
    c.phase_overrides = {
        "teacher": dict(student=_network(TEACHER_WIDTH), total_steps=TEACHER_STEPS),
        "student": {},
        **{name: dict(distill=[distill_term(name, student_channels=STUDENT_WIDTH * 8,
                                            teacher_channels=TEACHER_WIDTH * 8)]) for name in losses},
    }
    return c
