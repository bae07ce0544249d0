"""Each registered loss as the papers and mmrazor apply it to a teacher/student pair: one `distill` config entry.

Configs build their `distill` list from here, so the comparison tables use the
same settings everywhere and a config only says which loss and which widths.
"""

from __future__ import annotations

from typing import Any, Optional

# name -> (the feature it reads: 'feature' or 'logits', needs equal widths, options), and where each setting comes
# from (mmrazor paths are in open-mmlab/mmrazor's configs/distill/):
#   cankd          loss_weight 10: the paper's configs (tori-hotaru/CanKD); the reference's /2 makes it an effective 5
#   nonlocal_self  as CanKD: the block it replaces, at the same weight
#   fitnet         L2Loss(loss_weight=10): mmcls/fitnet/fitnet_backbone_logits_resnet50_resnet18_8xb32_in1k.py
#   pkd            loss_weight 6: mmdet/pkd/pkd_fpn_frcnn_r101_frcnn_r50_2x_coco.py (the RetinaNet variants use 10)
#   mgd            alpha_mgd 2e-5: mmdet/mgd/mgd_fpn_retina_x101_retina_r50_2x_coco.py; lambda_mgd 0.75 for
#                  segmentation (the MGD paper's setting; mmrazor's detection configs use 0.65)
#   cwd            tau 1, loss_weight 5 on the decode head's logits:
#                  mmseg/cwd/cwd_logits_pspnet_r101_d8_pspnet_r18_d8_512x1024_cityscapes_80k.py
#   at             loss_weight 1000: beta = 1e3 of Zagoruyko & Komodakis (mmrazor ships ATLoss with no config)
_PRESETS: dict[str, tuple[str, bool, dict[str, Any]]] = {
    "cankd": ("feature", True, dict(loss_weight=10.0)),
    "nonlocal_self": ("feature", True, dict(loss_weight=10.0)),
    "fitnet": ("feature", True, dict(loss_weight=10.0)),
    "pkd": ("feature", True, dict(loss_weight=6.0)),
    "mgd": ("feature", False, dict(alpha_mgd=2e-5, lambda_mgd=0.75)),  # aligns widths itself
    "cwd": ("logits", True, dict(tau=1.0, loss_weight=5.0)),
    "at": ("feature", False, dict(loss_weight=1000.0)),
}

PRESET_LOSSES = tuple(_PRESETS)


def distill_term(loss: str, *, student_channels: int, teacher_channels: int, feature: str = "layer4",
                 student_feature: Optional[str] = None, logits: str = "head.logits", weight: float = 1.0,
                 **options: Any) -> dict[str, Any]:
    """The `distill` entry for `loss` between the student's and teacher's `feature` maps.

    Args:
      loss: a name in `PRESET_LOSSES`.
      student_channels, teacher_channels: widths of `feature` in each network; a
        1x1 connector maps the student's to the teacher's when the loss needs
        equal widths and they differ (the paper's 512 -> 2048).
      feature: the network output both sides read (e.g. 'layer4', 'fpn.p3').
      student_feature: the student's output, when it is named otherwise (a MobileNetV2's 'layer7').
      logits: the output read by losses on logits (CWD).
      options: the loss's options over the preset's (e.g. a pairing's own `loss_weight`).
    """
    if loss not in _PRESETS:
        raise ValueError(f"no preset for loss {loss!r}; presets exist for {', '.join(PRESET_LOSSES)}")
    reads, same_width, preset = _PRESETS[loss]
    options = {**preset, **options}
    connector = 0
    if reads == "feature" and same_width and student_channels != teacher_channels:
        connector = teacher_channels
    if loss in ("cankd", "nonlocal_self"):
        options["in_channels"] = teacher_channels
    if loss == "mgd":
        options["teacher_channels"] = teacher_channels
    t_name = feature if reads == "feature" else logits
    s_name = (student_feature or feature) if reads == "feature" else logits
    return dict(name=loss, loss=loss, student_feature=s_name, teacher_feature=t_name, connector=connector,
                weight=weight, options=options)
