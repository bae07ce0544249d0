"""How a run computes: its compute dtype and its rematerialisation policy, chosen by name in the config.

`config.dtype` ('float32' | 'bfloat16') is the dtype convolutions, matmuls and the
CanKD attention compute in, for the student, the teacher, the connectors and the
losses that have a `dtype` field. Parameters, optimizer state and BatchNorm running
statistics stay float32 whatever it is (every module keeps `param_dtype=float32`),
so checkpoints and exports are float32 too; BatchNorm and instance-norm statistics,
the task loss, the distillation MSEs and every loss reduction are computed in
float32 from the (bfloat16) activations.

`config.remat` names a `jax.checkpoint` policy: which intermediate values of the
student's stem, residual blocks and heads are kept for the backward pass; the rest
is recomputed there. 'none' keeps everything (no rematerialisation). The
distillation terms (connector + loss) are not rematerialised: they run last in the
forward pass and first in the backward pass, so recomputing them would bring their
activations back at the step's peak (the start of the backward pass, every student
residual still live) and save nothing there.

How a dilated convolution is computed (`dilated_conv`, a trace-time choice, not a
config key: every form gives the same numbers up to float rounding, with the same
parameters): 'batched' runs a stride-1 dilated convolution as an undilated one over
the d x d interleaved sub-images of its input (`models.conv.dilated_as_batched`);
'wgrad' keeps the dilated convolution for the forward pass and the input gradient
and computes only the weight gradient over sub-images
(`models.conv.dilated_conv_batched_wgrad`); 'native' hands XLA the dilated
convolution itself; 'auto' (the default) is 'batched' on GPUs and 'native'
elsewhere, as measured on the paper's Cityscapes step: on one H200 (bfloat16, 8
images) 65.0 ms native, 52.6 ms batched in one sitting, 48.8 ms batched and 49.1 ms
wgrad (0.23 GB less memory) in another, because cuDNN's kernels for a dilated
convolution's weight gradient are slow (`results/gpu/README.md`); on this project's
2-core CPU (the student alone, 128x256, 2 images) 744 ms native, 4170 ms batched,
XLA:CPU being slow on many tiny images (`results/train_speed/cpu.md`). TPUs are
unmeasured, so they keep the native form. `with dilated_conv('native'):` around
tracing (init, jit lowering) selects a form.

How the other k x k convolutions are computed (`conv_form`, trace-time as well, the same
numbers up to float rounding): 'native' is XLA's convolution; 'taps' writes a convolution
as the sum over its k x k taps of a matmul of the input, shifted by the tap and cut to
the pixels it reaches, with the tap's (C, O) kernel slice (`models.conv.conv_as_tap_matmuls`),
so the forward pass and both gradients are matmuls, and a dilated tap that reaches no
pixel (the ASPP's dilations 24/36 on a small map) costs nothing; 'wide_taps' does so for
convolutions with >= 256 input channels and leaves thinner ones native; grouped
convolutions, and dilated ones in the 'batched'/'wgrad' forms, stay as they are. Why:
XLA:CPU's convolutions and their gradients run well below its matmul rate. On this
project's 2-core CPU, the Cityscapes student's (R18-d8, 2 x 128x256) convolutions took
3.0 s native, 1.6 s as taps from 64 channels up and 2.6 s in PyTorch per step (forward +
backward), the R101-d8 teacher's forward 4.5 s, 1.8 s and 3.2 s; at 32 and 64 channels
taps are slower, at 128 even, from 256 up they win (2x at 512, 10x on a dilation-36 ASPP
branch; `results/train_speed/conv_cpu.md`), and a small network's step (the segmentation
demo, 64-192 channels on 8x8 maps) ran slower with taps from 64 channels (51-54 ms
against 39-51 ms native), so only the wide convolutions take them. 'auto' (the default)
is 'wide_taps' on CPUs and 'native' on other backends (cuDNN's convolutions are fast;
TPUs unmeasured).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp

DTYPES = ("float32", "bfloat16")

_cp = jax.checkpoint_policies
# name -> policy (None: no jax.checkpoint at all).
REMAT_POLICIES: dict[str, Optional[Callable[..., bool]]] = {
    "none": None,
    # Keep the outputs of convolutions and matmuls, recompute the elementwise work after them
    # (BatchNorm, ReLU, additions): a little recomputation, the largest share of the saving.
    "dots_saveable": _cp.dots_saveable,
    # Keep only matmuls without batch dimensions (1x1 convs written as matmuls); recompute the rest.
    "dots_with_no_batch_dims_saveable": _cp.dots_with_no_batch_dims_saveable,
    # Keep only each block's input: the whole block is recomputed in the backward pass.
    "nothing_saveable": _cp.nothing_saveable,
}


def compute_dtype(name: Optional[str]) -> Optional[Any]:
    """The modules' `dtype` for `config.dtype`: None for float32 (they compute in their inputs' dtype,
    float32), `jnp.bfloat16` for bfloat16. Unknown names raise a ValueError listing the valid ones."""
    name = name or "float32"
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return None if name == "float32" else jnp.dtype(name)


def remat_policy(name: Optional[str]) -> Optional[Callable[..., bool]]:
    """The `jax.checkpoint` policy of `config.remat` (None for 'none')."""
    name = name or "none"
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; choose one of {', '.join(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


def checkpointed(fn: Callable, name: Optional[str]) -> Callable:
    """`fn` under `jax.checkpoint` with the named policy, or `fn` itself for 'none'."""
    policy = remat_policy(name)
    return fn if (name or "none") == "none" else jax.checkpoint(fn, policy=policy)


CONV_FORMS = ("auto", "native", "taps", "wide_taps")
# Below this many input channels a tap's matmul is too thin to beat XLA:CPU's convolution (conv_cpu.md: slower
# at 32 and 64, even at 128, ahead from 256).
TAPS_MIN_CHANNELS = 256
_conv_form: contextvars.ContextVar[str] = contextvars.ContextVar("conv_form", default="auto")


@contextlib.contextmanager
def _traced_in(var: contextvars.ContextVar[str], name: str, known: tuple[str, ...], what: str) -> Iterator[None]:
    """`var` set to `name` (one of `known`, else a ValueError naming `what` and the choices) inside the block."""
    if name not in known:
        raise ValueError(f"unknown {what} form {name!r}; choose one of {', '.join(known)}")
    token = var.set(name)
    try:
        yield
    finally:
        var.reset(token)


def conv_form(name: str) -> contextlib.AbstractContextManager[None]:
    """Trace k x k convolutions in the named form ('auto', 'native', 'taps' or 'wide_taps') inside the block."""
    return _traced_in(_conv_form, name, CONV_FORMS, "convolution")


def conv_form_for(in_channels: int, groups: int) -> str:
    """The form a k x k convolution with `in_channels` inputs and `groups` groups is traced in here, 'taps' or
    'native' ('wide_taps' resolved by the channel count; 'auto' is 'wide_taps' on CPUs, else 'native'; grouped
    convolutions stay native)."""
    form = _conv_form.get()
    if form == "auto":
        form = "wide_taps" if jax.default_backend() == "cpu" else "native"
    if groups != 1:
        return "native"
    if form == "wide_taps":
        return "taps" if in_channels >= TAPS_MIN_CHANNELS else "native"
    return form


DILATED_CONV = ("auto", "batched", "wgrad", "native")
_dilated_conv: contextvars.ContextVar[str] = contextvars.ContextVar("dilated_conv", default="auto")


def dilated_conv(name: str) -> contextlib.AbstractContextManager[None]:
    """Trace dilated convolutions in the named form ('auto', 'batched', 'wgrad' or 'native') inside the block."""
    return _traced_in(_dilated_conv, name, DILATED_CONV, "dilated convolution")


def dilated_conv_form() -> str:
    """The form dilated convolutions are traced in here, 'batched', 'wgrad' or 'native' ('auto' resolved by the
    default backend: 'batched' on GPUs)."""
    form = _dilated_conv.get()
    if form == "auto":
        return "batched" if jax.default_backend() == "gpu" else "native"
    return form
