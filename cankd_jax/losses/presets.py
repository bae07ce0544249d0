"""Each registered loss as the papers and mmrazor apply it to a teacher/student pair: one `distill` config entry.

Configs build their `distill` list from here, so the comparison tables use the
same settings everywhere and a config only says which loss and which widths.
"""

from __future__ import annotations

from typing import Any, Optional

# name -> (the feature it reads: 'feature' or 'logits', needs equal widths, options), and where each setting comes
# from (mmrazor paths are in open-mmlab/mmrazor's configs/distill/):
#   cankd          loss_weight 10: the paper's configs (tori-hotaru/CanKD); the reference's /2 makes it an effective 5
#   cankd_align    as CanKD (NLKD_IN_align_Loss, loss_weight 10: nlkdIN_dagger_fpn_mask-rcnn_swin_retina_r50_2x_coco.py)
#   nonlocal_self  as CanKD: the block it replaces, at the same weight
#   fitnet         L2Loss(loss_weight=10): mmcls/fitnet/fitnet_backbone_logits_resnet50_resnet18_8xb32_in1k.py
#   pkd            loss_weight 6: mmdet/pkd/pkd_fpn_frcnn_r101_frcnn_r50_2x_coco.py (the RetinaNet variants use 10)
#   mgd            alpha_mgd 2e-5: mmdet/mgd/mgd_fpn_retina_x101_retina_r50_2x_coco.py; lambda_mgd 0.75 for
#                  segmentation (the MGD paper's setting; mmrazor's detection configs use 0.65)
#   cwd            tau 1, loss_weight 5 on the decode head's logits:
#                  mmseg/cwd/cwd_logits_pspnet_r101_d8_pspnet_r18_d8_512x1024_cityscapes_80k.py
#   at             loss_weight 1000: beta = 1e3 of Zagoruyko & Komodakis (mmrazor ships ATLoss with no config)
#   in_mse         "IN only": CanKD's matching term without the non-local block, so CanKD's weight 10
_PRESETS: dict[str, tuple[str, bool, dict[str, Any]]] = {
    "cankd": ("feature", True, dict(loss_weight=10.0)),
    "cankd_align": ("feature", True, dict(loss_weight=10.0)),
    "nonlocal_self": ("feature", True, dict(loss_weight=10.0)),
    "fitnet": ("feature", True, dict(loss_weight=10.0)),
    "pkd": ("feature", True, dict(loss_weight=6.0)),
    "mgd": ("feature", False, dict(alpha_mgd=2e-5, lambda_mgd=0.75)),  # aligns widths itself
    "cwd": ("logits", True, dict(tau=1.0, loss_weight=5.0)),
    "at": ("feature", False, dict(loss_weight=1000.0)),
    "in_mse": ("feature", True, dict(loss_weight=10.0)),
}

# The paper's ablations of CanKD: CanKD's preset with one option changed (preset name -> the option).
ABLATIONS: dict[str, dict[str, Any]] = {
    "cankd_no_in": dict(instance_norm=False),
    "cankd_no_skip": dict(skip=False),
    "cankd_gaussian": dict(attention="gaussian"),
    "cankd_embedded_gaussian": dict(attention="embedded_gaussian"),
    "cankd_concatenation": dict(attention="concatenation"),
    "cankd_dcn": dict(projection="deform"),  # the authors' DCN_NLKD_Loss (dcn_nlkd_loss.py)
}

PRESET_LOSSES = (*_PRESETS, *ABLATIONS)


def preset(loss: str) -> tuple[str, dict[str, Any]]:
    """`(registry name, options)` of the preset `loss` (an ablation is the `cankd` loss with its option changed)."""
    if loss in ABLATIONS:
        return "cankd", {**_PRESETS["cankd"][2], **ABLATIONS[loss]}
    if loss not in _PRESETS:
        raise ValueError(f"no preset for loss {loss!r}; presets exist for {', '.join(PRESET_LOSSES)}")
    return loss, dict(_PRESETS[loss][2])


