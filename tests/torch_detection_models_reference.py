"""PyTorch formulations of mmdetection's RetinaNet / FCOS pieces and mmsegmentation's MobileNetV2.

Written from the source projects' semantics (mmdet 3.x `RetinaHead`,
`FCOSHead.forward_single`, mmcv's `ConvModule` with GroupNorm and `Scale`,
mmdet's `style='caffe'` ResNet, mmseg's `MobileNetV2` / `InvertedResidual`),
with their module names, hence their state-dict keys. mmcv/mmdet/mmseg are not
installable here, so these are independent re-statements of the forward passes,
NCHW, returning dicts / lists of NCHW maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import torch_models_reference as ref


def caffe_style_(resnet: ref.ResNet) -> ref.ResNet:
    """mmdet's `style='caffe'`: each strided bottleneck's stride moves from the 3x3 `conv2` to the 1x1 `conv1`
    (the shortcut's `downsample.0` keeps it). In place; returns the network."""
    for stage in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4):
        for block in stage:
            if isinstance(block, ref.Bottleneck) and block.conv2.stride != (1, 1):
                block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)
    return resnet


class ConvModule(nn.Module):
    """mmcv's ConvModule: conv (bias='auto': only without a norm) -> norm (`bn` or `gn`) -> act (ReLU / ReLU6)."""

    def __init__(self, cin, cout, k, stride=1, dilation=1, groups=1, norm=None, num_groups=32, act="relu",
                 bias="auto"):
        super().__init__()
        bias = norm is None if bias == "auto" else bias
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=dilation * (k // 2), dilation=dilation, groups=groups,
                              bias=bias)
        if norm == "bn":
            self.bn = nn.BatchNorm2d(cout)
        elif norm == "gn":
            self.gn = nn.GroupNorm(num_groups, cout)  # eps 1e-5
        self.norm = norm
        self.act = act

    def forward(self, x):
        x = self.conv(x)
        if self.norm is not None:
            x = getattr(self, self.norm)(x)
        if self.act == "relu":
            return F.relu(x)
        return F.relu6(x) if self.act == "relu6" else x


class Scale(nn.Module):
    """mmcv's Scale: a learnable 0-d `scale`, x * scale."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float))

    def forward(self, x):
        return x * self.scale


class RetinaHead(nn.Module):
    """mmdet's RetinaHead: towers of 3x3 conv (bias) + ReLU, retina_cls / retina_reg; shared by every level."""

    def __init__(self, num_classes, in_channels, feat_channels=256, stacked_convs=4, num_anchors=9):
        super().__init__()
        self.cls_convs, self.reg_convs = nn.ModuleList(), nn.ModuleList()
        cin = in_channels
        for _ in range(stacked_convs):
            self.cls_convs.append(ConvModule(cin, feat_channels, 3))
            self.reg_convs.append(ConvModule(cin, feat_channels, 3))
            cin = feat_channels
        self.retina_cls = nn.Conv2d(cin, num_anchors * num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(cin, num_anchors * 4, 3, padding=1)

    def forward_single(self, x):
        cls_feat, reg_feat = x, x
        for conv in self.cls_convs:
            cls_feat = conv(cls_feat)
        for conv in self.reg_convs:
            reg_feat = conv(reg_feat)
        return self.retina_cls(cls_feat), self.retina_reg(reg_feat)

    def forward(self, feats):
        outs = [self.forward_single(x) for x in feats]
        return {"cls_scores": [o[0] for o in outs], "bbox_preds": [o[1] for o in outs]}


class FCOSHead(nn.Module):
    """mmdet 3.x FCOSHead (AnchorFreeHead towers with GN, conv_cls / conv_reg / conv_centerness, per-level Scale)."""

    def __init__(self, num_classes, in_channels, feat_channels=256, stacked_convs=4, strides=(8, 16, 32, 64, 128),
                 num_groups=32, conv_bias="auto", norm_on_bbox=False, centerness_on_reg=False):
        super().__init__()
        self.strides, self.norm_on_bbox, self.centerness_on_reg = strides, norm_on_bbox, centerness_on_reg
        self.cls_convs, self.reg_convs = nn.ModuleList(), nn.ModuleList()
        for i in range(stacked_convs):
            cin = in_channels if i == 0 else feat_channels
            for tower in (self.cls_convs, self.reg_convs):
                tower.append(ConvModule(cin, feat_channels, 3, norm="gn", num_groups=num_groups, bias=conv_bias))
        self.conv_cls = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.conv_reg = nn.Conv2d(feat_channels, 4, 3, padding=1)
        self.conv_centerness = nn.Conv2d(feat_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in strides])

    def forward_single(self, x, scale, stride):
        cls_feat, reg_feat = x, x
        for layer in self.cls_convs:
            cls_feat = layer(cls_feat)
        cls_score = self.conv_cls(cls_feat)
        for layer in self.reg_convs:
            reg_feat = layer(reg_feat)
        bbox_pred = self.conv_reg(reg_feat)
        centerness = self.conv_centerness(reg_feat if self.centerness_on_reg else cls_feat)
        bbox_pred = scale(bbox_pred).float()
        if self.norm_on_bbox:
            bbox_pred = bbox_pred.clamp(min=0)
            if not self.training:
                bbox_pred = bbox_pred * stride
        else:
            bbox_pred = bbox_pred.exp()
        return cls_score, bbox_pred, centerness

    def forward(self, feats):
        outs = [self.forward_single(x, s, st) for x, s, st in zip(feats, self.scales, self.strides)]
        return {"cls_scores": [o[0] for o in outs], "bbox_preds": [o[1] for o in outs],
                "centernesses": [o[2] for o in outs]}


