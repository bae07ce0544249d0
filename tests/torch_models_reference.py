"""PyTorch networks written from the source projects' descriptions, to hold the Flax ones against.

NCHW, the module names (hence state-dict keys) of torchvision's ResNet,
mmsegmentation's ResNetV1c / ASPPHead / PSPHead / FCNHead / EncoderDecoder and
mmdetection's FPN. torchvision and mmcv are not installable here, so these are
independent re-statements of those modules' forward passes; every `forward`
returns a dict of named NCHW features, like the Flax networks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ARCH = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
        101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, dilation, downsample, width=None, groups=1):
        super().__init__()
        # mmseg: only conv1 is dilated.
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride, dilation, downsample, width=None, groups=1):
        super().__init__()
        width = width or planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision's ResNet (keys conv1/bn1/layerN.i/fc), or with `deep_stem` mmseg's ResNetV1c (stem.0..7)."""

    def __init__(self, depth, num_classes=None, stem_width=64, base_width=64, groups=1, width_per_group=None,
                 deep_stem=False, strides=(1, 2, 2, 2), dilations=(1, 1, 1, 1), stage_blocks=None):
        super().__init__()
        kind, blocks = ARCH[depth]
        blocks = stage_blocks or blocks
        block = BasicBlock if kind == "basic" else Bottleneck
        self.deep_stem = deep_stem
        if deep_stem:
            h = stem_width // 2
            self.stem = nn.Sequential(
                nn.Conv2d(3, h, 3, 2, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
                nn.Conv2d(h, h, 3, 1, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
                nn.Conv2d(h, stem_width, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_width), nn.ReLU())
        else:
            self.conv1 = nn.Conv2d(3, stem_width, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = stem_width
        for i in range(4):
            planes = base_width * 2**i
            width = planes if width_per_group is None else planes * width_per_group // base_width * groups
            d = dilations[i]
            layers = []
            for j in range(blocks[i]):
                stride = strides[i] if j == 0 else 1
                downsample = None
                if j == 0 and (stride != 1 or inplanes != planes * block.expansion):
                    downsample = nn.Sequential(nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                                               nn.BatchNorm2d(planes * block.expansion))
                dilation = (d // 2 if d > 1 else d) if j == 0 else d  # contract_dilation
                layers.append(block(inplanes, planes, stride, dilation, downsample, width, groups))
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.fc = nn.Linear(inplanes, num_classes) if num_classes else None

    def forward(self, x):
        x = self.stem(x) if self.deep_stem else F.relu(self.bn1(self.conv1(x)))
        out = {"stem": x}
        x = self.maxpool(x)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            out[f"layer{i}"] = x
        if self.fc is not None:
            out["pool"] = x.mean(dim=(2, 3))
            out["logits"] = self.fc(out["pool"])
        return out


class ConvModule(nn.Module):
    """mmcv's ConvModule: conv (bias only without norm) [+ bn] [+ ReLU]."""

    def __init__(self, cin, cout, k, stride=1, dilation=1, norm=True, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=dilation * (k // 2), dilation=dilation, bias=not norm)
        self.bn = nn.BatchNorm2d(cout) if norm else None
        self.act = act

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.act else x


def _up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class DecodeHead(nn.Module):
    def __init__(self, channels, num_classes, dropout_ratio=0.1):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout_ratio)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def classify(self, feat):
        return {"feature": feat, "logits": self.conv_seg(self.dropout(feat))}


class ASPPHead(DecodeHead):
    def __init__(self, in_channels, channels, num_classes, dilations=(1, 12, 24, 36)):
        super().__init__(channels, num_classes)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(in_channels, channels, 1))
        self.aspp_modules = nn.ModuleList(
            [ConvModule(in_channels, channels, 1 if d == 1 else 3, dilation=d) for d in dilations])
        self.bottleneck = ConvModule((len(dilations) + 1) * channels, channels, 3)

    def forward(self, x):
        outs = [_up(self.image_pool(x), x.shape[2:])] + [m(x) for m in self.aspp_modules]
        return self.classify(self.bottleneck(torch.cat(outs, dim=1)))


class PSPHead(DecodeHead):
    def __init__(self, in_channels, channels, num_classes, pool_scales=(1, 2, 3, 6)):
        super().__init__(channels, num_classes)
        self.psp_modules = nn.ModuleList(
            [nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels, channels, 1)) for s in pool_scales])
        self.bottleneck = ConvModule(in_channels + len(pool_scales) * channels, channels, 3)

    def forward(self, x):
        outs = [x] + [_up(m(x), x.shape[2:]) for m in self.psp_modules]
        return self.classify(self.bottleneck(torch.cat(outs, dim=1)))


class FCNHead(DecodeHead):
    def __init__(self, in_channels, channels, num_classes, num_convs=2, concat_input=True):
        super().__init__(channels, num_classes)
        self.convs = nn.Sequential(*[ConvModule(in_channels if i == 0 else channels, channels, 3)
                                     for i in range(num_convs)])
        self.conv_cat = ConvModule(in_channels + channels, channels, 3) if concat_input else None

    def forward(self, x):
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.classify(out)


class EncoderDecoder(nn.Module):
    """mmseg's segmenter: keys backbone.*, decode_head.*, auxiliary_head.*; the heads read the backbone
    features `decode_in` / `aux_in` (mmseg's in_index 3 / 2: layer4 / layer3 of a ResNet)."""

    def __init__(self, backbone, decode_head, auxiliary_head=None, decode_in="layer4", aux_in="layer3"):
        super().__init__()
        self.backbone, self.decode_head, self.auxiliary_head = backbone, decode_head, auxiliary_head
        self.decode_in, self.aux_in = decode_in, aux_in

    def forward(self, img):
        out = self.backbone(img)
        heads = [("head", self.decode_head, self.decode_in, "logits")]
        if self.auxiliary_head is not None:
            heads.append(("aux", self.auxiliary_head, self.aux_in, "aux_logits"))
        for prefix, head, source, full in heads:
            res = head(out[source])
            out[f"{prefix}.feature"], out[f"{prefix}.logits"] = res["feature"], res["logits"]
            out[full] = _up(res["logits"], img.shape[2:])
        return out


class FPN(nn.Module):
    """mmdet's FPN (no norm, no activation; nearest upsampling to the finer size)."""

    def __init__(self, in_channels, out_channels, num_outs, start_level=0, add_extra_convs=False,
                 relu_before_extra_convs=False):
        super().__init__()
        self.start_level, self.num_outs = start_level, num_outs
        self.add_extra_convs, self.relu_before_extra_convs = add_extra_convs, relu_before_extra_convs
        used = in_channels[start_level:]
        self.lateral_convs = nn.ModuleList([ConvModule(c, out_channels, 1, norm=False, act=False) for c in used])
        self.fpn_convs = nn.ModuleList([ConvModule(out_channels, out_channels, 3, norm=False, act=False) for _ in used])
        if add_extra_convs:
            for i in range(num_outs - len(used)):
                cin = in_channels[-1] if i == 0 and add_extra_convs == "on_input" else out_channels
                self.fpn_convs.append(ConvModule(cin, out_channels, 3, stride=2, norm=False, act=False))

    def forward(self, inputs):
        inputs = inputs[self.start_level:]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="nearest")
        n = len(laterals)
        outs = [self.fpn_convs[i](laterals[i]) for i in range(n)]
        if not self.add_extra_convs:
            while len(outs) < self.num_outs:
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            return outs
        source = {"on_input": inputs[-1], "on_lateral": laterals[-1], "on_output": outs[-1]}[self.add_extra_convs]
        outs.append(self.fpn_convs[n](source))
        for i in range(n + 1, self.num_outs):
            outs.append(self.fpn_convs[i](F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]))
        return outs


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (and counters), so eval-mode
    parity exercises every BN term; conv weights keep PyTorch's default init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (1,), generator=g)))
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.out_channels, generator=g))
    return module
