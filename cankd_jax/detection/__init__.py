"""Pure building blocks of the one-stage detectors RetinaNet and FCOS, mmdetection 3.x semantics.

Static shapes throughout (ground truth padded to a fixed count with a validity mask),
every function jit-able and vmap-able over the batch. One module per job:

- `boxes`: areas, IoU/GIoU, clipping and rescaling, the delta and distance box coders
- `anchors`: RetinaNet's anchors and their valid flags, FCOS's points and regress ranges
- `assigners`: max-IoU assignment, RetinaNet and FCOS training targets
- `losses`: focal, L1, GIoU, BCE, and the two heads' loss assembly
- `nms`: class-aware greedy NMS
- `postprocess`: scores -> top-k -> decode -> NMS -> detections in original-image pixels
"""

from cankd_jax.detection.anchors import (
    FCOS_REGRESS_RANGES, FCOS_STRIDES, RETINANET_STRIDES, AnchorGenerator, FCOSPriors, fcos_priors,
    flatten_level_maps, grid_points,
)
from cankd_jax.detection.assigners import (
    BACKGROUND, IGNORE, AssignResult, FCOSTargets, RetinaNetTargets, centerness_target, fcos_targets,
    max_iou_assign, retinanet_targets,
)
from cankd_jax.detection.boxes import (
    DeltaXYWHCoder, DistancePointCoder, aligned_giou, aligned_iou, box_area, clip_boxes, pairwise_iou,
    rescale_boxes,
)
from cankd_jax.detection.losses import (
    bce_loss, fcos_loss, giou_loss, l1_loss, retinanet_avg_factor, retinanet_loss, sigmoid_focal_loss,
    weight_reduce,
)
from cankd_jax.detection.nms import NMSResult, batched_nms
from cankd_jax.detection.postprocess import (
    FCOS_TEST_CFG, RETINANET_TEST_CFG, Detections, PostprocessConfig, fcos_postprocess, fcos_postprocess_single,
    retinanet_postprocess, retinanet_postprocess_single,
)

__all__ = [
    "aligned_giou", "aligned_iou", "AnchorGenerator", "AssignResult", "BACKGROUND", "batched_nms", "bce_loss",
    "box_area", "centerness_target", "clip_boxes", "DeltaXYWHCoder", "Detections", "DistancePointCoder",
    "fcos_loss", "fcos_postprocess", "fcos_postprocess_single", "fcos_priors", "FCOS_REGRESS_RANGES",
    "FCOS_STRIDES", "fcos_targets", "FCOS_TEST_CFG", "FCOSPriors", "FCOSTargets", "flatten_level_maps", "giou_loss",
    "grid_points", "IGNORE", "l1_loss", "max_iou_assign", "NMSResult", "pairwise_iou", "PostprocessConfig",
    "rescale_boxes", "retinanet_avg_factor", "retinanet_loss", "retinanet_postprocess",
    "retinanet_postprocess_single", "RETINANET_STRIDES", "retinanet_targets", "RETINANET_TEST_CFG",
    "RetinaNetTargets", "sigmoid_focal_loss", "weight_reduce",
]
