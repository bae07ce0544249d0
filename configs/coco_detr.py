"""The paper's DETR-family COCO runs: a DINO student distilled on its ChannelMapper levels from a DINO teacher.

    python train.py --config configs/coco_detr.py --workdir runs/dino_r101_r50_cankd \\
        --config.data.data_dir=/data/tfds \\
        --config.teacher.checkpoint=dino-4scale_r101_8xb2-12e_coco.pth \\   # a trained DINO R101 (mmdet .pth)
        --config.student.pretrained=resnet50-0676ba61.pth                   # torchvision's ImageNet R50
    python train.py --config configs/coco_detr.py:teacher=dino_swin_l ... \\
        --config.teacher.checkpoint=dino-5scale_swin-l_8xb2-36e_coco-5486e051.pth \\
        --config.student.pretrained=swin_base_patch4_window12_384_22k.pth   # the Swin release's ImageNet-22k Swin-B
    python train.py --config configs/coco_detr.py:loss=none ...   # the student alone (mmdet's DINO recipe)

The argument after `:`:
- `teacher` (dino_r101 | dino_swin_l): the pair, as the authors' configs.
  `dino_r101` (`nlkd_dino-r101_dino-r50_12e_coco.py`): DINO-4scale R101 -> DINO-4scale R50, CanKD on the
  ChannelMapper's outputs 0-2 (`fpn.p3`-`fpn.p5`). The teacher is the authors' own 12-epoch DINO R101 (mmdet
  publishes no R101 DINO): any mmdet `DINO` checkpoint with a ResNet-101 backbone. `dino_swin_l`
  (`nlkdIN_dino-swinL_dino_swinb_12e_coco.py`): DINO-5scale Swin-L (mmdet's 36-epoch checkpoint) -> DINO-5scale
  Swin-B (window 12, 384 pre-training, drop path 0.3), outputs 0-3 (`fpn.p2`-`fpn.p5`). The teacher is the
  detector's backbone + ChannelMapper (a trunk: frozen, inference mode, no gradient; only its `backbone.*` and
  `neck.*` keys are read). Its levels pair with the student's by index, which here is also by stride.
- `loss` (a preset of `cankd_jax/losses/presets.py`, or none): one loss module per level, CanKD
  `in_channels=256`, `loss_weight=10` (the authors' `NLKD_IN_Loss`).
- `inherit` (auto | true | false): the student's encoder, decoder and head (and, for R50, its neck; the Swin-B
  neck reads other channel counts) start from the teacher's checkpoint, as the authors' configs do with
  `init_cfg=dict(type='Pretrained', prefix=...)`; the rest (backbone: ImageNet, queries, level embeddings,
  the memory projection, the denoising label embedding) as in mmdet. `auto`: true when distilling, false for
  `loss=none` (the student alone, which the paper quotes from mmdet's recipe: DINO R50 12e, 49.0).

Recipe (mmdet's `dino-4scale_r50_8xb2-12e_coco.py`, which the authors' configs keep): global batch 16
(mmdet's 8 GPUs x 2 images, the batch its learning rate is set for: `auto_scale_lr` base 16); AdamW lr 1e-4,
weight decay 1e-4, the backbone's learning rate (and decay) at 0.1x (`optimizer.lr_mult`), gradient-norm clip
0.1; 12 epochs, lr x0.1 after epoch 11, no warm-up. Augmentation (`data.augment='detr'`,
`cankd_jax/data/detection.py:DetrTrainAugment`): flip, then either a multi-scale resize (short edge 480-800,
long <= 1333) or resize / random crop (384-600) / multi-scale resize; batches grouped by the padded shape each
image's draw gives (`pipeline.DrawnGroupEpochs`). Images without annotations train too (`filter_empty_gt=False`),
as negatives. The student's BatchNorm is frozen (R50: `requires_grad=False`, `norm_eval`; the authors' student
leaves `frozen_stages` commented out, so the R50 stem and layer1 train). 300 detections per image, COCO
evaluation of val2017 every epoch.

Paper results (COCO val mAP, teacher / student / student+CanKD): DINO R101 -> R50 50.4 / 49.0 / 49.7.
"""

import ml_collections