def distill_term(loss: str, *, student_channels: int, teacher_channels: int, feature: str = "layer4",
                 student_feature: Optional[str] = None, logits: str = "head.logits", weight: float = 1.0,
                 **options: Any) -> dict[str, Any]:
    """The `distill` entry for `loss` between the student's and teacher's `feature` maps.

    Args:
      loss: a name in `PRESET_LOSSES` (it also names the term, so `params['distill'][loss]` holds its
        connector and loss parameters).
      student_channels, teacher_channels: widths of `feature` in each network; a
        1x1 connector maps the student's to the teacher's when the loss needs
        equal widths and they differ (the paper's 512 -> 2048).
      feature: the network output both sides read (e.g. 'layer4', 'fpn.p3').
      student_feature: the student's output, when it is named otherwise (a MobileNetV2's 'layer7').
      logits: the output read by losses on logits (CWD).
      options: the loss's options over the preset's (e.g. a pairing's own `loss_weight`).
    """
    registered, preset_options = preset(loss)
    reads, same_width, _ = _PRESETS[registered]
    options = {**preset_options, **options}
    connector = 0
    if reads == "feature" and same_width and student_channels != teacher_channels:
        connector = teacher_channels
    if registered in ("cankd", "cankd_align", "nonlocal_self"):
        options["in_channels"] = teacher_channels
    if registered == "mgd":
        options["teacher_channels"] = teacher_channels
    t_name = feature if reads == "feature" else logits
    s_name = (student_feature or feature) if reads == "feature" else logits
    return dict(name=loss, loss=registered, student_feature=s_name, teacher_feature=t_name, connector=connector,
                weight=weight, options=options)


# The paper's detection setting: the four FPN outputs P3-P6 (256 channels each, P7 not distilled), one loss per level.
FPN_LEVELS = ("fpn.p3", "fpn.p4", "fpn.p5", "fpn.p6")
# mmrazor's detection settings where they differ from the table above (MGD's mask ratio for detection; CWD on the
# FPN maps, as its detection configs distill them).
_DETECTION_OPTIONS: dict[str, dict[str, Any]] = {
    "mgd": dict(lambda_mgd=0.65),
    "cwd": dict(tau=1.0, loss_weight=10.0),
}


def detection_terms(loss: str, *, student_channels: int = 256, teacher_channels: int = 256,
                    levels: tuple[str, ...] = FPN_LEVELS, teacher_levels: Optional[tuple[str, ...]] = None,
                    weight: float = 1.0) -> list[dict[str, Any]]:
    """One `distill` entry per pyramid level (`fpn.p3`..`fpn.p6` by default), each its own loss module
    (named `<loss>_p3`, ... after the student's level): CanKD with `in_channels=256`, `loss_weight=10` for the
    paper's pairs. `teacher_levels`: the teacher's level paired with each of `levels` (default the same names,
    i.e. pairing by stride)."""
    teacher_levels = tuple(levels) if teacher_levels is None else tuple(teacher_levels)
    if len(teacher_levels) != len(levels):
        raise ValueError(f"detection_terms: {len(levels)} student levels {levels} but {len(teacher_levels)} teacher "
                         f"levels {teacher_levels}")
    terms = []
    for level, t_level in zip(levels, teacher_levels):
        term = distill_term(loss, student_channels=student_channels, teacher_channels=teacher_channels,
                            feature=t_level, student_feature=level, logits=level, weight=weight)
        term["options"].update(_DETECTION_OPTIONS.get(loss, {}))
        term["name"] = f"{loss}_{level.rsplit('.', 1)[-1]}"
        terms.append(term)
    return terms


# registered loss -> the one that takes a student map of another size than the teacher's (resizing it first)
SIZE_ALIGNED: dict[str, str] = {"cankd": "cankd_align", "cankd_align": "cankd_align", "pkd": "pkd"}


def align_sizes(terms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For terms whose student and teacher levels differ (pairing by index across strides): each term's loss
    switched to its `SIZE_ALIGNED` form, in place (cankd and its ablations -> cankd_align, pkd resizes itself).
    Returns the terms whose loss has no such form (left unchanged), for the caller to refuse with its own fix."""
    refused = []
    for term in terms:
        if term["student_feature"] == term["teacher_feature"]:
            continue
        if term["loss"] in SIZE_ALIGNED:
            term["loss"] = SIZE_ALIGNED[term["loss"]]
        else:
            refused.append(term)
    return refused
