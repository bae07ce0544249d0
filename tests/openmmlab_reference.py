"""mmdetection 3.3 and mmsegmentation 1.2.2 themselves as the tests' reference: their models built from their own
config files, on the CPU.

mmdet, mmseg, mmengine and mmcv-lite come with the `openmmlab` test extra (`pip install -e
'.[test,openmmlab]'` and `pip install --no-deps mmdet==3.3.0 mmsegmentation==1.2.2`, as `.ci/run` does);
mmcv-lite lacks mmcv's compiled kernels, which `mmcv_ext.py` stands in for. `available()` says whether all of
that imports, so a test module can skip with the reason on a machine without the extra (CI has it).

`build(config, overrides, seed)` builds the model of one of mmdet's shipped config files (`mmdet/.mim/configs`),
`build_segmentor` one of mmseg's, after `Config.merge_from_dict(overrides)`: the tests shrink widths and class
counts, never a setting that changes what is computed, and say so where they override one. `perturb_` then gives every parameter and
BatchNorm / GroupNorm statistic seeded non-trivial values, so every term of the forward pass shows in a
comparison.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import torch

import mmcv_ext

_IMPORT_ERROR: Optional[str] = None
try:
    mmcv_ext.install()
    import mmdet
    import mmseg
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmengine.structures import InstanceData
    from mmseg.utils import register_all_modules as register_all_mmseg_modules

    register_all_modules()
    register_all_mmseg_modules(init_default_scope=False)
    CONFIGS = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs")
    SEG_CONFIGS = os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs")
except ImportError as e:  # the extra is not installed
    _IMPORT_ERROR = (f"mmdetection 3.3 / mmsegmentation 1.2.2 are not importable ({e}); install the test extra: "
                     "pip install -e '.[test,openmmlab]' && pip install --no-deps mmdet==3.3.0 mmsegmentation==1.2.2")


def available() -> Optional[str]:
    """None when mmdet can be used here, else why not."""
    return _IMPORT_ERROR


def build(config: str, overrides: dict[str, Any], seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """(model, config) of mmdet's `configs/<config>` with `overrides` merged (dotted keys), built with seeded
    PyTorch default initialisation (mmdet's `init_weights` would fetch ImageNet weights: not called)."""
    from mmdet.registry import MODELS

    cfg = Config.fromfile(os.path.join(CONFIGS, config))
    cfg.merge_from_dict(overrides)
    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope("mmdet"):  # type names resolve in mmdet's registries
        return MODELS.build(cfg.model), cfg


def build_segmentor(config: str, overrides: dict[str, Any], seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """(model, config) of mmseg's `configs/<config>`, as `build` does for mmdet's."""
    from mmseg.registry import MODELS

    cfg = Config.fromfile(os.path.join(SEG_CONFIGS, config))
    cfg.merge_from_dict(overrides)
    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope("mmseg"):  # type names resolve in mmseg's registries
        return MODELS.build(cfg.model), cfg


def perturb_(model: torch.nn.Module, seed: int, cls_bias: tuple[float, float] = (-2.5, 0.5)) -> torch.nn.Module:
    """Seeded non-trivial values: BatchNorm affine parameters and running statistics, GroupNorm affine
    parameters, conv biases, FCOS's scales, and noise on every conv weight; the classifiers' biases
    N(cls_bias) so that, as with a trained detector, many (prior, class) pairs pass the 0.05 score threshold;
    FCOS's regression bias 2 + N(0, 0.2), so that, as with a trained FCOS, its ReLU'd distances are positive
    (a distance of exactly 0 makes a degenerate box whose GIoU is not differentiable there, where PyTorch's and
    JAX's conventions for the subgradient of a max differ)."""
    g = torch.Generator().manual_seed(seed)
    head = getattr(model, "bbox_head", None)
    classifiers = {id(getattr(head, n)) for n in ("retina_cls", "conv_cls") if head is not None and hasattr(head, n)}
    fcos_reg = id(getattr(head, "conv_reg", None)) if type(head).__name__ == "FCOSHead" else None
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            elif isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(0.5 + torch.rand(m.num_channels, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.num_channels, generator=g))
            elif isinstance(m, torch.nn.Conv2d) and id(m) in classifiers:
                # mmdet's own classifier init (normal, std 0.01): logits near N(cls_bias), far from
                # saturating the sigmoid, so scores have no ties and their order is well defined.
                m.weight.copy_(0.01 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(cls_bias[0] + cls_bias[1] * torch.randn(m.out_channels, generator=g))
            elif isinstance(m, torch.nn.Conv2d):
                m.weight.add_(0.1 * m.weight.std() * torch.randn(m.weight.shape, generator=g))
                if m.bias is not None:
                    m.bias.copy_((2.0 if id(m) == fcos_reg else 0.0) + (0.2 if id(m) == fcos_reg else 0.1)
                                 * torch.randn(m.out_channels, generator=g))
            elif type(m).__name__ == "Scale":
                m.scale.fill_(float(0.5 + torch.rand((), generator=g)))
    return model


def gt_instances(boxes: np.ndarray, labels: np.ndarray) -> Any:
    """mmdet's per-image ground truth (`InstanceData` with `bboxes` and `labels`)."""
    return InstanceData(bboxes=torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4)),
                        labels=torch.as_tensor(np.asarray(labels, np.int64)))


def img_meta(img_shape, pad_shape, batch_shape, scale_factor) -> dict:
    """mmdet's `img_meta` of one image: (h, w) shapes, (w, h) scale factor."""
    return {"img_shape": tuple(int(x) for x in img_shape), "pad_shape": tuple(int(x) for x in pad_shape),
            "batch_input_shape": tuple(int(x) for x in batch_shape),
            "scale_factor": tuple(float(x) for x in scale_factor)}


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x, np.float32), (0, 3, 1, 2))))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))