from cankd_jax import config_arg
from cankd_jax.data.options import data_section
from cankd_jax.losses.presets import PRESET_LOSSES, detection_terms

TRAIN_IMAGES = 118_287  # COCO train2017 (filter_empty_gt=False keeps the images without annotations)
BATCH = 16  # global: mmdet's 8 GPUs x 2 images
STEPS_PER_EPOCH = TRAIN_IMAGES // BATCH
EPOCHS, DECAY_EPOCH = 12, 11

ENCODER_DECODER_HEAD = [("encoder.", "encoder."), ("decoder.", "decoder."), ("bbox_head.", "bbox_head.")]
# teacher -> (its trunk, the student, the levels distilled (student = teacher level), the student's keys the
# teacher's checkpoint gives)
PAIRS = {
    "dino_r101": (dict(name="channel_mapper", backbone="resnet101"),
                  # the authors' student: every stage trains (`frozen_stages=1` commented out; mmdet's own DINO
                  # R50 freezes the stem and layer1), BatchNorm frozen (requires_grad=False, norm_eval)
                  dict(name="dino", backbone="resnet50", frozen_stages=-1, norm_eval=True),
                  ("fpn.p3", "fpn.p4", "fpn.p5"), [("neck.", "neck."), *ENCODER_DECODER_HEAD]),
    "dino_swin_l": (dict(name="channel_mapper_5scale", backbone="swin_large_384"),
                    dict(name="dino_5scale", backbone="swin_base_384", frozen_stages=-1,
                         backbone_kwargs=dict(drop_path_rate=0.3)),
                    ("fpn.p2", "fpn.p3", "fpn.p4", "fpn.p5"), ENCODER_DECODER_HEAD),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = config_arg.parse(arg, {"teacher": tuple(PAIRS), "loss": (*PRESET_LOSSES, "none"),
                               "inherit": ("auto", "true", "false")},
                         {"teacher": "dino_r101", "loss": "cankd", "inherit": "auto"}, config="configs/coco_detr.py")
    trunk, student, levels, inherit_prefixes = PAIRS[a["teacher"]]
    inherit = a["inherit"] == "true" or (a["inherit"] == "auto" and a["loss"] != "none")

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dtype = "float32"  # compute dtype: 'bfloat16' for mixed precision (parameters, optimizer, checkpoints stay float32)
    c.remat = "none"  # jax.checkpoint policy for the student's stem, blocks and heads (mmdet's Swin-B: with_cp=True)
    c.total_steps = EPOCHS * STEPS_PER_EPOCH
    c.batch_size = BATCH
    c.log_every = 50
    c.eval_every = STEPS_PER_EPOCH
    c.checkpoint_every = 2_000
    c.keep_checkpoints = 3
    c.metric = "mAP"

    c.task = dict(name="detection", num_classes=80, detector="dino", dn_queries=100)
    c.data = data_section("coco", data_dir="", scale=(1333, 800), norm="pytorch", augment="detr", flip_prob=0.5,
                          max_boxes=0, min_size=32, filter_empty=False, eval_batch_size=8, workers=8, index_cache="")
    c.student = dict(student,
                     pretrained="",  # the ImageNet backbone .pth (torchvision resnet50 / the Swin release's Swin-B)
                     pretrained_prefixes=[("backbone.", "")],
                     inherit="teacher" if inherit else "",  # encoder, decoder, head (R50: neck) from teacher.checkpoint
                     inherit_prefixes=inherit_prefixes, inherit_skip_mismatched=False)
    c.teacher = dict(trunk, checkpoint="", random_init=False)  # mmdet's trained DINO .pth: backbone.*, neck.*
    c.distill = [] if a["loss"] == "none" else detection_terms(a["loss"], levels=levels)
    c.optimizer = dict(name="adamw", lr=1e-4, weight_decay=1e-4, grad_clip_norm=0.1, lr_mult={"backbone": 0.1},
                       schedule="step", boundaries=[DECAY_EPOCH * STEPS_PER_EPOCH], decay_factor=0.1,
                       warmup_steps=0)
    c.mesh = dict(fsdp=False, fsdp_min_size=2**16)  # FSDP spreads arrays of at least this many elements
    c.export = dict(pytorch=True)
    return c
