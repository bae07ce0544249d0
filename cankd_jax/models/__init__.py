"""Teacher and student networks: ResNet/ResNeXt and MobileNetV2 backbones, FPN, mmseg decode heads,
segmenters, mmdet's RetinaNet and FCOS.

Every network's `__call__(images, *, train)` returns a dict of named NHWC
features (`stem`, `layer1`..`layer4`, `fpn.p3`, `head.logits`, `logits`,
`cls_scores`, ...)
so a config can name the features to distill. Parameter paths joined with dots
are the PyTorch state-dict keys (`cankd_jax.interop.torch_models` converts).
BatchNorm statistics live in the `batch_stats` collection.
"""

from cankd_jax.models.conv import ConvModule, conv2d  # noqa: F401
from cankd_jax.models.dense_heads import FCOSHead, RetinaHead, Scale  # noqa: F401
from cankd_jax.models.foreign import ForeignBackbone, save_foreign_variables  # noqa: F401
from cankd_jax.models.fpn import FPN  # noqa: F401
from cankd_jax.models.freeze import (  # noqa: F401
    ALL,
    frozen_param_labels,
    frozen_prefixes,
    param_labels,
)
from cankd_jax.models.heads import ASPPHead, FCNHead, PSPHead  # noqa: F401
from cankd_jax.models.mobilenet_v2 import InvertedResidual, MobileNetV2  # noqa: F401
from cankd_jax.models.recorder import Recorded, is_module_path, module_paths, unwrap, with_recorded  # noqa: F401
from cankd_jax.models.ops import adaptive_avg_pool, resize_bilinear, resize_nearest  # noqa: F401
from cankd_jax.models.registry import (  # noqa: F401
    BACKBONE_TYPES,
    BACKBONES,
    DETECTORS,
    SEGMENTATION_HEADS,
    TRUNKS,
    frozen_labels,
    make_detector,
    make_model,
    make_network,
    make_segmenter,
    make_trunk,
    model_names,
)
from cankd_jax.models.resnet import BasicBlock, Bottleneck, ResNet  # noqa: F401
from cankd_jax.models.segmenter import Segmenter  # noqa: F401
from cankd_jax.models.trunk import FCOS, DetectionTrunk, RetinaNet, SingleStageDetector  # noqa: F401
from cankd_jax.models.two_stage import FasterRCNN, RPNHead, Shared2FCBBoxHead, StandardRoIHead  # noqa: F401