class SingleStageDetector(nn.Module):
    """mmdet's single-stage detector: keys backbone.*, neck.*, bbox_head.*. `forward` gives the backbone
    features, the neck levels as `fpn.p{first_level + i}` and the head's per-level lists."""

    def __init__(self, backbone, neck, bbox_head, first_level=3):
        super().__init__()
        self.backbone, self.neck, self.bbox_head, self.first_level = backbone, neck, bbox_head, first_level

    def forward(self, img):
        out = dict(self.backbone(img))
        pyramid = self.neck([out[f"layer{i}"] for i in range(1, 5)])
        out.update({f"fpn.p{self.first_level + i}": level for i, level in enumerate(pyramid)})
        out.update(self.bbox_head(pyramid))
        return out

    def train(self, mode=True):
        # mmdet's norm_eval / frozen BatchNorm: the backbone's BatchNorms stay in eval mode in training.
        super().train(mode)
        for m in self.backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self


def make_divisible(value, divisor, min_value=None, min_ratio=0.9):
    min_value = min_value or divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return new_value + divisor if new_value < min_ratio * value else new_value


class InvertedResidual(nn.Module):
    """mmseg's MobileNetV2 block: conv.0 expand (if ratio != 1), depthwise, linear; ReLU6; identity shortcut."""

    def __init__(self, cin, cout, stride, expand_ratio, dilation=1):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        hidden = int(round(cin * expand_ratio))
        layers = []
        if expand_ratio != 1:
            layers.append(ConvModule(cin, hidden, 1, norm="bn", act="relu6"))
        layers += [ConvModule(hidden, hidden, 3, stride=stride, dilation=dilation, groups=hidden, norm="bn",
                              act="relu6"),
                   ConvModule(hidden, cout, 1, norm="bn", act=None)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """mmseg's MobileNetV2; `forward` returns `stem` (conv1) and every layer `layer1`..`layer7`."""

    arch_settings = [[1, 16, 1], [6, 24, 2], [6, 32, 3], [6, 64, 4], [6, 96, 3], [6, 160, 3], [6, 320, 1]]

    def __init__(self, widen_factor=1.0, strides=(1, 2, 2, 2, 1, 2, 1), dilations=(1, 1, 1, 1, 1, 1, 1)):
        super().__init__()
        cin = make_divisible(32 * widen_factor, 8)
        self.conv1 = ConvModule(3, cin, 3, stride=2, norm="bn", act="relu6")
        self.layer_names = []
        for i, (expand, channel, blocks) in enumerate(self.arch_settings):
            cout = make_divisible(channel * widen_factor, 8)
            layers = []
            for j in range(blocks):
                # mmseg: the layer's stride and dilation go to its first block only.
                layers.append(InvertedResidual(cin, cout, strides[i] if j == 0 else 1, expand,
                                               dilations[i] if j == 0 else 1))
                cin = cout
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            self.layer_names.append(f"layer{i + 1}")

    def forward(self, x):
        x = self.conv1(x)
        out = {"stem": x}
        for name in self.layer_names:
            x = out[name] = getattr(self, name)(x)
        return out


def randomize_detection_(module: nn.Module, seed: int = 0) -> nn.Module:
    """`ref.randomize_` (BatchNorm statistics and affine parameters, conv biases) plus random GroupNorm affine
    parameters and Scales, so every term of the forward pass is exercised."""
    ref.randomize_(module, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(0.5 + torch.rand(m.num_channels, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.num_channels, generator=g))
            elif isinstance(m, Scale):
                m.scale.fill_(float(0.5 + torch.rand((), generator=g)))
    return module
