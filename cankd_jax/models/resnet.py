"""ResNet and ResNeXt in torchvision's layout, with mmsegmentation's deep stem and dilation and mmdetection's
caffe style, frozen BatchNorm and deformable stages (`dcn`, `stage_with_dcn`).

Submodules carry PyTorch's names (`conv1`, `bn1`, `layer3.5`, `downsample.0`,
`stem.3`), so a parameter's path joined with dots is its state-dict key.
"""

from __future__ import annotations

from typing import ClassVar, Iterator, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cankd_jax.compute import remat_policy
from cankd_jax.config_arg import is_count
from cankd_jax.layers import Dtype, torch_bias_init, torch_kernel_init
from cankd_jax.models.conv import batch_norm, conv2d
from cankd_jax.models.deform_conv import DCN_LAYERS, make_dcn
from cankd_jax.models.ops import check_nhwc, frozen_boundary, max_pool_3x3_s2

Array = jax.Array

# depth -> (block, blocks per stage), as torchvision and mmsegmentation.
ARCHITECTURES: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
STAGES = ("layer1", "layer2", "layer3", "layer4")
STYLES = ("pytorch", "caffe")


class _ResBlock(nn.Module):
    """Fields and layer helpers shared by the two residual blocks."""

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    width: int = 0  # bottleneck inner width; 0 means `planes`
    groups: int = 1
    style: str = "pytorch"
    frozen_stats: bool = False
    dcn: Optional[str] = None  # the bottleneck's 3x3 conv as this mmcv deformable conv ('DCN', 'DCNv2')
    deform_groups: int = 1
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    def _conv(self, x: Array, features: int, k: int, name: str, *, stride: int = 1, dilation: int = 1,
              groups: int = 1) -> Array:
        return conv2d(x, features, k, name=name, stride=stride, dilation=dilation, groups=groups,
                      dtype=self.dtype, param_dtype=self.param_dtype)

    def _bn(self, x: Array, name: str, train: bool) -> Array:
        return batch_norm(x, name, train=train, frozen_stats=self.frozen_stats, dtype=self.dtype,
                          param_dtype=self.param_dtype)

    def _shortcut(self, x: Array, features: int, train: bool) -> Array:
        if not self.downsample:
            return x
        return self._bn(self._conv(x, features, 1, "downsample.0", stride=self.stride), "downsample.1", train)


class BasicBlock(_ResBlock):
    """Two 3x3 convs: `(B, H, W, C) -> (B, H / stride, W / stride, planes)`.

    Only the first conv is strided and dilated: that is mmsegmentation's basic
    block (torchvision's refuses dilation), which its `-d8` ResNet-18 uses.
    """

    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        out = self._conv(x, self.planes, 3, "conv1", stride=self.stride, dilation=self.dilation)
        out = nn.relu(self._bn(out, "bn1", train))
        out = self._bn(self._conv(out, self.planes, 3, "conv2"), "bn2", train)
        return nn.relu(out + self._shortcut(x, self.planes, train))


class Bottleneck(_ResBlock):
    """1x1 -> 3x3 (strided, dilated, grouped) -> 1x1 x4: `(B, H, W, C) -> (B, H / stride, W / stride, 4 planes)`.

    With `style='pytorch'` (torchvision's "ResNet v1.5") the stride sits on the
    3x3 conv; with `style='caffe'` (mmdet's, the original ResNet and Detectron's
    `resnet50_caffe` weights) on the first 1x1 conv. The shortcut's strided 1x1
    `downsample.0` is the same in both.
    """

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        width = self.width or self.planes
        s1, s3 = (self.stride, 1) if self.style == "caffe" else (1, self.stride)
        out = nn.relu(self._bn(self._conv(x, width, 1, "conv1", stride=s1), "bn1", train))
        if self.dcn:
            # mmdet's `build_conv_layer(dcn, ..., padding=dilation, bias=False)`: the pack predicts its offsets
            # (`conv2.conv_offset`) from the block's own activations.
            out = make_dcn(self.dcn, features=width, kernel_size=3, stride=s3, padding=self.dilation,
                           dilation=self.dilation, groups=self.groups, deform_groups=self.deform_groups,
                           dtype=self.dtype, name="conv2", **({"use_bias": False} if self.dcn == "DCNv2" else {}))(out)
        else:
            out = self._conv(out, width, 3, "conv2", stride=s3, dilation=self.dilation, groups=self.groups)
        out = nn.relu(self._bn(out, "bn2", train))
        out = self._bn(self._conv(out, self.planes * 4, 1, "conv3"), "bn3", train)
        return nn.relu(out + self._shortcut(x, self.planes * 4, train))


