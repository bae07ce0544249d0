"""Each registered loss as the papers and mmrazor apply it to a teacher/student pair: one `distill` config entry.

Configs build their `distill` list from here, so the comparison tables use the
same settings everywhere and a config only says which loss and which widths.
"""

from __future__ import annotations

from typing import Any

# name -> (the feature it reads: 'feature' or 'logits', needs equal widths, options). Weights are mmrazor's
# segmentation / the papers' settings; CanKD's 10 is the paper's (the reference's /2 makes it an effective 5).
_PRESETS: dict[str, tuple[str, bool, dict[str, Any]]] = {
    "cankd": ("feature", True, dict(loss_weight=10.0)),
    "nonlocal_self": ("feature", True, dict(loss_weight=10.0)),
    "fitnet": ("feature", True, dict(loss_weight=10.0)),
    "pkd": ("feature", True, dict(loss_weight=6.0)),
    "mgd": ("feature", False, dict(alpha_mgd=2e-5, lambda_mgd=0.75)),  # aligns widths itself; 0.75 for segmentation
    "cwd": ("logits", True, dict(tau=1.0, loss_weight=3.0)),  # mmrazor's cwd_logits: the decode head's logits
    "at": ("feature", False, dict(loss_weight=1000.0)),
}

PRESET_LOSSES = tuple(_PRESETS)


def distill_term(loss: str, *, student_channels: int, teacher_channels: int, feature: str = "layer4",
                 logits: str = "head.logits", weight: float = 1.0) -> dict[str, Any]:
    """The `distill` entry for `loss` between the student's and teacher's `feature` maps.

    Args:
      loss: a name in `PRESET_LOSSES`.
      student_channels, teacher_channels: widths of `feature` in each network; a
        1x1 connector maps the student's to the teacher's when the loss needs
        equal widths and they differ (the paper's 512 -> 2048).
      feature: the network output both sides read (e.g. 'layer4', 'fpn.p3').
      logits: the output read by losses on logits (CWD).
    """
    if loss not in _PRESETS:
        raise ValueError(f"no preset for loss {loss!r}; presets exist for {', '.join(PRESET_LOSSES)}")
    reads, same_width, options = _PRESETS[loss]
    options = dict(options)
    connector = 0
    if reads == "feature" and same_width and student_channels != teacher_channels:
        connector = teacher_channels
    if loss in ("cankd", "nonlocal_self"):
        options["in_channels"] = teacher_channels
    if loss == "mgd":
        options["teacher_channels"] = teacher_channels
    name = feature if reads == "feature" else logits
    return dict(name=loss, loss=loss, student_feature=name, teacher_feature=name, connector=connector,
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
                    levels: tuple[str, ...] = FPN_LEVELS, weight: float = 1.0) -> list[dict[str, Any]]:
    """One `distill` entry per pyramid level (`fpn.p3`..`fpn.p6` by default), each its own loss module
    (named `<loss>_p3`, ...): CanKD with `in_channels=256`, `loss_weight=10` for the paper's pairs."""
    terms = []
    for level in levels:
        term = distill_term(loss, student_channels=student_channels, teacher_channels=teacher_channels,
                            feature=level, logits=level, weight=weight)
        term["options"].update(_DETECTION_OPTIONS.get(loss, {}))
        term["name"] = f"{loss}_{level.rsplit('.', 1)[-1]}"
        terms.append(term)
    return terms
