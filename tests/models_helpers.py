"""Helpers shared by the network tests: narrow widths, reference-initialised variables, a compiled init."""

from __future__ import annotations

import jax

import torch_models_reference as ref
from cankd_jax.interop.torch_models import import_state_dict

NARROW = dict(stem_width=8, base_width=8)  # 8 / 16 / 32 / 64 channels per stage (x4 for bottlenecks)
D8 = dict(deep_stem=True, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))


def jit_init(model, x, seed: int = 0):
    """`model.init(key, x, train=False)` compiled, with key and input as arguments.

    The key is an RBG key: XLA:CPU compiles threefry's unrolled rounds once per
    parameter tensor, which costs ~0.2 s each (tens of seconds for a narrow
    segmenter); RBG compiles in a fraction of that. Tests that only need some
    variables import them from a PyTorch reference instead (no compile).
    """
    return jax.jit(lambda key, x: model.init(key, x, train=False))(jax.random.key(seed, impl="rbg"), x)


def reference_fcn_segmenter(num_classes: int = 3, blocks=(1, 1, 1, 1), seed: int = 0):
    """mmseg's FCN (+ auxiliary FCN head) on a narrow ResNet-18-V1c-d8 with one block per stage, in PyTorch."""
    return ref.randomize_(ref.EncoderDecoder(
        ref.ResNet(18, stage_blocks=blocks, **D8, **NARROW), ref.FCNHead(64, 16, num_classes),
        ref.FCNHead(32, 8, num_classes, num_convs=1, concat_input=False)), seed)


def variables_from(model, torch_module, **kwargs):
    """`model`'s variables read from a PyTorch module's state dict (strict)."""
    return import_state_dict(model, torch_module.state_dict(), **kwargs)[0]