BLOCKS: dict[str, type[_ResBlock]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class _BlockSpec(NamedTuple):
    stage: int
    name: str  # e.g. "layer3.0"
    planes: int
    width: int
    stride: int
    dilation: int
    downsample: bool


class ResNet(nn.Module):
    """ResNet-18/34/50/101/152 and ResNeXt, as a backbone or (with `num_classes`) a classifier.

    `__call__(images (B, H, W, in_channels), *, train) -> dict` of named features:

    | name     | shape                                | stride (default / `-d8`) |
    |----------|--------------------------------------|--------------------------|
    | `stem`   | `(B, H/2, W/2, stem_width)`          | 2 (before the max pool)  |
    | `layer1` | `(B, H/4, W/4, base_width * e)`      | 4                        |
    | `layer2` | `(B, H/8, W/8, 2 * base_width * e)`  | 8                        |
    | `layer3` | `(B, H/16, W/16, 4 * base_width * e)`| 16 / 8                   |
    | `layer4` | `(B, H/32, W/32, 8 * base_width * e)`| 32 / 8                   |
    | `pool`   | `(B, 8 * base_width * e)`            | with `num_classes` only  |
    | `logits` | `(B, num_classes)`                   | with `num_classes` only  |

    (`e` = 1 for depths 18/34, 4 for bottleneck depths; sizes are rounded up
    at each stride-2 step, as PyTorch's.) `feature_strides()` and
    `feature_channels()` give the same table for a configured instance.

    Fields:
      depth: 18, 34, 50, 101 or 152.
      num_classes: None for a backbone; else global average pool + `fc`.
      in_channels: channels the images must have.
      stem_width: stem output channels (mmseg's `stem_channels`); the deep stem's
        first two convs have half of it.
      base_width: planes of stage 1 (mmseg's `base_channels`), doubling per
        stage. 64 for the real networks; small values make narrow test nets.
      groups, width_per_group: ResNeXt. The bottleneck's inner width is
        `floor(planes * width_per_group / base_width) * groups` (torchvision and
        mmdet's rule); `width_per_group=None` keeps it at `planes` (plain ResNet).
        ResNeXt-101 32x4d: `groups=32, width_per_group=4`.
      deep_stem: mmseg's "V1c" stem (three 3x3 convs, keys `stem.0..7`) instead
        of the 7x7 `conv1`/`bn1`.
      strides, dilations: per stage, mmseg's fields. Output stride 8 (`-d8`):
        `strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4)`.
      contract_dilation: a dilated stage's first block uses half the dilation
        (mmseg's `contract_dilation=True`; torchvision's
        `replace_stride_with_dilation` gives the same numbers).
      stage_blocks: override the depth's blocks per stage (small test nets).
      style: mmdet's `'pytorch'` (stride on the bottleneck's 3x3 conv) or
        `'caffe'` (stride on its first 1x1 conv); basic blocks are the same in both.
      frozen_stages: -1 none; k >= 0 freezes the stem and stages 1..k. Frozen
        layers keep their BatchNorm on running statistics, and
        `frozen_prefixes()` names their parameters for the optimizer
        (`cankd_jax.models.frozen_param_labels`).
      norm_eval: every BatchNorm here stays on its running statistics in
        training (scale and bias still train), as mmdet's detection backbones.
      norm_requires_grad: False is mmdet's `norm_cfg=dict(type='BN',
        requires_grad=False)` (FCOS's caffe backbones): every BatchNorm's scale
        and bias are frozen too (`frozen_prefixes()` names them all).
      dcn, stage_with_dcn, dcn_deform_groups: mmdet's
        deformable stages (`dcn=dict(type='DCN', deform_groups=1,
        fallback_on_stride=False), stage_with_dcn=(False, True, True, True)` is
        `dcn='DCN', stage_with_dcn=(False, True, True, True)`): the 3x3 conv of
        every bottleneck in a chosen stage is `DeformConv2dPack` ('DCN') or
        `ModulatedDeformConv2dPack` ('DCNv2', without bias), keys
        `layerN.M.conv2.weight` and `layerN.M.conv2.conv_offset.*`. (mmdet's
        `fallback_on_stride=True` is not offered: mmdet pops it from the dict
        its blocks share, so only a stage's first block would see it.)
      dtype, param_dtype: computation and parameter dtypes (BatchNorm statistics
        are float32 regardless).
      remat: a `cankd_jax.compute.REMAT_POLICIES` name: the stem and each
        residual block run under `jax.checkpoint` with that policy (what it
        keeps for the backward pass; the rest is recomputed there). 'none': no
        rematerialisation.
    """

    depth: int = 50
    num_classes: Optional[int] = None
    in_channels: int = 3
    stem_width: int = 64
    base_width: int = 64
    groups: int = 1
    width_per_group: Optional[int] = None
    deep_stem: bool = False
    strides: tuple[int, ...] = (1, 2, 2, 2)
    dilations: tuple[int, ...] = (1, 1, 1, 1)
    contract_dilation: bool = True
    stage_blocks: Optional[tuple[int, ...]] = None
    style: str = "pytorch"
    frozen_stages: int = -1
    norm_eval: bool = False
    norm_requires_grad: bool = True
    dcn: Optional[str] = None
    stage_with_dcn: tuple[bool, ...] = (False, False, False, False)
    dcn_deform_groups: int = 1
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    remat: str = "none"

    def __post_init__(self):
        self._validate()
        super().__post_init__()

    def _validate(self) -> None:
        if self.depth not in ARCHITECTURES:
            raise ValueError(f"ResNet: unknown depth {self.depth!r}; choose one of {', '.join(map(str, ARCHITECTURES))}")
        if self.num_classes is not None and not is_count(self.num_classes, 1):
            raise ValueError(f"ResNet: num_classes must be an integer >= 1 (or None for a backbone), "
                             f"got {self.num_classes!r}")
        for field in ("in_channels", "stem_width", "base_width"):
            if not is_count(getattr(self, field), 1):
                raise ValueError(f"ResNet: {field} must be an integer >= 1, got {getattr(self, field)!r}")
        for field in ("strides", "dilations") + (("stage_blocks",) if self.stage_blocks is not None else ()):
            value = tuple(getattr(self, field))
            if len(value) != 4 or any(int(v) < 1 for v in value):
                raise ValueError(f"ResNet: {field} needs 4 positive integers (one per stage), got {value}")
        if self.block_kind == "basic" and (self.groups != 1 or self.width_per_group is not None):
            raise ValueError(f"ResNet: groups/width_per_group (ResNeXt) need a bottleneck depth (50, 101, 152), "
                             f"got depth {self.depth}")
        if self.stage_widths()[0][1] < 1:
            raise ValueError(f"ResNet: the bottleneck width of stage 1 rounds to 0 (base_width={self.base_width}, "
                             f"groups={self.groups}, width_per_group={self.width_per_group})")
        if not -1 <= self.frozen_stages <= 4:
            raise ValueError(f"ResNet: frozen_stages must be in -1..4 (-1: none), got {self.frozen_stages}")
        if self.style not in STYLES:
            raise ValueError(f"ResNet: style must be one of {', '.join(STYLES)}, got {self.style!r}")
        if self.dcn is not None:
            if self.dcn not in DCN_LAYERS:
                raise ValueError(f"ResNet: unknown dcn {self.dcn!r}; choose one of {', '.join(DCN_LAYERS)} (or None)")
            if self.block_kind != "bottleneck":
                raise ValueError(f"ResNet: deformable stages need a bottleneck depth (50, 101, 152), as mmdet's, "
                                 f"got depth {self.depth}")
            if len(tuple(self.stage_with_dcn)) != 4:
                raise ValueError(f"ResNet: stage_with_dcn needs 4 booleans (one per stage), got {self.stage_with_dcn}")
        if self.deep_stem and self.stem_width < 2:
            raise ValueError(f"ResNet: the deep stem needs stem_width >= 2, got {self.stem_width}")
        remat_policy(self.remat)  # a ValueError naming the valid policies

    @property
    def block_kind(self) -> str:
        return ARCHITECTURES[self.depth][0]

    def stage_widths(self) -> list[tuple[int, int]]:
        """Per stage: (planes, bottleneck inner width)."""
        out = []
        for i in range(4):
            planes = self.base_width * 2**i
            width = planes
            if self.width_per_group is not None:
                width = (planes * self.width_per_group // self.base_width) * self.groups
            out.append((planes, width))
        return out

    def feature_channels(self) -> dict[str, int]:
        """Channels of each named feature."""
        e = BLOCKS[self.block_kind].expansion
        ch = {"stem": self.stem_width, **{s: p * e for s, (p, _) in zip(STAGES, self.stage_widths())}}
        if self.num_classes is not None:
            ch["pool"], ch["logits"] = ch["layer4"], self.num_classes
        return ch

    def feature_strides(self) -> dict[str, int]:
        """Nominal stride of each spatial feature (input size / feature size, before rounding up)."""
        strides, s = {"stem": 2}, 4
        for name, stage_stride in zip(STAGES, self.strides):
            s *= stage_stride
            strides[name] = s
        return strides

    def blocks(self) -> Iterator[_BlockSpec]:
        """Every residual block in order, with its state-dict name and settings."""
        expansion = BLOCKS[self.block_kind].expansion
        blocks = self.stage_blocks or ARCHITECTURES[self.depth][1]
        inplanes = self.stem_width
        for i, (planes, width) in enumerate(self.stage_widths()):
            stride, dilation = self.strides[i], self.dilations[i]
            first_dilation = dilation // 2 if self.contract_dilation and dilation > 1 else dilation
            for j in range(blocks[i]):
                first = j == 0
                yield _BlockSpec(i, f"{STAGES[i]}.{j}", planes, width, stride if first else 1,
                                 first_dilation if first else dilation,
                                 first and (stride != 1 or inplanes != planes * expansion))
                inplanes = planes * expansion

    def norm_names(self) -> list[str]:
        """State-dict names of every BatchNorm layer (`bn1`, `layer1.0.bn2`, `layer1.0.downsample.1`, ...)."""
        names = ["stem.1", "stem.4", "stem.7"] if self.deep_stem else ["bn1"]
        n_bn = 2 if self.block_kind == "basic" else 3
        for b in self.blocks():
            names += [f"{b.name}.bn{k}" for k in range(1, n_bn + 1)]
            names += [f"{b.name}.downsample.1"] if b.downsample else []
        return names

    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the parameters `frozen_stages` (and `norm_requires_grad=False`) freeze."""
        prefixes: tuple[str, ...] = ()
        if self.frozen_stages >= 0:
            stem = ("stem.",) if self.deep_stem else ("conv1.", "bn1.")
            prefixes = stem + tuple(f"layer{i}." for i in range(1, self.frozen_stages + 1))
        if not self.norm_requires_grad:
            # Layers already under a frozen stage's prefix need no entry of their own.
            prefixes += tuple(f"{n}." for n in self.norm_names() if not f"{n}.".startswith(prefixes))
        return prefixes

    def _block_dcn(self, b: _BlockSpec) -> Optional[str]:
        """The deformable conv type of block `b`'s 3x3 conv, or None (mmdet's `stage_with_dcn`)."""
        return self.dcn if self.dcn is not None and self.stage_with_dcn[b.stage] else None

    def _conv_bn_relu(self, x: Array, features: int, k: int, conv: str, bn: str, *, stride: int, train: bool,
                      frozen: bool) -> Array:
        x = conv2d(x, features, k, name=conv, stride=stride, dtype=self.dtype, param_dtype=self.param_dtype)
        x = batch_norm(x, bn, train=train, frozen_stats=frozen, dtype=self.dtype, param_dtype=self.param_dtype)
        return nn.relu(x)

    def _stem(self, x: Array, train: bool) -> Array:
        frozen = self.norm_eval or self.frozen_stages >= 0
        if not self.deep_stem:
            return self._conv_bn_relu(x, self.stem_width, 7, "conv1", "bn1", stride=2, train=train, frozen=frozen)
        half = self.stem_width // 2
        for i, (features, stride) in enumerate(((half, 2), (half, 1), (self.stem_width, 1))):
            # Keys stem.0/1 (conv/bn), stem.3/4, stem.6/7: the ReLUs hold indices 2, 5, 8 in mmseg's Sequential.
            x = self._conv_bn_relu(x, features, 3, f"stem.{3 * i}", f"stem.{3 * i + 1}", stride=stride,
                                   train=train, frozen=frozen)
        return x

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> dict[str, Array]:
        check_nhwc(x, who=f"ResNet-{self.depth}", channels=self.in_channels)
        block_cls = BLOCKS[self.block_kind]
        if self.remat != "none":
            # `train` is passed positionally (argument 2, counting the module) so that it stays a Python bool.
            block_cls = nn.remat(block_cls, policy=remat_policy(self.remat), static_argnums=(2,))
        stem = lambda mdl, x: mdl._stem(x, train)  # noqa: E731
        if self.remat != "none":
            stem = nn.remat(stem, policy=remat_policy(self.remat))  # parameters keep their names (stem.0, ...)
        feats = {"stem": frozen_boundary(stem(self, x), self.frozen_stages >= 0)}
        x = max_pool_3x3_s2(feats["stem"])
        specs = list(self.blocks())
        for k, b in enumerate(specs):
            x = block_cls(
                planes=b.planes,
                stride=b.stride,
                dilation=b.dilation,
                downsample=b.downsample,
                width=b.width,
                groups=self.groups,
                style=self.style,
                frozen_stats=self.norm_eval or self.frozen_stages > b.stage,
                dcn=self._block_dcn(b),
                deform_groups=self.dcn_deform_groups,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=b.name,
            )(x, train)
            if k + 1 == len(specs) or specs[k + 1].stage != b.stage:
                x = feats[STAGES[b.stage]] = frozen_boundary(x, self.frozen_stages > b.stage)
        if self.num_classes is not None:
            feats["pool"] = jnp.mean(x, axis=(1, 2))
            c = feats["pool"].shape[-1]
            feats["logits"] = nn.Dense(self.num_classes, kernel_init=torch_kernel_init, bias_init=torch_bias_init(c),
                                       dtype=self.dtype, param_dtype=self.param_dtype, name="fc")(feats["pool"])
        return feats
